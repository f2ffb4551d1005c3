"""Online learners with uncertainty: one contract (:class:`OnlineLearner`: ``update`` +
``predict``), and the registry of the implementations a campaign names.

* ``gp``: :class:`~labloop.models.gp.TanimotoGP`, exact, then Nyström/DTC past ``exact_max``;
* ``ensemble``: :class:`~labloop.models.ensemble.DeepEnsemble`.

Every learner treats the objective as *higher is better*; the campaign layer negates a
minimized objective before it gets here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from labloop.models.base import STABLE_ABS_MAX, OnlineLearner, Standardizer, check_targets, default_device
from labloop.models.ensemble import DeepEnsemble
from labloop.models.errors import UnknownName
from labloop.models.gp import TanimotoGP
from labloop.models.rows import RowPacker, pack_rows, unpack_rows

__all__ = ["LEARNERS", "STABLE_ABS_MAX", "DeepEnsemble", "OnlineLearner", "RowPacker", "Standardizer", "TanimotoGP",
           "check_targets", "default_device", "make_learner", "pack_rows", "unpack_rows"]

LEARNERS: dict[str, Callable[..., OnlineLearner]] = {"gp": TanimotoGP, "ensemble": DeepEnsemble}


def make_learner(name: str, device: str | None = None, **kwargs: Any) -> OnlineLearner:
    """Build a registered learner by name (``"gp"`` or ``"ensemble"``)."""
    try:
        factory = LEARNERS[name]
    except KeyError:
        raise UnknownName("learner", name, list(LEARNERS)) from None
    return factory(device=device, **kwargs)
