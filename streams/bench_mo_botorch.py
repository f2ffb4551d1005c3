"""``labloop bench mo --reference botorch``: BoTorch's qNEHVI on the same pool, features, seeds
and protocol as labloop, for the side-by-side columns. BoTorch is an optional benchmark
dependency (``pip install botorch``); nothing else of labloop imports it.

The model is BoTorch's default: one ``SingleTaskGP`` per column (objectives and constraints) on
the same Morgan count fingerprints, scaled to [0, 1], outcomes standardized, hyperparameters fit
by marginal likelihood each round. The acquisition is ``qLogNoisyExpectedHypervolumeImprovement``
(qNEHVI) over the unmeasured pool (``optimize_acqf_discrete``, sequential greedy), with the
constraints as BoTorch outcome constraints and the bench's reference point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labloop.streams.bench_al import BenchInputError

__all__ = ["botorch_seed"]


def botorch_seed(pool: Any, cfg: Any, truth: Any, seed: int, targets: list[int]) -> list[dict[str, float]]:
    """One seed of the protocol with BoTorch; rows as :func:`labloop.streams.bench_mo._labloop_seed`'s.

    Raises:
        BenchInputError: BoTorch is not installed.
    """
    try:
        import torch
        from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
        from botorch.acquisition.multi_objective.objective import IdentityMCMultiOutputObjective
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import ModelListGP, SingleTaskGP
        from botorch.models.transforms import Standardize
        from botorch.optim import optimize_acqf_discrete
        from gpytorch.mlls import SumMarginalLogLikelihood
    except ImportError as exc:
        raise BenchInputError(f"--reference botorch needs BoTorch: pip install botorch ({exc})") from None

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)  # the same initial design as labloop's run of this seed
    n = len(pool.smiles)
    X = torch.tensor(pool.X / max(1.0, float(pool.X.max())), dtype=torch.float64)
    m = len(cfg.objectives)
    cols = [c for c, _ in cfg.objectives] + [c.column for c in cfg.constraints]
    # BoTorch maximizes: objectives in maximization space (minimized ones negated), constraints raw.
    Y = np.column_stack([pool.values[c] * (1.0 if mx else -1.0) for c, mx in cfg.objectives]
                        + [pool.values[c.column] for c in cfg.constraints])
    Yt = torch.tensor(Y, dtype=torch.float64)
    acquired = rng.choice(n, targets[0], replace=False)
    out = [{"n_acquired": float(acquired.size), **truth.measure(acquired)}]
    ref = torch.tensor(-truth.ref, dtype=torch.float64)  # the bench's reference, in maximization space
    def feasible_at_most_zero(j: int, bound: float, upper: bool) -> Any:  # BoTorch: feasible where <= 0
        return lambda Z: (Z[..., j] - bound) if upper else (bound - Z[..., j])

    constraints: list[Any] = [feasible_at_most_zero(m + k, c.bound, c.upper) for k, c in enumerate(cfg.constraints)]
    for t in targets[1:]:
        idx = torch.tensor(acquired, dtype=torch.long)
        models = [SingleTaskGP(X[idx], Yt[idx, j : j + 1], outcome_transform=Standardize(m=1)) for j in range(len(cols))]
        model = ModelListGP(*models)
        fit_gpytorch_mll(SumMarginalLogLikelihood(model.likelihood, model))
        acq = qLogNoisyExpectedHypervolumeImprovement(
            model=model, ref_point=ref.tolist(), X_baseline=X[idx], prune_baseline=True,
            objective=IdentityMCMultiOutputObjective(outcomes=list(range(m))),
            constraints=constraints or None)
        cand = np.setdiff1d(np.arange(n), acquired)
        chosen, _ = optimize_acqf_discrete(acq, q=t - acquired.size, choices=X[torch.tensor(cand)], unique=True)
        # optimize_acqf_discrete returns rows of `choices`: map them back to pool indices (two
        # compounds can share a fingerprint, so each row takes the first match not taken yet).
        Xc = X[torch.tensor(cand)]
        picks: list[int] = []
        for row in chosen:
            matches = [int(cand[i]) for i in torch.nonzero((Xc == row).all(dim=1)).flatten().tolist()]
            picks.append(next(i for i in matches if i not in picks))
        acquired = np.concatenate([acquired, np.asarray(picks, dtype=np.int64)])
        out.append({"n_acquired": float(acquired.size), **truth.measure(acquired)})
    return out
