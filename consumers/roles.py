"""Who may do what in ClickHouse: the roles for a server, and the append-only rule.

On a ClickHouse server labloop's access is three roles (:func:`roles_sql`):

* ``labloop_sink``: ``INSERT`` on labloop's tables, and ``SELECT`` for its offset read-back;
* ``labloop_analyst``: ``SELECT`` only, under a settings profile (read-only, time and memory caps);
* ``labloop_operator``: schema work (create tables and views, add columns, change TTLs), but no
  ``ALTER DELETE``/``UPDATE``, ``TRUNCATE`` or ``DROP TABLE`` on the append-only tables.

Nobody is granted a way to delete or rewrite rows of the raw and audit tables
(:data:`APPEND_ONLY`). chDB has no access control of its own (its one user may not create roles),
so the embedded HTTP interface enforces the same rule for its operator (:func:`check_operator_query`).
"""

from __future__ import annotations

import re

__all__ = ["APPEND_ONLY", "ROLES", "check_operator_query", "roles_sql"]

#: Raw measurements and the audit trail: rows are added, never changed or removed.
APPEND_ONLY = ("readings", "requests", "request_status", "campaigns", "compounds", "dead_letters", "proposals", "decisions")
ROLES = ("labloop_sink", "labloop_analyst", "labloop_operator")

_STRINGS = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_COMMENTS = re.compile(r"--[^\n]*|#[^\n]*|/\*.*?\*/", re.DOTALL)
_NAME = r"(?:`?\w+`?\.)?`?(\w+)`?"
_DESTROY = [re.compile(p, re.IGNORECASE) for p in (
    rf"\bDELETE\s+FROM\s+{_NAME}", rf"\bTRUNCATE\s+(?:TABLE\s+)?(?:IF\s+EXISTS\s+)?{_NAME}",
    rf"\bDROP\s+(?:TABLE|DICTIONARY)\s+(?:IF\s+EXISTS\s+)?{_NAME}", rf"\bRENAME\s+TABLE\s+{_NAME}",
    rf"\bEXCHANGE\s+TABLES\s+{_NAME}", rf"\bEXCHANGE\s+TABLES\s+\S+\s+AND\s+{_NAME}")]
_ALTER = re.compile(rf"\bALTER\s+TABLE\s+{_NAME}(.*)", re.IGNORECASE | re.DOTALL)
# What schema work may do to an append-only table: add columns, comments, a TTL.
_ALTER_OK = re.compile(r"^\s*(?:ON\s+CLUSTER\s+\S+\s+)?(?:(?:ADD\s+COLUMN|COMMENT\s+COLUMN|MODIFY\s+COMMENT|MODIFY\s+TTL)"
                       r"\b[^,]*(?:,\s*|$))+$", re.IGNORECASE | re.DOTALL)


class AppendOnly(Exception):  # noqa: N818 - an HTTP answer of the bridge, like QueryRefused
    """A statement that would delete or rewrite rows of an append-only table."""


def check_operator_query(sql: str) -> None:
    """Refuse statements that would delete or rewrite rows of an :data:`APPEND_ONLY` table.

    Raises:
        AppendOnly: naming the table.

    >>> check_operator_query("ALTER TABLE readings ADD COLUMN note String")
    >>> check_operator_query("ALTER TABLE readings UPDATE value = 42 WHERE 1")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    AppendOnly: readings is append-only: its rows are never changed or removed
    """
    text = _COMMENTS.sub(" ", _STRINGS.sub("''", sql))
    for stmt in text.split(";"):
        names = [m.group(1).lower() for p in _DESTROY for m in p.finditer(stmt)]
        alter = _ALTER.search(stmt)
        if alter and alter.group(1).lower() in APPEND_ONLY and not _ALTER_OK.match(alter.group(2)):
            names.append(alter.group(1).lower())
        for n in names:
            if n in APPEND_ONLY:
                raise AppendOnly(f"{n} is append-only: its rows are never changed or removed")


def roles_sql(database: str = "labloop", analyst_timeout_s: float = 30.0, analyst_memory_bytes: int = 4 << 30,
              cluster: str | None = None) -> list[str]:
    """The statements that create labloop's roles on a ClickHouse server (idempotent), in order.

    Users are the server operator's to create; grant them a role, e.g.
    ``CREATE USER sink IDENTIFIED WITH sha256_password BY '...' DEFAULT ROLE labloop_sink``.
    """
    on = f" ON CLUSTER `{cluster}`" if cluster else ""
    db = f"`{database}`"
    out = [f"CREATE ROLE IF NOT EXISTS {r}{on}" for r in ROLES]
    out += [
        f"CREATE SETTINGS PROFILE IF NOT EXISTS labloop_analyst{on} SETTINGS readonly = 1, "
        f"max_execution_time = {analyst_timeout_s:g}, max_memory_usage = {analyst_memory_bytes} TO labloop_analyst",
        f"GRANT{on} INSERT, SELECT ON {db}.* TO labloop_sink",
        f"GRANT{on} SELECT ON {db}.* TO labloop_analyst",
        f"GRANT{on} SELECT, INSERT, CREATE TABLE, CREATE VIEW, DROP VIEW, ALTER ADD COLUMN, ALTER COMMENT COLUMN, "
        f"ALTER MODIFY TTL ON {db}.* TO labloop_operator",
    ]
    return out
