"""deploy/ is not run here (no Docker engine): check it agrees with the code."""

from __future__ import annotations

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
    assert {s["command"][0] for s in labloop_services} == {"topics", "worker", "sink", "robot"}
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


def test_compose_services_restart_check_their_health_and_keep_their_data() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    svc = compose["services"]
    for name in ("kafka", "clickhouse", "worker", "sink", "robot"):
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
    assert set(deployments) == {"labloop-worker", "labloop-sink", "labloop-robot"}
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
