"""Campaign pool state and MolPAL's measures."""

from __future__ import annotations

import numpy as np
import pytest

from labloop.models import PoolState, TopK, round_targets, topk_measures
from labloop.models.loop import AVAILABLE, FAILED, MEASURED, PENDING


def test_round_targets_match_molpal_enamine() -> None:
    # MolPAL's published n_acquired on the 10,560-compound pool
    assert round_targets(10560, 0.01, 0.01, 5) == [105, 211, 316, 422, 528, 633]


def test_topk_scores_found_is_tie_aware_multiset_overlap() -> None:
    values = [-10.0, -9.5, -9.5, -9.5, -8.0, -7.0]
    top = TopK(values, k=3, minimize=True)
    assert top.values.tolist() == [-10.0, -9.5, -9.5]
    # any two of the tied -9.5 count, whichever compounds carried them
    assert topk_measures(top, [-9.5, -9.5, -7.0])["pct_topk_scores_found"] == pytest.approx(200 / 3)
    assert topk_measures(top, [-10.0, -9.5, -9.5, -9.5])["pct_topk_scores_found"] == 100.0
    assert topk_measures(top, [])["pct_topk_scores_found"] == 0.0


def test_topk_maximize_and_nan_ignored() -> None:
    top = TopK([1.0, np.nan, 5.0, 3.0], k=2, minimize=False, keys=["a", "b", "c", "d"])
    m = topk_measures(top, [5.0, 1.0], ["c", "a"])
    assert m["pct_topk_scores_found"] == 50.0 and m["pct_topk_smiles_found"] == 50.0
    assert m["topk_avg_pct_of_true"] == pytest.approx(100 * 3.0 / 4.0)


def test_pool_state_never_requests_twice_and_learns() -> None:
    rng = np.random.default_rng(0)
    X = rng.poisson(0.3, size=(120, 32)).astype(np.float32)
    truth = X[:, :4].sum(1)
    st = PoolState(X, maximize=True, learner="gp", policy="greedy", seed=0, device="cpu")
    seen: set[int] = set()
    for k in (10, 10, 10):
        st.retrain()
        p = st.propose(k)
        assert not seen & set(p.index.tolist())
        seen |= set(p.index.tolist())
        assert (st.status[p.index] == PENDING).all()
        st.observe(p.index[:-1], truth[p.index[:-1]])
        st.fail(p.index[-1:])
    assert st.count(MEASURED) == 27 and st.count(FAILED) == 3 and st.count(PENDING) == 0
    assert st.count(AVAILABLE) == 90
    assert st.model_version == 2
    # model-guided batches beat the random start on the true objective
    assert truth[p.index].mean() > truth.mean()


def test_release_returns_only_pending() -> None:
    st = PoolState(np.eye(4, dtype=np.float32), maximize=True)
    st.mark_pending(np.array([0, 1]))
    st.observe(np.array([1]), np.array([1.0]))
    st.release(np.array([0, 1]))
    assert st.status.tolist() == [AVAILABLE, MEASURED, AVAILABLE, AVAILABLE]


@pytest.mark.parametrize("exact_max", [700, 30], ids=["exact", "nystrom"])
def test_a_stored_pool_predicts_the_same_and_goes_on_learning(exact_max: int) -> None:
    """Checkpoints store the pool as data: the restored copy, refitted from its stored training
    set, predicts as the original and then learns only what is new, exactly as the original does."""
    from labloop.models.learners import make_learner
    from labloop.models.state import dumps, loads

    rng = np.random.default_rng(0)
    X = (rng.random((400, 64)) < 0.1).astype(np.float32) * rng.integers(1, 4, (400, 64))
    y = X[:, :8].sum(1)
    p = PoolState(X, maximize=True, learner="gp", policy="ucb")
    p.learner = make_learner("gp", device="cpu", exact_max=exact_max, landmarks=16, background_redraw=False)
    p.observe(np.arange(60), y[:60])
    p.retrain()
    q = PoolState.from_state(loads(dumps(p.state_dict())), device="cpu")
    assert q.learner.n_seen == 60 and q.model_version == p.model_version
    np.testing.assert_array_equal(q.X, p.X)
    np.testing.assert_array_equal(q.status, p.status)
    np.testing.assert_allclose(q.predict_pool()[0], p.predict_pool()[0], rtol=0, atol=1e-9)
    np.testing.assert_allclose(q.predict_pool()[1], p.predict_pool()[1], rtol=1e-9)
    q.observe(np.arange(60, 80), y[60:80])
    assert q.retrain() and q.learner.n_seen == 80
    p.observe(np.arange(60, 80), y[60:80])
    p.retrain()
    np.testing.assert_allclose(q.predict_pool()[0], p.predict_pool()[0], rtol=0, atol=1e-9)
    # The policies' random streams resumed where they were: both choose the same next batch.
    assert q.propose(5).index.tolist() == p.propose(5).index.tolist()
    assert not set(q.propose(5).index.tolist()) & set(range(80))  # measured compounds stay measured
