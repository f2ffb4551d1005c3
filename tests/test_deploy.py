"""deploy/ is not run here (no Docker engine): check it agrees with the code."""

from __future__ import annotations

from pathlib import Path

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
    assert {tuple(s["command"]) for s in labloop_services} == {("topics",), ("worker",), ("sink",)}
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
