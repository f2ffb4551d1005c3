"""The one settings object: environment variables ``LABLOOP_*`` and ``.env``.

Read once, at the edge (the CLI), and passed down as arguments; library code
never reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from labloop.schemas import Codec

__all__ = ["KAFKA_ROLES", "KafkaSecurity", "Settings", "load_settings"]

#: The embedded broker's users when it authenticates: one per kind of client.
KAFKA_ROLES = ("operator", "worker", "sink", "publisher", "robot")


@dataclass(frozen=True)
class KafkaSecurity:
    """How a client authenticates to the broker, whichever client library it uses."""

    protocol: str
    mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    key_password: str | None = field(default=None, repr=False)


class Settings(BaseSettings):
    """Where Kafka and ClickHouse are, and how the loop runs.

    Leave ``kafka_bootstrap`` empty for the embedded Tansu broker and keep the
    ``chdb://`` DSN for embedded ClickHouse; set them to reach a cluster.
    """

    model_config = SettingsConfigDict(env_prefix="LABLOOP_", env_file=".env", extra="ignore", frozen=True)

    # Kafka
    kafka_bootstrap: str = Field("", description="host:port[,host:port]; empty = start the embedded broker")
    broker_storage: Literal["disk", "memory"] = Field(
        "disk", description="the embedded broker's log: on disk under data_dir/broker (survives restarts), or in memory")
    kafka_port: int = Field(0, ge=0, lt=65536, description="the embedded broker's port on its first start (0 = a free "
                            "one); a disk broker keeps it across restarts")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="for an external broker; the embedded one's follows broker_sasl and broker_tls")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = Field(None, description="PEM CA the broker's certificate must chain to")
    kafka_ssl_certfile: Path | None = Field(None, description="PEM client certificate, for brokers that require mutual TLS")
    kafka_ssl_keyfile: Path | None = Field(None, description="PEM key of kafka_ssl_certfile")
    kafka_ssl_key_password: SecretStr | None = None
    kafka_oauth_token_url: str | None = Field(None, description="OAUTHBEARER: the OIDC token endpoint (client credentials)")
    kafka_oauth_client_id: str | None = None
    kafka_oauth_client_secret: SecretStr | None = None
    kafka_oauth_scope: str | None = None
    kafka_role: Literal["operator", "worker", "sink", "publisher", "robot"] = Field(
        "operator", description="whose embedded-broker credentials this process uses (labloop up sets it per child)")
    broker_sasl: bool = Field(False, description="the embedded broker requires SCRAM-SHA-256, one generated user per role")
    broker_tls: bool = Field(False, description="the embedded broker speaks TLS, with a CA generated under data_dir/broker/tls")
    kafka_session_timeout_s: float = Field(6.0, description="consumer session timeout; Tansu joins take half of it")
    kafka_fetch_max_wait_ms: int = Field(20, description="worker fetch long-poll; Tansu holds every fetch this long")
    kafka_fetch_max_wait_backlog_ms: int = Field(
        500, description="worker fetch long-poll while a readings input is more than backlog_messages behind")
    kafka_fetch_max_wait_idle_ms: int = Field(
        200, ge=1, le=5000, description="worker fetch long-poll after 5 s with no input: what an idle stack costs the cores")
    schema_registry_url: str | None = Field(None, description="Confluent Schema Registry; unset = single-object Avro")
    schema_registry_auth: SecretStr | None = Field(None, description="user:password for the registry")
    schema_registry_auto_register: bool = Field(
        True, description="producers register a schema they write first; false: only `labloop topics` registers")

    # ClickHouse
    clickhouse_dsn: str = Field("", description="empty = embedded chDB under data_dir; chdb:///abs/path; or http(s)://user:pw@host:port")
    clickhouse_http_port: int = Field(8123, description="loopback port on which the embedded chDB answers ClickHouse's HTTP interface")
    clickhouse_database: str = "labloop"
    clickhouse_cluster: str | None = Field(
        None, description="a ClickHouse cluster name: Replicated tables ON CLUSTER, quorum inserts, consistent read-back")
    clickhouse_analyst_password: SecretStr | None = Field(
        None, description="the embedded HTTP interface's read-only user 'analyst'; unset = generated into data_dir/credentials.json")
    clickhouse_operator_password: SecretStr | None = Field(
        None, description="its schema-work user 'operator'; unset = generated into data_dir/credentials.json")
    clickhouse_analyst_timeout_s: float = Field(30.0, gt=0, description="max_execution_time of an analyst's query")

    # Runtime
    data_dir: Path = Path(".labloop")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    worker_batch: int = Field(2000, description="max events per micro-batch")
    worker_batch_window_s: float = Field(0.01, description="max wait to fill a micro-batch (a backlog fills it at once)")
    sink_batch_rows: int = 50_000
    sink_flush_s: float = 0.5
    sink_exactly_once: bool = Field(True, description="skip rows already stored after a crash; dedup tokens (off only for fault-test controls)")
    sink_dedup_keys: int = Field(1_000_000, description="natural keys remembered per table: the window for re-sent events")
    max_smiles_chars: int = Field(1000, gt=0, description="longer SMILES are dead-lettered unparsed (InvalidMolecule)")
    max_heavy_atoms: int = Field(250, gt=0, description="molecules with more heavy atoms are dead-lettered")
    chem_timeout_s: float = Field(5.0, gt=0, description="most seconds one batch of molecules (then one molecule) "
                                  "may take to parse in the worker's chemistry process; slower ones are dead-lettered")
    max_plate_wells: int = Field(1536, gt=0, description="a plate with more wells is one dead letter")
    max_message_bytes: int = Field(1_048_576, gt=0, description="larger input messages are dead-lettered undecoded")
    backlog_messages: int = Field(1000, description="inputs further behind than this count as a backlog")
    backlog_fit_share: float = Field(0.25, gt=0, le=1, description="under a backlog, fits take at most this share of the time (1 = no pacing)")
    prediction_tolerance: float = Field(0.05, ge=0, le=1, description="a model version publishes the predictions that "
                                        "moved by more than this many of their sd since last published (0: every one that "
                                        "changed); a finished campaign's final version publishes every one not yet published at it")
    model_process: bool = Field(True, description="fit in a child process (false: on a thread of the worker)")
    checkpoint_interval_s: float = Field(10.0, description="how often a worker checkpoints its campaigns (0 = never)")
    worker_id: str = Field("0", description="names this worker's checkpoint; a replacement reuses its predecessor's id")
    health_port: int = Field(0, ge=0, lt=65536, description="loopback port of a worker's or sink's /healthz, /readyz and "
                             "/metrics (0 = a free one; `labloop up` chooses and prints them)")
    dashboard: bool = Field(True, description="`labloop up` serves the web dashboard")
    dashboard_port: int = Field(8050, ge=0, lt=65536, description="loopback port of the web dashboard that `labloop up` "
                                "starts and prints (0 = a free one)")
    log_level: Literal["debug", "info", "warn", "error"] = "warn"

    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def embedded_clickhouse(self) -> bool:
        return self.clickhouse_target.startswith("chdb:")

    @property
    def clickhouse_target(self) -> str:
        """The DSN actually used: an explicit one, else ``chdb:///<data_dir>/chdb`` (absolute)."""
        return self.clickhouse_dsn or f"chdb://{(self.data_dir / 'chdb').resolve()}"

    def _stored_secret(self, name: str) -> str:
        """``name``'s generated secret in ``data_dir/credentials.json`` (owner-only), created the
        first time it is asked for; every process of the stack reads the same one."""
        import fcntl
        import json
        import os
        import secrets

        path = self.data_dir / "credentials.json"
        if path.exists() and name in (known := json.loads(path.read_text())):
            return str(known[name])
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Several processes of one stack may ask first at once: one at a time, or one's secret is lost.
        fd = os.open(self.data_dir / ".credentials.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
            if name not in stored:
                stored[name] = secrets.token_urlsafe(18)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(out, "w") as fh:
                    json.dump(stored, fh)
                os.replace(tmp, path)
        finally:
            os.close(fd)
        return stored[name]

    def http_passwords(self) -> dict[str, str]:
        """The embedded HTTP interface's users and passwords: from the settings, else generated
        (:meth:`_stored_secret`)."""
        given = {"analyst": self.clickhouse_analyst_password, "operator": self.clickhouse_operator_password}
        return {role: (secret.get_secret_value() if secret is not None else self._stored_secret(role))
                for role, secret in given.items()}

    @property
    def torch_device(self) -> str | None:
        return None if self.device == "auto" else self.device

    def kafka_passwords(self) -> dict[str, str]:
        """The embedded broker's users (one per ``kafka_role``) and their passwords, generated
        (owner-only) in ``data_dir/credentials.json`` the first time they are needed."""
        return {role: self._stored_secret(f"kafka-{role}") for role in KAFKA_ROLES}

    def kafka_security(self, role: str | None = None) -> KafkaSecurity:
        """How clients authenticate: the settings for an external broker; for the embedded one,
        ``broker_sasl`` / ``broker_tls`` with ``role``'s generated user (default ``kafka_role``)."""
        user = self.kafka_sasl_username
        password = self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
        if not self.embedded_kafka:
            return KafkaSecurity(self.kafka_security_protocol, self.kafka_sasl_mechanism, user, password,
                                 self.kafka_ssl_cafile, self.kafka_ssl_certfile, self.kafka_ssl_keyfile,
                                 self.kafka_ssl_key_password.get_secret_value() if self.kafka_ssl_key_password else None)
        tls_dir = self.data_dir / "broker" / "tls"
        proto = {(False, False): "PLAINTEXT", (True, False): "SASL_PLAINTEXT", (False, True): "SSL",
                 (True, True): "SASL_SSL"}[(self.broker_sasl, self.broker_tls)]
        if self.broker_sasl and user is None:
            user = role or self.kafka_role
            password = self.kafka_passwords()[user]
        return KafkaSecurity(proto, "SCRAM-SHA-256" if self.broker_sasl else None, user, password,
                             self.kafka_ssl_cafile or (tls_dir / "ca.pem" if self.broker_tls else None))

    def kafka_config(self, role: str | None = None) -> dict[str, str]:
        """librdkafka / confluent-kafka client settings (no group settings) for ``role``."""
        sec = self.kafka_security(role)
        conf: dict[str, str] = {"bootstrap.servers": self.kafka_bootstrap, "security.protocol": sec.protocol}
        if sec.mechanism == "OAUTHBEARER":
            conf.update({"sasl.mechanism": "OAUTHBEARER", "sasl.oauthbearer.method": "oidc",
                         "sasl.oauthbearer.token.endpoint.url": self.kafka_oauth_token_url or "",
                         "sasl.oauthbearer.client.id": self.kafka_oauth_client_id or "",
                         "sasl.oauthbearer.client.secret": (self.kafka_oauth_client_secret.get_secret_value()
                                                            if self.kafka_oauth_client_secret else "")})
            if self.kafka_oauth_scope:
                conf["sasl.oauthbearer.scope"] = self.kafka_oauth_scope
        elif sec.mechanism:
            conf.update({"sasl.mechanism": sec.mechanism, "sasl.username": sec.username or "",
                         "sasl.password": sec.password or ""})
        if sec.cafile:
            conf["ssl.ca.location"] = str(sec.cafile)
        if sec.certfile:
            conf["ssl.certificate.location"] = str(sec.certfile)
        if sec.keyfile:
            conf["ssl.key.location"] = str(sec.keyfile)
        if sec.key_password:
            conf["ssl.key.password"] = sec.key_password
        return conf

    def codec(self, auto_register: bool | None = None) -> Codec:
        """The Avro codec: Confluent framing through the registry when one is set, else single-object."""
        from labloop.schemas import Codec

        return Codec(registry_url=self.schema_registry_url, registry_config=self.registry_config(),
                     auto_register=self.schema_registry_auto_register if auto_register is None else auto_register)

    def registry_config(self) -> dict[str, str]:
        if self.schema_registry_auth:
            return {"basic.auth.user.info": self.schema_registry_auth.get_secret_value()}
        return {}


def load_settings(**overrides: object) -> Settings:
    """Read the environment and ``.env`` once; keyword arguments win."""
    return Settings(**overrides)  # type: ignore[arg-type]
