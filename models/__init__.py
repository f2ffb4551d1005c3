"""Pure compute for labloop: RDKit featurization, online learners, acquisition.

No Kafka, no database: everything here takes arrays and returns arrays.

The names below load their module on first use: the CLI, the sink and the dashboard import
``labloop.models`` submodules that need neither torch nor RDKit, and importing both took 2.3 s
of every ``labloop`` command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labloop.models.acquisition import Policy, make_policy
    from labloop.models.chem import FeatureSpec, featurize, parse_many, parse_smiles
    from labloop.models.errors import InvalidMolecule, ModelError
    from labloop.models.learners import OnlineLearner, default_device, make_learner
    from labloop.models.loop import PoolState, Proposal, round_targets
    from labloop.models.metrics import TopK, calibration, topk_measures

_WHERE = {
    "Policy": "acquisition", "make_policy": "acquisition",
    "FeatureSpec": "chem", "featurize": "chem", "parse_many": "chem", "parse_smiles": "chem",
    "InvalidMolecule": "errors", "ModelError": "errors",
    "OnlineLearner": "learners", "default_device": "learners", "make_learner": "learners",
    "PoolState": "loop", "Proposal": "loop", "round_targets": "loop",
    "TopK": "metrics", "calibration": "metrics", "topk_measures": "metrics",
}

__all__ = [
    "FeatureSpec", "InvalidMolecule", "ModelError", "OnlineLearner", "Policy", "PoolState", "Proposal",
    "TopK", "calibration", "default_device", "featurize", "make_learner", "make_policy", "parse_many",
    "parse_smiles", "round_targets", "topk_measures",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
