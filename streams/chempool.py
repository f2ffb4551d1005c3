"""The worker's chemistry in a child process, bounded in time.

RDKit's SMILES parser holds the interpreter lock: on a thread of the worker, one pathological
molecule froze its event loop for as long as the parse took (a 22 KB SMILES: 17 s). The length
and atom limits (``max_smiles_chars``, ``max_heavy_atoms``) reject the known monsters before
parsing; this pool bounds the rest. Parsing and fingerprinting run in a child process, so the
event loop and the worker's memory are untouched, and a batch that is not done within
``timeout_s`` has its child killed. The batch is then parsed again one molecule at a time, each
within ``timeout_s``, and a molecule that times out alone is rejected as ``InvalidMolecule``.
Good molecules beside a slow one therefore wait at most ``2 * timeout_s`` plus two child starts
(about a second each here; the bound counts from a started child, so a start under load never
rejects a good molecule). Measured in tests/test_bounded_inputs.py: 3.7 s at ``timeout_s`` 1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

import numpy as np

from labloop.models import FeatureSpec, InvalidMolecule
from labloop.models.chem import MoleculeLimits
from labloop.streams.procs import die_with_parent

__all__ = ["ChemPool"]

log = logging.getLogger("labloop.worker")
START_TIMEOUT_S = 120.0  # a child that cannot even start is a broken installation, not a slow molecule
_MAX_FRAME = 1 << 30


def _write(out: IO[bytes], payload: bytes) -> None:
    out.write(struct.pack(">I", len(payload)) + payload)
    out.flush()


def _read(inp: IO[bytes]) -> bytes:
    head = inp.read(4)
    if len(head) < 4:
        raise EOFError("the chemistry process closed its pipe")
    (n,) = struct.unpack(">I", head)
    if n > _MAX_FRAME:
        raise EOFError(f"a frame of {n} bytes")
    data = inp.read(n)
    if len(data) < n:
        raise EOFError("the chemistry process closed its pipe")
    return data


class ChemPool:
    """``await pool.featurize(smiles)`` -> ``(ok, errors, X)``, computed in a child process.

    The child (``python -m labloop.streams.chempool``) reads JSON requests and answers a JSON
    header and the features as raw float32 bytes on its pipes: nothing it sends is executed or
    unpickled. It dies with the worker (parent-death signal).

    Args:
        limits, spec: as :func:`labloop.models.chem.featurize_smiles`.
        timeout_s: the most one batch (and, on a retry, one molecule) may take.
    """

    def __init__(self, limits: MoleculeLimits, spec: FeatureSpec, timeout_s: float = 5.0) -> None:
        self.limits, self.spec, self.timeout_s = limits, spec, timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._answered = False  # whether self._proc has answered once (it has finished starting)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labloop-chem-io")
        self.killed = 0  # children killed for overrunning, for the logs and tests

    def _call(self, proc: subprocess.Popen[bytes], smiles: Sequence[str]) -> tuple[list[int], list[tuple[int, str]], np.ndarray]:
        assert proc.stdin is not None and proc.stdout is not None
        _write(proc.stdin, json.dumps({"smiles": list(smiles)}).encode())
        head = json.loads(_read(proc.stdout))
        raw = _read(proc.stdout)
        X = np.frombuffer(raw, dtype=np.float32).reshape(int(head["rows"]), self.spec.n_bits).copy()
        return [int(i) for i in head["ok"]], [(int(i), str(r)) for i, r in head["rejected"]], X

    def start(self) -> None:
        """Start the child now, so that its imports (seconds) overlap the caller's own start
        instead of delaying the first molecules; :meth:`featurize` waits for it to answer."""
        if self._proc is None or self._proc.poll() is not None:
            cfg = json.dumps({"limits": {"max_chars": self.limits.max_chars, "max_heavy_atoms": self.limits.max_heavy_atoms},
                              "spec": {"radius": self.spec.radius, "n_bits": self.spec.n_bits, "counts": self.spec.counts}})
            self._proc = subprocess.Popen([sys.executable, "-m", "labloop.streams.chempool", cfg], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, preexec_fn=die_with_parent(os.getpid()))
            self._answered = False

    async def _child(self) -> subprocess.Popen[bytes]:
        self.start()
        assert self._proc is not None
        if not self._answered:
            # A child's start (imports, about a second) is not a molecule's time: wait for it first.
            try:
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._io, self._call, self._proc, []),
                                       START_TIMEOUT_S)
            except BaseException:
                proc, self._proc = self._proc, None
                proc.kill()  # its pipe's reader in the I/O thread then ends
                proc.wait()
                raise
            self._answered = True
        return self._proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            self.killed += 1
            proc.kill()
            proc.wait()

    async def _run(self, smiles: Sequence[str]) -> tuple[list[int], list[tuple[int, str]], np.ndarray] | None:
        proc = await self._child()
        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._io, self._call, proc, smiles),
                                          self.timeout_s)
        except (TimeoutError, EOFError, OSError, ValueError):
            self._kill()  # the blocked read on its pipe then ends, and frees the I/O thread
            return None

    async def featurize(self, smiles: Sequence[str]) -> tuple[list[int], list[InvalidMolecule], np.ndarray]:
        """Parse and fingerprint ``smiles``.

        Returns:
            ``(ok, errors, X)``: positions parsed (in order), one error per rejected position (in
            order), and ``len(ok) x n_bits`` features.
        """
        res = await self._run(smiles)
        if res is None:  # something in the batch overran: find it, one molecule at a time
            log.warning("chemistry of %d molecules overran %.1f s; parsing them one by one", len(smiles), self.timeout_s)
            ok: list[int] = []
            rejected: list[tuple[int, str]] = []
            rows: list[np.ndarray] = []
            for i, s in enumerate(smiles):
                one = await self._run([s])
                if one is None:
                    rejected.append((i, f"parsing took longer than {self.timeout_s:g} s"))
                elif one[0]:
                    ok.append(i)
                    rows.append(one[2])
                else:
                    rejected.append((i, one[1][0][1]))
            X = np.concatenate(rows) if rows else np.zeros((0, self.spec.n_bits), dtype=np.float32)
            res = ok, rejected, X
        ok, rejected, X = res
        return ok, [InvalidMolecule(smiles[i], reason) for i, reason in rejected], X

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._io.shutdown(wait=False)


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m labloop.streams.chempool CONFIG_JSON``; requests on stdin, answers on stdout."""
    from labloop.models.chem import featurize_smiles, quiet_rdkit

    args = sys.argv[1:] if argv is None else argv
    cfg = json.loads(args[0])
    limits, spec = MoleculeLimits(**cfg["limits"]), FeatureSpec(**cfg["spec"])
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    with quiet_rdkit():
        while True:
            try:
                req: dict[str, Any] = json.loads(_read(inp))
            except EOFError:
                return 0
            ok, rejected, X = featurize_smiles(req["smiles"], limits, spec)
            _write(out, json.dumps({"ok": ok, "rejected": rejected, "rows": int(X.shape[0])}).encode())
            _write(out, np.ascontiguousarray(X, dtype=np.float32).tobytes())


if __name__ == "__main__":
    raise SystemExit(main())
