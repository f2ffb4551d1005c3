"""deploy/ is not run here (no Docker engine): check it agrees with the code."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from labloop.streams.cli import app
from labloop.streams.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_compose_uses_only_real_settings_and_commands() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    fields = {f"LABLOOP_{name.upper()}" for name in Settings.model_fields}
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    labloop_services = [s for s in compose["services"].values() if "build" in s]
    assert {s["command"][0] for s in labloop_services} == {"topics", "worker", "sink", "robot", "dashboard"}
    for svc in labloop_services:
        assert svc["command"][0] in commands
        unknown = {k for k in svc["environment"] if k.startswith("LABLOOP_")} - fields
        assert not unknown, f"settings that do not exist: {unknown}"
        # The environment must parse into a valid Settings object pointing at external services.
        env = {k.removeprefix("LABLOOP_").lower(): v for k, v in svc["environment"].items()}
        s = Settings(**env)
        assert not s.embedded_kafka and not s.embedded_clickhouse
        assert (DEPLOY / svc["build"]["context"]).resolve() == DEPLOY.parent  # the repository root
    for dep in (d for s in compose["services"].values() for d in s.get("depends_on", [])):
        assert dep in compose["services"], f"depends on unknown service {dep}"


def test_dockerfile_copies_every_package() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for pkg in ("schemas", "models", "streams", "consumers", "data"):
        assert f"COPY {pkg} {pkg}" in text
    assert "torch==2.13.0" in text and 'ENTRYPOINT ["labloop"]' in text
    assert "from labloop.consumers.plates import warm_up; warm_up()" in text  # compiled at build, not per start


def test_compose_services_restart_check_their_health_and_keep_their_data() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    svc = compose["services"]
    for name in ("kafka", "clickhouse", "worker", "sink", "robot", "dashboard"):
        assert svc[name].get("restart") == "unless-stopped", name
    for name in ("worker", "sink"):  # probed on the health port the environment gives them
        port = svc[name]["environment"]["LABLOOP_HEALTH_PORT"]
        assert f"127.0.0.1:{port}/readyz" in " ".join(svc[name]["healthcheck"]["test"])
    named = set(compose["volumes"])
    mounts = {name: [v.split(":")[0] for v in svc[name].get("volumes", [])] for name in svc}
    for name, wanted in (("kafka", "kafka-data"), ("clickhouse", "clickhouse-data"), ("worker", "checkpoints"),
                         ("robot", "robot-journals")):
        assert wanted in mounts[name] and wanted in named, (name, mounts[name])
    assert "/data/robots" in " ".join(svc["robot"]["volumes"])  # where the robot journals under LABLOOP_DATA_DIR


def _manifests() -> list[dict]:  # type: ignore[type-arg]
    docs: list[dict] = []  # type: ignore[type-arg]
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    docs = _manifests()
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Secret", "Deployment", "Job", "PersistentVolumeClaim"}
    for d in docs:  # offline: the package carries the schemas; strict refuses unknown fields
        kubernetes_validate.validate(d, "1.37.0", strict=True)
    bad = {**docs[0], "data": {"x": 1}}  # a ConfigMap value must be a string: the validator does check
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.37.0", strict=True)


def test_kubernetes_workloads_run_real_commands_with_real_settings_and_probes() -> None:
    from labloop.schemas import TOPICS

    docs = _manifests()
    fields = {f"LABLOOP_{name.upper()}" for name in Settings.model_fields}
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    secret = next(d for d in docs if d["kind"] == "Secret")["stringData"]
    assert set(config) | set(secret) <= fields, (set(config) | set(secret)) - fields
    assert "PASSWORD" not in " ".join(config) and "DSN" not in " ".join(config)  # secrets in the Secret only
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {"labloop-worker", "labloop-sink", "labloop-robot", "labloop-dashboard"}
    assert deployments["labloop-worker"]["spec"]["replicas"] == TOPICS["readings"].partitions  # one per partition
    for d in deployments.values():
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    for d in [*deployments.values(), *(x for x in docs if x["kind"] == "Job")]:
        for c in d["spec"]["template"]["spec"]["containers"]:
            assert c["args"][0] in commands
            assert {e["name"] for e in c.get("env", [])} <= fields
            refs = {r.get("configMapRef", r.get("secretRef", {})).get("name") for r in c["envFrom"]}
            assert refs == {"labloop-settings", "labloop-secrets"}
            if c["args"][0] in ("worker", "sink"):
                port = next(p for p in c["ports"] if p["name"] == "health")["containerPort"]
                assert str(port) == config["LABLOOP_HEALTH_PORT"]
                assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def _acl_calls(tmp_path: Path) -> list[tuple[str, str, str]]:
    """Run deploy/kafka-acls.sh with a stand-in for Apache Kafka's kafka-acls.sh that records its
    arguments; returns (principal, operation, resource) per grant."""
    rec = tmp_path / "calls"
    stub = tmp_path / "kafka-acls.sh"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {rec}\n')
    stub.chmod(0o755)
    env = {**os.environ, "BOOTSTRAP": "kafka:9093", "ADMIN_CONFIG": "/dev/null", "KAFKA_ACLS": str(stub)}
    subprocess.run(["bash", str(DEPLOY / "kafka-acls.sh")], env=env, check=True, timeout=30)
    out = []
    for line in rec.read_text().splitlines():
        a = line.split()
        principal = a[a.index("--allow-principal") + 1]
        res = a[a.index("--topic") + 1] if "--topic" in a else ("group:" + a[a.index("--group") + 1] if "--group" in a
                                                                  else "cluster")
        for i, w in enumerate(a):
            if w == "--operation":
                out.append((principal, a[i + 1], res))
    return out


def test_the_acl_script_gives_each_role_only_what_it_does(tmp_path: Path) -> None:
    from labloop.schemas import TOPICS

    calls = _acl_calls(tmp_path)
    writes = {(p, t) for p, op, t in calls if op == "Write"}
    reads = {(p, t) for p, op, t in calls if op == "Read"}
    assert {p for p, t in writes if t == "labloop.campaigns"} == {"User:operator"}
    assert {p for p, t in writes if t == "labloop.decisions"} == {"User:operator"}  # people's approvals
    assert ("User:worker", "labloop.decisions") in reads and ("User:worker", "labloop.proposals") in writes
    assert {t for p, t in writes if p == "User:instrument"} == {"labloop.readings", "labloop.plates"}
    assert {t for p, t in reads if p == "User:robot"} == {"labloop.requests", "group:labloop-robots"}
    assert {"labloop.request-status", "labloop.readings"} <= {t for p, t in writes if p == "User:robot"}
    assert not {t for p, t in writes if p == "User:sink"}
    assert {t.name for t in TOPICS.values()} <= {t for p, t in reads if p == "User:sink"}
    assert {"labloop.requests", "labloop.predictions", "labloop.model-updates", "labloop.dead-letters"} <= \
        {t for p, t in writes if p == "User:worker"}
    assert {"labloop.readings", "labloop.plates", "labloop.campaigns"} <= {t for p, t in reads if p == "User:worker"}


def test_the_clickhouse_roles_parse_and_grant_nobody_a_way_to_rewrite_rows(tmp_path: Path) -> None:
    from labloop.consumers import connect
    from labloop.consumers.roles import roles_sql

    stmts = roles_sql()
    chunks = (DEPLOY / "clickhouse" / "roles.sql").read_text().split(";")
    shipped = [q for q in (" ".join(ln for ln in c.splitlines() if not ln.startswith("--")).strip() for c in chunks) if q]
    assert shipped == stmts  # deploy/ is what `labloop roles` prints
    ch = connect(f"chdb://{tmp_path / 'ch'}")  # chDB cannot create roles (no access storage); it parses them
    for s in stmts:
        assert ch.query("SELECT formatQuery({q:String})", parameters={"q": s}).result_rows[0][0]
    grants = {s.split(" TO ")[-1]: s for s in stmts if s.startswith("GRANT")}
    assert grants["labloop_analyst"].startswith("GRANT SELECT ON")
    assert grants["labloop_sink"].startswith("GRANT INSERT, SELECT ON")
    for s in stmts:
        for forbidden in ("DELETE", "UPDATE", "TRUNCATE", "DROP TABLE", "ALTER TABLE", "ALL"):
            assert f" {forbidden}" not in s.split(" ON ")[0] or not s.startswith("GRANT"), s


def test_replicated_tables_on_a_cluster(tmp_path: Path) -> None:
    from labloop.consumers import connect
    from labloop.consumers.tables import TABLES, table_ddl

    for t in TABLES.values():
        ddl = table_ddl(t, cluster="lab")
        assert f"CREATE TABLE IF NOT EXISTS {t.name} ON CLUSTER `lab`" in ddl
        assert "ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/" + t.name + "', '{replica}')" in ddl
        assert "replicated_deduplication_window" in ddl and "non_replicated" not in ddl
    ch = connect(f"chdb://{tmp_path / 'ch'}")  # chDB has no Keeper: it parses the replicated form, and runs the single one
    for t in TABLES.values():
        assert ch.query("SELECT formatQuery({q:String})", parameters={"q": table_ddl(t, cluster="lab")}).result_rows
        ch.command(table_ddl(t))
    # The settings a replicated sink sends are accepted.
    ch.command("CREATE TABLE q (a UInt8) ENGINE = MergeTree ORDER BY a")
    ch.insert("q", [[1]], column_names=["a"], settings={"insert_quorum": "auto", "insert_quorum_parallel": 0})
    assert ch.query("SELECT count() FROM q", settings={"select_sequential_consistency": 1}).result_rows == [(1,)]
