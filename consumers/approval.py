"""People's decisions on what an approval-gated campaign proposes.

A campaign defined with ``approval`` publishes each new request on the proposals topic, where
no robot reads, and holds it until a ``Decision`` event on the decisions topic approves it (the
worker then publishes it on the requests topic), rejects it (with a reason: the compound is
never proposed again in that campaign) or changes its priority. ``labloop approve`` /
``labloop reject`` and the dashboard build those events here, from what ClickHouse holds, and
read the queue of proposals still waiting.
"""

from __future__ import annotations

import uuid
from typing import Any

from clickhouse_connect.driver.client import Client

from labloop.consumers.errors import ConsumerError
from labloop.consumers.tables import sql_string
from labloop.schemas.types import Record

__all__ = ["ACTIONS", "ApprovalError", "decision_record", "decisions_of", "pending_counts", "pending_proposals"]

ACTIONS = ("APPROVE", "REJECT", "PRIORITIZE")
MAX_REASON = 2000  # characters of a decision's reason
MAX_PRIORITY = 1_000_000


class ApprovalError(ConsumerError):
    """A decision that cannot be taken: no such proposal, one already decided, or a bad field."""


def decisions_of(client: Client, request_id: str) -> list[dict[str, Any]]:
    """Every decision on a request, oldest first: action, priority, reason, decided_by, event_time."""
    res = client.query(f"SELECT action, priority, reason, decided_by, event_time FROM decisions "
                       f"WHERE request_id = {sql_string(request_id)} ORDER BY event_time, decision_id")
    return [dict(zip(res.column_names, row, strict=True)) for row in res.result_rows]


def decision_record(client: Client, request_id: str, action: str, decided_by: str, now_ms: int,
                    reason: str | None = None, priority: int | None = None) -> Record:
    """The ``Decision`` event for ``action`` on a proposed request, checked against ClickHouse.

    Raises:
        ApprovalError: the request was never proposed, is decided already (approved or rejected),
            or a field is wrong (an unknown action, a rejection without a reason, a priority
            outside ``[0, 1000000]``).
    """
    if action not in ACTIONS:
        raise ApprovalError(f"unknown action {action!r}; known: {', '.join(ACTIONS)}")
    reason = (reason or "").strip() or None
    if action == "REJECT" and reason is None:
        raise ApprovalError("a rejection needs a reason")
    if reason is not None and len(reason) > MAX_REASON:
        raise ApprovalError(f"the reason has {len(reason):,} characters, more than {MAX_REASON:,}")
    if priority is not None and not 0 <= priority <= MAX_PRIORITY:
        raise ApprovalError(f"priority {priority} is outside [0, {MAX_PRIORITY}]")
    if not decided_by.strip():
        raise ApprovalError("a decision needs the name of who took it")
    res = client.query(f"SELECT campaign_id FROM proposals WHERE request_id = {sql_string(request_id)} LIMIT 1")
    if not res.result_rows:
        raise ApprovalError(f"no proposed request {request_id!r} (only approval-gated campaigns propose)")
    taken = [d for d in decisions_of(client, request_id) if d["action"] in ("APPROVE", "REJECT")]
    if taken:
        d = taken[0]
        raise ApprovalError(f"request {request_id!r} was {'approved' if d['action'] == 'APPROVE' else 'rejected'} "
                            f"already, by {d['decided_by']} at {d['event_time']}")
    return {"decision_id": uuid.uuid4().hex, "campaign_id": str(res.result_rows[0][0]), "request_id": request_id,
            "action": action, "priority": priority, "reason": reason, "decided_by": decided_by.strip(),
            "event_time": int(now_ms)}


def pending_proposals(client: Client, campaign_id: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Proposals that no decision has approved or rejected yet, most urgent first: the request's
    columns, with ``priority`` the latest one a person set."""
    where = f"AND p.campaign_id = {sql_string(campaign_id)}" if campaign_id is not None else ""
    res = client.query(
        "SELECT p.request_id AS request_id, p.campaign_id AS campaign_id, p.compound_id AS compound_id, "
        "p.smiles AS smiles, p.assay_id AS assay_id, if(d.prio_set, d.prio, p.priority) AS priority, "
        "p.sequence AS sequence, p.batch AS batch, p.policy AS policy, p.acquisition_score AS acquisition_score, "
        "p.predicted_mean AS predicted_mean, p.predicted_std AS predicted_std, p.model_version AS model_version, "
        f"p.event_time AS proposed_at {_PENDING} {where} ORDER BY campaign_id, priority, sequence LIMIT {int(limit)}")
    return [dict(zip(res.column_names, row, strict=True)) for row in res.result_rows]


def pending_counts(client: Client) -> dict[str, int]:
    """Per campaign, how many proposals wait for a decision (campaigns with none are absent)."""
    res = client.query(f"SELECT p.campaign_id, count() {_PENDING} GROUP BY p.campaign_id")
    return {str(cid): int(n) for cid, n in res.result_rows}


# The proposals no decision has approved or rejected yet (``p``), with ``d.prio`` the latest
# priority a person set (when ``d.prio_set``).
_PENDING = (
    "FROM (SELECT * FROM proposals LIMIT 1 BY request_id) AS p LEFT JOIN ("
    "SELECT request_id, countIf(action IN ('APPROVE', 'REJECT')) AS closed, "
    "argMaxIf(priority, event_time, priority IS NOT NULL) AS prio, countIf(priority IS NOT NULL) > 0 AS prio_set "
    "FROM decisions GROUP BY request_id) AS d ON p.request_id = d.request_id WHERE ifNull(d.closed, 0) = 0")
