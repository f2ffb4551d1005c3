"""RDKit behind one small functional module: parse and featurize in batches.

RDKit's C++ logger is muted only inside :func:`quiet_rdkit`, so an invalid SMILES
raises :class:`~labloop.models.errors.InvalidMolecule` instead of printing to stderr.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from rdkit import Chem, RDLogger, rdBase
from rdkit.Chem import rdFingerprintGenerator

from labloop.models.errors import InvalidMolecule

__all__ = ["MAX_HEAVY_ATOMS", "MAX_SMILES_CHARS", "FeatureSpec", "MoleculeLimits", "featurize", "featurize_mols", "featurize_smiles",
           "parse_many", "parse_smiles", "quiet_rdkit"]

# Bounds on one molecule. The largest in the bundled sets: 291 characters and 122 heavy atoms
# (NCI); drug-like compounds stay under 100 of each. Parse time grows faster than linearly with
# size (a 2-D grid of carbons, measured here: 1,354 characters in 6 ms, 6,484 in 154 ms, 17,700
# in 1.3 s), and RDKit holds the interpreter lock while it parses, so the length is checked
# before RDKit sees the string.
MAX_SMILES_CHARS = 1000
MAX_HEAVY_ATOMS = 250


@dataclass(frozen=True)
class MoleculeLimits:
    """The largest molecule accepted: ``max_chars`` of SMILES (checked before parsing) and
    ``max_heavy_atoms`` (after)."""

    max_chars: int = MAX_SMILES_CHARS
    max_heavy_atoms: int = MAX_HEAVY_ATOMS


def _log_status() -> dict[str, bool]:
    """RDKit's log channels and whether each is on (``rdBase.LogStatus()``: ``name:enabled`` lines)."""
    out = {}
    for line in rdBase.LogStatus().splitlines():
        name, _, state = line.partition(":")
        out[name] = state == "enabled"
    return out


@contextlib.contextmanager
def quiet_rdkit() -> Iterator[None]:
    """Silence RDKit's C++ logging for the duration of the block, then restore each channel as it
    was (a caller's own choice of channels survives; re-enabling everything would not)."""
    before = _log_status()
    RDLogger.DisableLog("rdApp.*")  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for name, on in before.items():
            (rdBase.EnableLog if on else rdBase.DisableLog)(name)


def parse_smiles(smiles: str, limits: MoleculeLimits = MoleculeLimits()) -> Chem.Mol:
    """Parse and sanitize one SMILES.

    Raises:
        InvalidMolecule: empty input, longer than ``limits.max_chars``, more heavy atoms than
            ``limits.max_heavy_atoms``, or RDKit rejects it.

    >>> parse_smiles("CCO").GetNumAtoms()
    3
    """
    if not smiles or not smiles.strip():
        raise InvalidMolecule(smiles, "empty SMILES")
    if len(smiles) > limits.max_chars:
        raise InvalidMolecule(smiles, f"{len(smiles):,} characters, more than the {limits.max_chars:,} allowed")
    with quiet_rdkit():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise InvalidMolecule(smiles)
    if mol.GetNumHeavyAtoms() > limits.max_heavy_atoms:
        raise InvalidMolecule(smiles, f"{mol.GetNumHeavyAtoms()} heavy atoms, more than the {limits.max_heavy_atoms} allowed")
    return mol


def parse_many(smiles: Sequence[str], limits: MoleculeLimits = MoleculeLimits(),
               ) -> tuple[list[Chem.Mol], list[int], list[InvalidMolecule]]:
    """Parse a batch, keeping going past bad entries.

    Returns:
        ``(mols, ok_index, errors)``: the parsed molecules, the input positions
        they came from (same length as ``mols``), and one error per rejected input.
    """
    mols: list[Chem.Mol] = []
    ok: list[int] = []
    errors: list[InvalidMolecule] = []
    for i, s in enumerate(smiles):
        try:
            mols.append(parse_smiles(s, limits))
            ok.append(i)
        except InvalidMolecule as exc:
            errors.append(exc)
    return mols, ok, errors


@dataclass(frozen=True)
class FeatureSpec:
    """Morgan fingerprint settings; one value names one feature space.

    Attributes:
        radius: Morgan radius (2 = ECFP4-like).
        n_bits: folded length ``d``.
        counts: count fingerprint when True, bit fingerprint when False.
    """

    radius: int = 2
    n_bits: int = 2048
    counts: bool = True

    def generator(self) -> rdFingerprintGenerator.FingerprintGenerator64:
        return rdFingerprintGenerator.GetMorganGenerator(radius=self.radius, fpSize=self.n_bits)


def _n_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def featurize_smiles(smiles: Sequence[str], limits: MoleculeLimits, spec: FeatureSpec,
                     ) -> tuple[list[int], list[tuple[int, str]], np.ndarray]:
    """Parse and fingerprint a batch in one call (what a chemistry subprocess runs).

    Returns:
        ``(ok, rejected, X)``: the input positions parsed, ``(position, reason)`` for each rejected
        one, and ``len(ok) x spec.n_bits`` features (:func:`featurize_mols`); plain values, so
        that they cross a process boundary.
    """
    mols: list[Chem.Mol] = []
    ok: list[int] = []
    rejected: list[tuple[int, str]] = []
    for i, s in enumerate(smiles):
        try:
            mols.append(parse_smiles(s, limits))
            ok.append(i)
        except InvalidMolecule as exc:
            rejected.append((i, exc.reason))
    return ok, rejected, featurize_mols(mols, spec)


def featurize_mols(mols: Sequence[Chem.Mol], spec: FeatureSpec = FeatureSpec()) -> np.ndarray:
    """Fingerprint parsed molecules with RDKit's batch API (it releases the GIL).

    Returns:
        ``n x spec.n_bits`` float32 matrix; counts are capped at 255.
    """
    out = np.zeros((len(mols), spec.n_bits), dtype=np.float32)
    if not mols:
        return out
    gen = spec.generator()
    if spec.counts:
        fps = gen.GetCountFingerprints(list(mols), numThreads=_n_threads())
        for row, fp in enumerate(fps):
            for bit, count in fp.GetNonzeroElements().items():
                out[row, bit] = min(count, 255)
    else:
        fps = gen.GetFingerprints(list(mols), numThreads=_n_threads())
        for row, fp in enumerate(fps):
            out[row, list(fp.GetOnBits())] = 1.0
    return out


def featurize(smiles: Sequence[str], spec: FeatureSpec = FeatureSpec()) -> np.ndarray:
    """Parse and fingerprint a batch of SMILES.

    Returns:
        ``n x spec.n_bits`` float32 matrix, row ``i`` for ``smiles[i]``.

    Raises:
        InvalidMolecule: for the first SMILES that does not parse (use
            :func:`parse_many` + :func:`featurize_mols` to skip bad rows instead).

    >>> featurize(["CCO", "c1ccccc1"]).shape
    (2, 2048)
    """
    mols = [parse_smiles(s) for s in smiles]
    return featurize_mols(mols, spec)
