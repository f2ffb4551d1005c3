"""The contract every learner and every policy must pass (generated per implementation)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from labloop.models import OnlineLearner, make_learner, make_policy
from labloop.models.acquisition import POLICIES
from labloop.models.errors import NotFitted, UnknownName
from labloop.models.learners import LEARNERS
from labloop.models.state import dumps, loads
from labloop.streams.modelhost import ModelHost

# Small but real settings so the suite stays fast on 2 CPU cores.
FAST: dict[str, dict[str, int]] = {"gp": {}, "ensemble": {"n_members": 2, "hidden": 32, "epochs": 15},
                                   # the GP past its exact range: the Nyström path passes the same contract
                                   "gp-nystrom": {"exact_max": 30, "landmarks": 16}}
assert set(FAST) - {"gp-nystrom"} == set(LEARNERS), "every registered learner needs a contract entry"


def _data(n: int = 60, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.poisson(0.3, size=(n, d)).astype(np.float32)
    y = X[:, :8].sum(1) - 0.5 * X[:, 8:16].sum(1) + rng.normal(0, 0.1, n)
    return X, y


def learner(name: str) -> OnlineLearner:
    return make_learner(name.split("-")[0], device="cpu", **FAST[name])


class InModelProcess(OnlineLearner):
    """A learner living in a model process (labloop.streams.modelhost), seen through the general
    contract: rows it is given join a growing pool, as a campaign's do, and the worker's stand-in
    (RemoteLearner) updates and scores by pool position."""

    def __init__(self, host: ModelHost, local: OnlineLearner) -> None:
        self.host, self.name = host, local.name
        self.remote = host.adopt(f"c{id(self)}", local)
        self.pool = np.zeros((0, 0), dtype=np.float32)

    def _join(self, X: np.ndarray) -> np.ndarray:
        start = self.pool.shape[0]
        self.pool = X.copy() if start == 0 else np.concatenate([self.pool, X])
        return np.arange(start, self.pool.shape[0])

    def update(self, X: np.ndarray, y: np.ndarray, keys: np.ndarray | None = None) -> None:
        X = np.asarray(X, dtype=np.float32)
        if X.shape[0] != np.asarray(y).reshape(-1).shape[0]:
            raise ValueError("X and y differ in length")
        if X.shape[0]:
            keys = self._join(X)
            self.remote.update_from_pool(self.pool, np.asarray(y), keys)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = self._join(np.asarray(X, dtype=np.float32))
        mean, std = self.remote.predict(self.pool)
        return mean[at], std[at]

    @property
    def n_seen(self) -> int:
        return self.remote.n_seen

    def state_dict(self) -> dict[str, object]:
        return self.remote.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        local = make_learner(self.name, device="cpu")
        local.load_state_dict(state)
        self.remote = self.host.adopt(f"c{id(self)}-loaded", local)


@pytest.fixture(scope="module")
def host() -> Iterator[ModelHost]:
    h = ModelHost(threads=1)
    yield h
    h.close()


@pytest.fixture(params=[*sorted(FAST), "gp-in-model-process"])
def make(request: pytest.FixtureRequest) -> Callable[[], OnlineLearner]:
    if request.param == "gp-in-model-process":
        h = request.getfixturevalue("host")
        return lambda: InModelProcess(h, learner("gp"))
    return lambda: learner(request.param)


def test_predict_before_update_is_named(make: Callable[[], OnlineLearner]) -> None:
    with pytest.raises(NotFitted):
        make().predict(np.zeros((2, 64), np.float32))


def test_shapes_and_finite_std(make: Callable[[], OnlineLearner]) -> None:
    X, y = _data()
    m = make()
    m.update(X[:40], y[:40])
    mean, std = m.predict(X[40:])
    assert mean.shape == std.shape == (20,)
    assert np.isfinite(mean).all() and (std >= 0).all() and np.isfinite(std).all()
    assert m.n_seen == 40


def test_learns_signal(make: Callable[[], OnlineLearner]) -> None:
    X, y = _data(200)
    m = make()
    m.update(X[:150], y[:150])
    mean, _ = m.predict(X[150:])
    assert np.corrcoef(mean, y[150:])[0, 1] > 0.5


def test_incremental_updates_accumulate(make: Callable[[], OnlineLearner]) -> None:
    X, y = _data()
    m = make()
    m.update(X[:20], y[:20])
    m.update(X[20:40], y[20:40])
    m.update(X[:0], y[:0])  # an empty batch is a no-op
    assert m.n_seen == 40


def test_inputs_not_mutated(make: Callable[[], OnlineLearner]) -> None:
    X, y = _data()
    X0, y0 = X.copy(), y.copy()
    m = make()
    m.update(X, y)
    m.predict(X)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(y, y0)


def test_seeded_determinism(make: Callable[[], OnlineLearner]) -> None:
    X, y = _data()
    a, b = make(), make()
    a.update(X[:40], y[:40])
    b.update(X[:40], y[:40])
    for u, v in zip(a.predict(X[40:]), b.predict(X[40:]), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_state_round_trip(make: Callable[[], OnlineLearner]) -> None:
    """State goes through the checkpoint format (arrays and JSON, never pickle) and comes back whole."""
    X, y = _data()
    a = make()
    a.update(X[:40], y[:40])
    b = make()
    b.load_state_dict(loads(dumps(a.state_dict())))
    assert b.n_seen == a.n_seen
    for u, v in zip(a.predict(X[40:]), b.predict(X[40:]), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_no_nan_on_degenerate_input(make: Callable[[], OnlineLearner]) -> None:
    X = np.zeros((10, 64), np.float32)  # all-zero fingerprints, constant target
    X[5:, 0] = 1.0  # and exact duplicates
    m = make()
    m.update(X, np.full(10, 3.0))
    mean, std = m.predict(np.vstack([X, np.ones((2, 64), np.float32)]))
    assert np.isfinite(mean).all() and np.isfinite(std).all()


def test_rejects_non_finite_targets(make: Callable[[], OnlineLearner]) -> None:
    X, y = _data(10)
    y[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        make().update(X, y)


def test_unknown_names_are_named_errors() -> None:
    with pytest.raises(UnknownName, match="known: ensemble, gp"):
        make_learner("svm")
    with pytest.raises(UnknownName, match="policy"):
        make_policy("ei")


@pytest.mark.parametrize("name", sorted(POLICIES))
class TestPolicyContract:
    def test_never_picks_pending_and_returns_distinct(self, name: str) -> None:
        rng = np.random.default_rng(1)
        mean, std = rng.normal(size=50), rng.random(50)
        pending = np.zeros(50, bool)
        pending[::3] = True
        idx = make_policy(name, seed=0).select(mean, std, pending, 10)
        assert len(idx) == 10 == len(set(idx.tolist()))
        assert not pending[idx].any()

    def test_fewer_available_than_k(self, name: str) -> None:
        pending = np.ones(8, bool)
        pending[[2, 5]] = False
        idx = make_policy(name).select(np.zeros(8), np.ones(8), pending, 5)
        assert sorted(idx.tolist()) == [2, 5]
        assert make_policy(name).select(np.zeros(3), np.ones(3), np.ones(3, bool), 2).size == 0

    def test_seeded_determinism_and_inputs_untouched(self, name: str) -> None:
        rng = np.random.default_rng(2)
        mean, std, pending = rng.normal(size=30), rng.random(30), np.zeros(30, bool)
        copies = (mean.copy(), std.copy(), pending.copy())
        a = make_policy(name, seed=7).select(mean, std, pending, 5)
        b = make_policy(name, seed=7).select(mean, std, pending, 5)
        np.testing.assert_array_equal(a, b)
        for u, v in zip((mean, std, pending), copies, strict=True):
            np.testing.assert_array_equal(u, v)

    def test_nan_predictions_do_not_crash(self, name: str) -> None:
        mean = np.array([np.nan, 1.0, 2.0, np.nan])
        std = np.array([np.nan, 0.1, np.inf, 0.0])
        idx = make_policy(name).select(mean, std, np.zeros(4, bool), 4)
        assert sorted(idx.tolist()) == [0, 1, 2, 3]


def test_greedy_and_ucb_rank_as_defined() -> None:
    mean, std, none = np.array([1.0, 2.0, 0.0]), np.array([0.0, 0.0, 2.0]), np.zeros(3, bool)
    assert make_policy("greedy").select(mean, std, none, 3).tolist() == [1, 0, 2]
    assert make_policy("ucb").select(mean, std, none, 1).tolist() == [2]  # 0 + 2*2 > 2


def test_gp_treats_repeated_compounds_as_replicates() -> None:
    X, y = _data(30)
    gp = learner("gp")
    gp.update(X[:20], y[:20], keys=np.arange(20))
    gp.update(X[:5], y[:5] + 2.0, keys=np.arange(5))  # the same five compounds measured again, 2 units higher
    assert gp.n_seen == 25
    assert gp._X.shape[0] == 20  # distinct compounds
    np.testing.assert_allclose(gp._y[:5], y[:5] + 1.0)  # the mean of both measurements
    gp.update(X[:5], y[:5])  # without keys, rows are new compounds
    assert gp._X.shape[0] == 25
    clone = learner("gp")
    clone.load_state_dict(loads(dumps(gp.state_dict())))
    clone.update(X[:1], y[:1] + 4.0, keys=np.array([0]))  # keys survive a round trip
    assert clone._X.shape[0] == 25


def test_nystrom_tracks_the_exact_gp() -> None:
    X, y = _data(400, d=64, seed=3)
    exact = make_learner("gp", device="cpu")
    approx = make_learner("gp", device="cpu", exact_max=100, landmarks=150)
    for m in (exact, approx):
        m.update(X[:300], y[:300])
    (me, _), (ma, sa) = exact.predict(X[300:]), approx.predict(X[300:])
    assert np.corrcoef(me, ma)[0, 1] > 0.9
    assert np.corrcoef(ma, y[300:])[0, 1] > 0.5
    assert (sa > 0).all()


def test_gp_nystrom_statistics_stay_exact_through_background_landmark_redraws() -> None:
    """Accumulated DTC statistics, and landmarks re-drawn on the background thread while updates
    go on, give the same model as fitting every measurement from scratch on those landmarks."""
    from labloop.models.learners import TanimotoGP

    rng = np.random.default_rng(3)
    pool = (rng.random((600, 64)) < 0.15).astype(np.float32) * rng.integers(1, 4, (600, 64)).astype(np.float32)
    truth = pool[:, :6].sum(1)
    g = TanimotoGP(device="cpu", exact_max=20, landmarks=16)
    redraws, background = 0, 0
    for _ in range(40):
        keys = rng.integers(0, 600, 25)  # new compounds and replicates
        job = g.nystrom.redraw
        if job is not None:
            job.future.result()  # let the thread finish: the next update switches
        version = g.nystrom.z_version
        g.update(pool[keys], truth[keys] + rng.normal(0, 0.1, 25), keys)
        g.predict(pool)
        redraws += g.nystrom.z_version != version
        background += g.nystrom.redraw is not None
    assert redraws >= 3 and background >= 1  # the first draw, then redraws prepared on the thread
    scratch = TanimotoGP(device="cpu", exact_max=20, landmarks=16)
    scratch.load_state_dict(g.state_dict())  # same rows, counts and landmarks, statistics from scratch
    for a, b in zip(g.predict(pool), scratch.predict(pool), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gp_pool_variance_updated_incrementally_equals_a_full_rescoring() -> None:
    """Updates of a few compounds at a time rescore the pool's variance with the Woodbury identity
    (an m x L x k product instead of m x L x L); it must equal the full product."""
    from labloop.models.learners import TanimotoGP

    rng = np.random.default_rng(5)
    pool = (rng.random((800, 64)) < 0.15).astype(np.float32) * rng.integers(1, 4, (800, 64)).astype(np.float32)
    truth = pool[:, :6].sum(1)
    g = TanimotoGP(device="cpu", exact_max=20, landmarks=32, background_redraw=False)
    g.update(pool[:40], truth[:40], np.arange(40))
    g.predict(pool)
    incremental = 0
    for _ in range(45):
        keys = rng.integers(0, 800, 6)  # a few compounds, replicates among them
        g.update(pool[keys], truth[keys] + rng.normal(0, 0.1, 6), keys)
        mean, std = g.predict(pool)
        assert g.nystrom.quadratic is not None
        incremental += g.nystrom.quadratic.steps > 0
        full = copy.copy(g)  # the same fit, the variance in full
        full.nystrom = copy.copy(g.nystrom)
        full.nystrom.quadratic = None
        mean_f, std_f = full.predict(pool)
        np.testing.assert_allclose(mean, mean_f, rtol=0, atol=0)
        np.testing.assert_allclose(std, std_f, rtol=1e-4, atol=1e-6)
    assert incremental >= 20  # most updates took the incremental path (a ratio change or the periodic full one resets it)


def test_gp_rows_reserved_for_a_pool_are_never_copied_again() -> None:
    """With the pool's size reserved, new training rows land in one buffer (growing it copied every
    row so far: updates that grew it past 4,096 and 8,192 rows took 86 and 177 ms), and the model
    is the same as without."""
    from labloop.models.learners import TanimotoGP

    rng = np.random.default_rng(7)
    pool = (rng.random((600, 64)) < 0.15).astype(np.float32) * rng.integers(1, 4, (600, 64)).astype(np.float32)
    truth = pool[:, :6].sum(1)
    kept, grown = (TanimotoGP(device="cpu", exact_max=20, landmarks=16, background_redraw=False) for _ in range(2))
    kept.update(pool[:5], truth[:5], np.arange(5))
    kept.reserve(600)
    buf = kept._buf
    grown.update(pool[:5], truth[:5], np.arange(5))
    for _ in range(30):
        keys = rng.integers(0, 600, 40)
        for g in (kept, grown):
            g.update(pool[keys], truth[keys], keys)
    assert kept._buf is buf and kept._X.base is buf and kept._X.shape[0] > 300
    assert grown._buf is not buf
    for a, b in zip(kept.predict(pool), grown.predict(pool), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_targets_past_the_stable_bound_are_refused_and_predictions_stay_finite(make: Callable[[], OnlineLearner]) -> None:
    from labloop.models.errors import InvalidTarget
    from labloop.models.learners import STABLE_ABS_MAX

    X, y = _data()
    m = make()
    for bad in (1e308, -1e308, np.nan, np.inf, STABLE_ABS_MAX * 1.5):
        with pytest.raises(InvalidTarget):
            m.update(X[:2], np.array([1.0, bad]))
    assert m.n_seen == 0  # a refused batch teaches nothing
    # At the bound itself, beside ordinary values: learned, and every prediction finite.
    y = y.copy()
    y[:3] = [STABLE_ABS_MAX, -STABLE_ABS_MAX, STABLE_ABS_MAX]
    m.update(X[:40], y[:40])
    mean, std = m.predict(X)
    assert np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()


def test_gp_restored_mid_landmark_redraw_predicts_as_it_was() -> None:
    """A checkpoint can catch the GP while new landmarks are prepared in the background: the
    restored learner keeps the landmarks the model was using, so it predicts the same."""
    from labloop.models.learners import TanimotoGP

    rng = np.random.default_rng(9)
    pool = (rng.random((900, 64)) < 0.15).astype(np.float32) * rng.integers(1, 4, (900, 64)).astype(np.float32)
    truth = pool[:, :6].sum(1)
    g = TanimotoGP(device="cpu", exact_max=20, landmarks=16)
    for k in range(0, 800, 100):
        keys = np.arange(k, k + 100)
        g.update(pool[keys], truth[keys], keys)
        g.predict(pool)
        if g.nystrom.redraw is not None:
            break
    assert g.nystrom.redraw is not None  # caught mid-redraw
    restored = TanimotoGP(device="cpu")
    restored.load_state_dict(loads(dumps(g.state_dict())))
    for a, b in zip(g.predict(pool), restored.predict(pool), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
