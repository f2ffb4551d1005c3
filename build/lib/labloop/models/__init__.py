"""Pure compute for labloop: RDKit featurization, online learners, acquisition.

No Kafka, no database: everything here takes arrays and returns arrays.
"""

from labloop.models.acquisition import Policy, make_policy
from labloop.models.chem import FeatureSpec, featurize, parse_many, parse_smiles
from labloop.models.errors import InvalidMolecule, ModelError
from labloop.models.learners import OnlineLearner, default_device, make_learner
from labloop.models.loop import PoolState, Proposal, round_targets
from labloop.models.metrics import TopK, calibration, topk_measures

__all__ = [
    "FeatureSpec", "InvalidMolecule", "ModelError", "OnlineLearner", "Policy", "PoolState", "Proposal",
    "TopK", "calibration", "default_device", "featurize", "make_learner", "make_policy", "parse_many",
    "parse_smiles", "round_targets", "topk_measures",
]
