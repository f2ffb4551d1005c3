"""Secrets stay secret: TLS follows the DSN's scheme, errors and banners hold no password, and the
data directory and its credentials are the owner's only."""

from __future__ import annotations

import socket
import stat
import threading
from pathlib import Path

import pytest

from labloop.consumers import connect
from labloop.consumers.errors import SinkError
from labloop.streams.settings import Settings

PASSWORD = "p4ss-w0rd-never-shown"


def test_https_means_tls_on_any_port_and_the_error_hides_the_password() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    first: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        conn.settimeout(5)
        try:
            first.append(conn.recv(4096))
        finally:
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(SinkError) as err:
        connect(f"https://labloop:{PASSWORD}@127.0.0.1:{port}/db")
    t.join(10)
    srv.close()
    assert first and first[0][:1] == b"\x16"  # a TLS handshake record, not an HTTP request
    assert b"Authorization" not in first[0] and PASSWORD.encode() not in first[0]
    assert PASSWORD not in str(err.value) and "labloop:***@127.0.0.1" in str(err.value)


def test_generated_credentials_are_owner_only_and_stable(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "d")
    first = s.http_passwords()
    assert set(first) == {"analyst", "operator"} and first["analyst"] != first["operator"]
    assert Settings(data_dir=tmp_path / "d").http_passwords() == first  # the same for every process of the stack
    assert stat.S_IMODE((tmp_path / "d" / "credentials.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    given = Settings(data_dir=tmp_path / "d", clickhouse_analyst_password=PASSWORD)
    assert given.http_passwords()["analyst"] == PASSWORD
    assert PASSWORD not in repr(given) and PASSWORD not in str(given.model_dump())
