"""Errors raised by the pure-compute layer.

``models`` imports no other labloop package, so its errors have their own root,
:class:`ModelError`; the stream layer maps every :class:`ModelError` to the
dead-letter policy exactly like a ``schemas`` error.
"""

from __future__ import annotations

# The largest |y| a learner takes. Outcomes are standardized in float64, so squares of such
# values stay far from overflow (a 1e308 reading made every later prediction NaN), and no
# assay in any unit comes near it. Defined here, beside the error that enforces it, so that
# campaign definitions are checked without importing torch.
STABLE_ABS_MAX = 1e12


class ModelError(Exception):
    """Root of every error raised by :mod:`models`."""


class InvalidMolecule(ModelError, ValueError):
    """A SMILES string that RDKit cannot parse or sanitize.

    Attributes:
        smiles: the rejected input, verbatim.
        reason: RDKit's complaint, or a short description.
    """

    def __init__(self, smiles: str, reason: str = "RDKit could not parse the SMILES") -> None:
        # A hostile input can be megabytes: the message shows its start and its length only.
        shown = repr(smiles) if len(smiles) <= 120 else f"{smiles[:100]!r}... ({len(smiles):,} characters)"
        super().__init__(f"invalid SMILES {shown}: {reason}")
        self.smiles = smiles
        self.reason = reason


class InvalidTarget(ModelError, ValueError):
    """Training targets a learner cannot represent stably: non-finite, or beyond
    :data:`STABLE_ABS_MAX` in magnitude."""


class NotFitted(ModelError, RuntimeError):
    """``predict`` was called on a learner that has seen no data."""


class UnknownName(ModelError, KeyError):
    """A learner or policy name that is not registered."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
        self.kind = kind
        self.name = name

    def __str__(self) -> str:  # KeyError would quote the whole message otherwise
        return str(self.args[0])
