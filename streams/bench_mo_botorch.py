"""``labloop bench mo --reference botorch``: BoTorch's qParEGO on the same pool, features, seeds
and protocol as labloop, for the side-by-side columns. BoTorch is an optional benchmark
dependency (``pip install botorch``); nothing else of labloop imports it.

The model is BoTorch's default: one ``SingleTaskGP`` per column (objectives and constraints) on
the same Morgan count fingerprints, scaled to [0, 1], outcomes standardized, hyperparameters fit
by marginal likelihood each round. The acquisition is qParEGO as BoTorch builds it: an augmented
Chebyshev scalarization (``get_chebyshev_scalarization``) with random weights, under
Monte Carlo expected improvement over the best scalarized feasible measured value, counting
only samples that meet the constraints; picked over the unmeasured pool one compound at a time,
each pick with new weights (ParEGO's batch; pending picks are not fantasized). The improvement
is computed from BoTorch's posterior of all candidates at once, which for one candidate at a
time is what ``qExpectedImprovement`` computes. Measured here (docs/benchmarks.md): qNEHVI on the same models took
over 10 minutes for one seed of two rounds, and ``qLogNParEGO`` (noisy, joint with the measured
baseline) 2 to 5 s per 256 candidates, about an hour a seed; this form takes seconds a round.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from labloop.streams.bench_al import BenchInputError

__all__ = ["botorch_seed"]

_MC_SAMPLES = 256  # posterior samples per candidate for the expected improvement


def botorch_seed(pool: Any, cfg: Any, truth: Any, seed: int, targets: list[int]) -> list[dict[str, float]]:
    """One seed of the protocol with BoTorch; rows as :func:`labloop.streams.bench_mo._labloop_seed`'s.

    Raises:
        BenchInputError: BoTorch is not installed.
    """
    try:
        import torch
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import ModelListGP, SingleTaskGP
        from botorch.models.transforms import Standardize
        from botorch.utils.multi_objective.scalarization import get_chebyshev_scalarization
        from botorch.utils.sampling import sample_simplex
        from gpytorch.mlls import SumMarginalLogLikelihood
    except ImportError as exc:
        raise BenchInputError(f"--reference botorch needs BoTorch: pip install botorch ({exc})") from None

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)  # the same initial design as labloop's run of this seed
    n = len(pool.smiles)
    hist = bool(pool.history)
    X_all = np.vstack([pool.X, pool.X_history]) if hist else pool.X  # rows n.. : the history (labloop's, too)
    X = torch.tensor(X_all / max(1.0, float(X_all.max())), dtype=torch.float64)
    m = len(cfg.objectives)
    cols = [c for c, _ in cfg.objectives] + [c.column for c in cfg.constraints]
    # BoTorch maximizes: objectives in maximization space (minimized ones negated), constraints raw.
    def column(c: str) -> np.ndarray:
        return np.concatenate([pool.values[c], pool.history[c]]) if hist else pool.values[c]

    Y = np.column_stack([column(c) * (1.0 if mx else -1.0) for c, mx in cfg.objectives]
                        + [column(c.column) for c in cfg.constraints])
    # Per column, the history rows that measure it: trained on with every round's acquisitions.
    known = [np.flatnonzero(np.isfinite(Y[n:, j])) + n for j in range(Y.shape[1])]
    Yt = torch.tensor(Y, dtype=torch.float64)
    acquired = rng.choice(n, targets[0], replace=False)
    out = [{"n_acquired": float(acquired.size), **truth.measure(acquired)}]

    def feasible_at_most_zero(j: int, bound: float, upper: bool) -> Any:  # BoTorch: feasible where <= 0
        return lambda Z: (Z[..., j] - bound) if upper else (bound - Z[..., j])

    constraints: list[Any] = [feasible_at_most_zero(m + k, c.bound, c.upper) for k, c in enumerate(cfg.constraints)]
    for t in targets[1:]:
        idx = torch.tensor(acquired, dtype=torch.long)
        train = [torch.cat([idx, torch.tensor(known[j], dtype=torch.long)]) for j in range(len(cols))]
        models = [SingleTaskGP(X[tr], Yt[tr, j : j + 1], outcome_transform=Standardize(m=1)) for j, tr in enumerate(train)]
        model = ModelListGP(*models)
        fit_gpytorch_mll(SumMarginalLogLikelihood(model.likelihood, model))
        cand = np.setdiff1d(np.arange(n), acquired)
        # q = 1 per pick: the candidates' marginal posteriors once per round (BoTorch's batched
        # q-batch evaluation expands the 2,048-wide training inputs per candidate: ~10 s a pick).
        with torch.no_grad():
            post = model.posterior(X[torch.tensor(cand)])
            mean, sd = post.mean, post.variance.clamp_min(1e-12).sqrt()  # candidates x outputs
        Z = mean + sd * torch.randn(_MC_SAMPLES, *mean.shape, generator=torch.Generator().manual_seed(seed),
                                    dtype=torch.float64)  # samples x candidates x outputs (independent GPs)
        ok = torch.ones(Z.shape[:2], dtype=torch.bool)
        for con in constraints:
            ok &= con(Z) <= 0
        feas_obs = torch.ones(idx.shape[0], dtype=torch.bool)
        for con in constraints:
            feas_obs &= con(Yt[idx]) <= 0
        open_ = np.ones(cand.size, dtype=bool)
        picks: list[int] = []
        Y_obj = Yt[idx, :m]
        for _ in range(t - acquired.size):
            cheb = get_chebyshev_scalarization(sample_simplex(m, dtype=torch.float64).squeeze(0), Y_obj)
            best = cheb(Y_obj[feas_obs], None).max() if bool(feas_obs.any()) else cheb(Y_obj, None).min()
            # Expected improvement of the scalarization over the best measured, feasible samples only.
            vals = ((cheb(Z[..., :m], None) - best).clamp_min(0) * ok).mean(dim=0).numpy()
            vals[~open_] = -np.inf
            j = int(np.argmax(vals))
            open_[j] = False
            picks.append(int(cand[j]))
        acquired = np.concatenate([acquired, np.asarray(picks, dtype=np.int64)])
        out.append({"n_acquired": float(acquired.size), **truth.measure(acquired)})
    return out

