"""Kafka security for real: the embedded broker with SASL (SCRAM, PLAIN) and TLS, real clients of
both libraries (librdkafka and aiokafka), wrong credentials failing fast with a named error, and a
whole stack whose every component logs in as its own role without a password reaching any output."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labloop.consumers.kafka import BrokerAuthFailed, BrokerUnreachable, check_broker, make_consumer, make_producer
from labloop.schemas import Codec
from labloop.streams.broker import EmbeddedBroker
from labloop.streams.definition import CampaignSpec
from labloop.streams.gate import MECHANISMS, GateConfig, make_certificates, write_users
from labloop.streams.runtime import free_port
from labloop.streams.settings import Settings

DATA = Path(__file__).parent / "data" / "tpsa_300.csv"
USER, PASSWORD = "instrument-7", "c0rrect-h0rse-battery"
FAST_S = 5.0  # a refused login is reported within this (measured: about 1 s, one metadata attempt)


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("gate")
    write_users(d / "users.json", {USER: PASSWORD})
    ca, cert, key = make_certificates(d / "tls")
    gate = GateConfig(0, 0, d / "users.json", MECHANISMS, cert, key)
    with EmbeddedBroker(log_path=d / "broker.log", gate=gate) as b:
        yield b, ca, d


def _conf(b: EmbeddedBroker, ca: Path, mech: str, **over: str) -> dict[str, str]:
    return {"bootstrap.servers": b.bootstrap, "security.protocol": "SASL_SSL", "sasl.mechanism": mech,
            "sasl.username": USER, "sasl.password": PASSWORD, "ssl.ca.location": str(ca), **over}


@pytest.mark.parametrize("mech", MECHANISMS)
def test_each_mechanism_over_tls_carries_records_both_ways(gated, mech: str) -> None:  # type: ignore[no-untyped-def]
    b, ca, _ = gated
    conf = _conf(b, ca, mech)
    assert check_broker(conf) == b.cluster_id
    from labloop.schemas import TOPICS
    from labloop.streams.runtime import ensure_topics

    ensure_topics(conf, [TOPICS["readings"]])
    p = make_producer(conf)
    p.produce(TOPICS["readings"].name, key=b"k", value=mech.encode())
    assert p.flush(10) == 0
    c = make_consumer(conf, f"sec-{mech}", 2.0)
    c.subscribe([TOPICS["readings"].name])
    seen: set[bytes] = set()
    deadline = time.monotonic() + 30
    while mech.encode() not in seen and time.monotonic() < deadline:
        for m in c.consume(100, 0.5):
            if not m.error():
                seen.add(m.value())
    c.close()
    assert mech.encode() in seen


@pytest.mark.parametrize("bad", [{"sasl.password": "wrong"}, {"sasl.username": "nobody"},
                                 {"ssl.ca.location": "/etc/ssl/certs/ca-certificates.crt"}],
                         ids=["wrong-password", "unknown-user", "untrusted-certificate"])
def test_wrong_credentials_fail_fast_with_a_named_error(gated, bad: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    b, ca, _ = gated
    t0 = time.monotonic()
    with pytest.raises(BrokerAuthFailed) as err:
        check_broker(_conf(b, ca, "SCRAM-SHA-256", **bad), timeout_s=30)
    assert time.monotonic() - t0 < FAST_S
    assert PASSWORD not in str(err.value) and "wrong" not in str(err.value)


def test_plaintext_to_the_tls_port_gets_nothing(gated) -> None:  # type: ignore[no-untyped-def]
    b, ca, _ = gated
    with pytest.raises(BrokerUnreachable):
        check_broker({"bootstrap.servers": b.bootstrap}, timeout_s=3)


def test_aiokafka_logs_in_and_a_wrong_password_is_refused_at_once(gated) -> None:  # type: ignore[no-untyped-def]
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError
    from aiokafka.helpers import create_ssl_context

    b, ca, _ = gated

    async def produce(password: str) -> None:
        p = AIOKafkaProducer(bootstrap_servers=b.bootstrap, security_protocol="SASL_SSL",
                             ssl_context=create_ssl_context(cafile=str(ca)), sasl_mechanism="SCRAM-SHA-512",
                             sasl_plain_username=USER, sasl_plain_password=password)
        try:
            await p.start()
            await p.send_and_wait("labloop.readings", b"from-aiokafka")
        finally:
            await p.stop()

    asyncio.run(produce(PASSWORD))
    t0 = time.monotonic()
    with pytest.raises(KafkaConnectionError):
        asyncio.run(produce("wrong"))
    assert time.monotonic() - t0 < FAST_S


def test_the_users_file_holds_no_password(gated) -> None:  # type: ignore[no-untyped-def]
    _, _, d = gated
    text = (d / "users.json").read_text()
    assert PASSWORD not in text and USER in text
    assert oct((d / "users.json").stat().st_mode & 0o777) == "0o600"
    assert oct((d / "tls" / "server.key").stat().st_mode & 0o777) == "0o600"


def _labloop(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "labloop.streams.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_whole_stack_over_sasl_and_tls_each_role_its_own_login_no_password_shown(
        tmp_path: Path, define_campaign) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "data"
    given = {  # a password in every setting that takes one
        "LABLOOP_CLICKHOUSE_ANALYST_PASSWORD": "analyst-pw-zq81", "LABLOOP_CLICKHOUSE_OPERATOR_PASSWORD": "operator-pw-zq82",
        "LABLOOP_SCHEMA_REGISTRY_AUTH": "reg-user:registry-pw-zq83", "LABLOOP_KAFKA_SSL_KEY_PASSWORD": "key-pw-zq84",
        "LABLOOP_KAFKA_OAUTH_CLIENT_SECRET": "oauth-pw-zq85"}
    env = {**os.environ, **given, "LABLOOP_DATA_DIR": str(data), "LABLOOP_CLICKHOUSE_HTTP_PORT": str(free_port()),
           "LABLOOP_DASHBOARD": "false",
           "LABLOOP_BROKER_SASL": "true", "LABLOOP_BROKER_TLS": "true", "LABLOOP_BROKER_STORAGE": "memory",
           "LABLOOP_LOG_LEVEL": "debug", "LABLOOP_GATE_LOG": "INFO", "COLUMNS": "200"}
    outputs: list[str] = []
    robot: subprocess.Popen[bytes] | None = None
    try:
        up = _labloop(env, "up", "--detach")
        outputs.append(up.stdout + up.stderr)
        assert up.returncode == 0, up.stdout + up.stderr
        bootstrap = json.loads((data / "up.json").read_text())["bootstrap"]
        s = Settings(data_dir=data, broker_sasl=True, broker_tls=True)
        publisher = {**s.kafka_config("publisher"), "bootstrap.servers": bootstrap}
        assert publisher["security.protocol"] == "SASL_SSL"
        define_campaign(publisher, CampaignSpec("secure", "tpsa", "A^2", batch_size=4, init_size=4, budget=8,
                                                min_pool_size=300, seed=3), DATA)
        with open(tmp_path / "robot.log", "wb") as log:
            robot = subprocess.Popen([sys.executable, "-m", "labloop.streams.cli", "robot", "--oracle", str(DATA),
                                      "--value-col", "tpsa", "--unit", "A^2", "--plate-size", "4"],
                                     env=env, stdout=log, stderr=subprocess.STDOUT)
        got = ""
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            q = _labloop(env, "sql", "SELECT count() FROM readings WHERE campaign_id = 'secure'", "--format", "csv")
            outputs.append(q.stdout + q.stderr)
            got = q.stdout.strip().splitlines()[-1] if q.returncode == 0 and q.stdout.strip() else got
            if got == "8":
                break
            time.sleep(2)
        assert got == "8", (got, (tmp_path / "robot.log").read_text()[-2000:])
        for args in (("topics",), ("status",)):
            r = _labloop(env, *args)
            outputs.append(r.stdout + r.stderr)
            assert r.returncode in (0, 1, 2), r.stderr
        # Each component logged in as its own role.
        gate_log = (data / "logs" / "broker.log").read_text()
        for role in ("operator", "worker", "sink", "publisher", "robot"):
            assert f"{role} authenticated" in gate_log, role
    finally:
        if robot is not None:
            robot.terminate()
            robot.wait(30)
        down = _labloop(env, "down")
        outputs.append(down.stdout + down.stderr)
    secrets = list(given.values()) + ["registry-pw-zq83"] + list(json.loads((data / "credentials.json").read_text()).values())
    texts = outputs + [p.read_text(errors="replace") for p in (data / "logs").glob("*.log")] + \
        [(tmp_path / "robot.log").read_text(errors="replace")]
    for secret in secrets:
        for text in texts:
            assert secret not in text, f"a password reached the output: {text[max(0, text.find(secret) - 200):][:400]}"


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat is installed by `make install` (Debian package kcat)")
def test_kcat_reads_a_confluent_framed_topic_through_sasl_and_tls(gated, governed_registry) -> None:  # type: ignore[no-untyped-def]
    """A third-party client (Debian's kcat, its own librdkafka 2.0) logs in with SCRAM over TLS and
    reads what labloop wrote with a registry: magic byte 0, the schema id, the Avro body."""
    from labloop.schemas import TOPICS
    from labloop.streams.runtime import ensure_topics

    b, ca, _ = gated
    registry = governed_registry()
    codec = Codec(registry=registry)
    conf = _conf(b, ca, "SCRAM-SHA-256")
    ensure_topics(conf, [TOPICS["status"]])
    status = {"request_id": "r-kcat", "campaign_id": "c", "compound_id": "x", "status": "ACCEPTED", "robot_id": "bot",
              "reason": None, "event_time": 1_700_000_000_000}
    p = make_producer(conf)
    p.produce(TOPICS["status"].name, key=b"c", value=codec.encode("RequestStatus", status))
    assert p.flush(10) == 0
    cmd = ["kcat", "-C", "-b", b.bootstrap, "-t", TOPICS["status"].name, "-o", "beginning", "-e", "-q",
           "-X", "security.protocol=SASL_SSL", "-X", "sasl.mechanisms=SCRAM-SHA-256", "-X", f"sasl.username={USER}",
           "-X", f"sasl.password={PASSWORD}", "-X", f"ssl.ca.location={ca}", "-f", "%k\n%S\n%s"]
    out = subprocess.run(cmd, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    key, size, value = out.stdout.split(b"\n", 2)
    value = value[: int(size)]
    assert key == b"c" and value[0] == 0  # Confluent framing
    (sid,) = struct.unpack(">I", value[1:5])
    assert registry.get_schema(sid).schema_str == codec.schema("RequestStatus").source
    assert codec.decode(value).record == status
    bad = subprocess.run([*cmd[:-2], "-X", "sasl.password=wrong", "-m", "5"], capture_output=True, timeout=60)
    assert bad.returncode != 0 and not bad.stdout  # refused: nothing read


def test_mutual_tls_admits_a_client_certificate_and_refuses_none(tmp_path: Path) -> None:
    from labloop.streams.gate import make_client_certificate

    ca, cert, key = make_certificates(tmp_path / "tls")
    client_cert, client_key = make_client_certificate(tmp_path / "tls", "robot-3")
    gate = GateConfig(0, 0, None, (), cert, key, cafile=ca)  # TLS only, client certificates required
    with EmbeddedBroker(log_path=tmp_path / "broker.log", gate=gate) as b:
        s = Settings(kafka_bootstrap=b.bootstrap, kafka_security_protocol="SSL", kafka_ssl_cafile=ca,
                     kafka_ssl_certfile=client_cert, kafka_ssl_keyfile=client_key, kafka_ssl_key_password="k3y-pw")
        conf = s.kafka_config()
        assert conf["ssl.certificate.location"] == str(client_cert) and conf["ssl.key.password"] == "k3y-pw"
        del conf["ssl.key.password"]  # the generated key is not encrypted
        assert check_broker(conf) == b.cluster_id
        anonymous = {k: v for k, v in conf.items() if not k.startswith(("ssl.certificate", "ssl.key"))}
        with pytest.raises((BrokerAuthFailed, BrokerUnreachable)):
            check_broker(anonymous, timeout_s=5)


def test_oauthbearer_settings_and_the_client_credentials_token_provider() -> None:
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from labloop.streams.oauth import ClientCredentialsTokens, OAuthError

    calls: list[str] = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"])).decode()
            calls.append(body)
            ok = self.headers["Authorization"] == "Basic " + base64.b64encode(b"labloop-worker:s3cr3t").decode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"access_token": "tok-1", "expires_in": 3600}).encode() if ok else b"{}")

        def log_message(self, *args: object) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/token"
    try:
        s = Settings(kafka_bootstrap="kafka:9093", kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="OAUTHBEARER",
                     kafka_oauth_token_url=url, kafka_oauth_client_id="labloop-worker",
                     kafka_oauth_client_secret="s3cr3t", kafka_oauth_scope="kafka")
        conf = s.kafka_config()  # librdkafka fetches its own tokens
        assert conf["sasl.oauthbearer.method"] == "oidc" and conf["sasl.oauthbearer.token.endpoint.url"] == url
        assert conf["sasl.oauthbearer.client.secret"] == "s3cr3t" and "s3cr3t" not in repr(s)
        tokens = ClientCredentialsTokens.from_settings(s)  # aiokafka's (the worker's) provider
        assert asyncio.run(tokens.token()) == "tok-1" and asyncio.run(tokens.token()) == "tok-1"
        assert len(calls) == 1 and "grant_type=client_credentials" in calls[0] and "scope=kafka" in calls[0]
        bad = ClientCredentialsTokens(url, "labloop-worker", "wrong")
        with pytest.raises(OAuthError) as err:
            asyncio.run(bad.token())
        assert "401" in str(err.value) and "wrong" not in str(err.value)
    finally:
        srv.shutdown()
