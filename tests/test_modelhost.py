"""The model process: a campaign's learner in a child process behaves as the same learner in-process."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from labloop.models.gp_nystrom import NystromFit
from labloop.models.learners import make_learner
from labloop.models.loop import PoolState
from labloop.models.state import dumps, loads
from labloop.streams.modelhost import ModelHost, ModelHostError, RemoteLearner


def _pool(rng: np.random.Generator, n: int, d: int = 128) -> np.ndarray:
    return rng.poisson(0.15, (n, d)).astype(np.float32)  # count-fingerprint-like rows


def _state(X: np.ndarray) -> PoolState:
    ps = PoolState(X, maximize=True, learner="gp", policy="ucb")
    # small enough to pass through the exact GP into the Nystrom path (and a landmark re-draw) in a few updates
    ps.learner = make_learner("gp", device="cpu", exact_max=40, landmarks=16, background_redraw=False)
    return ps


@pytest.fixture()
def host() -> Iterator[ModelHost]:
    h = ModelHost(threads=1)
    yield h
    h.close()


def _step(states: list[PoolState], rng: np.random.Generator, k: int) -> None:
    idx = rng.integers(0, states[0].size, k)
    y = rng.normal(size=k)
    for s in states:
        s.observe(idx, y)
        work = s.take_new()
        assert work is not None
        s.commit(s.fit(*work))


def test_remote_learner_predicts_exactly_as_the_local_one(host: ModelHost) -> None:
    rng = np.random.default_rng(0)
    X = _pool(rng, 300)
    local, remote = _state(X), _state(X)
    remote.learner = host.adopt("c1", remote.learner)
    assert isinstance(remote.learner, RemoteLearner)
    for step in range(6):
        _step([local, remote], rng, 30)
        if step == 2:  # the pool grows between fits: the child receives only the new rows
            extra = _pool(rng, 50)
            local.add(extra)
            remote.add(extra)
        assert remote.learner.n_seen == local.learner.n_seen
        (lm, ls), (rm, rs) = local.predict_pool(), remote.predict_pool()
        np.testing.assert_allclose(rm, lm, rtol=0, atol=1e-9)
        np.testing.assert_allclose(rs, ls, rtol=0, atol=1e-9)
    assert isinstance(local.learner._fit, NystromFit)  # both paths were exercised


def test_checkpointed_remote_learner_moves_into_a_new_process(host: ModelHost) -> None:
    rng = np.random.default_rng(1)
    X = _pool(rng, 200)
    local, remote = _state(X), _state(X)
    remote.learner = host.adopt("c1", remote.learner)
    for _ in range(3):
        _step([local, remote], rng, 25)
    state = remote.state_dict(learner=False)
    state["learner"] = remote.learner.state_dict()  # what a checkpoint holds: the child's learner, as data
    restored = PoolState.from_state(loads(dumps(state)), device="cpu")
    assert not isinstance(restored.learner, RemoteLearner) and restored.learner.n_seen == local.learner.n_seen
    other = ModelHost(threads=1)
    try:
        restored.learner = other.adopt("c1", restored.learner)
        assert restored.learner.n_seen == local.learner.n_seen
        _step([local, restored], rng, 25)  # it keeps learning where it stopped
        np.testing.assert_allclose(restored.predict_pool()[0], local.predict_pool()[0], rtol=0, atol=1e-9)
    finally:
        other.close()


def test_errors_in_the_child_are_raised_in_the_worker(host: ModelHost) -> None:
    rng = np.random.default_rng(2)
    ps = _state(_pool(rng, 50))
    ps.learner = host.adopt("c1", ps.learner)
    with pytest.raises(ValueError, match="NaN or infinity"):
        ps.learner.update_from_pool(ps.X, np.array([np.nan]), np.array([3]))
    _step([ps], rng, 10)  # the child survived its error


def test_a_dead_model_process_is_a_named_error(host: ModelHost) -> None:
    rng = np.random.default_rng(3)
    ps = _state(_pool(rng, 50))
    ps.learner = host.adopt("c1", ps.learner)
    host._proc.kill()
    host._proc.wait()
    assert not host.alive()
    with pytest.raises(ModelHostError, match=r"model process died \(exit code -9\).*'c1'"):
        _step([ps], rng, 10)


def test_a_deferred_snapshot_holds_the_learner_as_it_was_when_asked(host: ModelHost) -> None:
    """A checkpoint asks for the learner's state under the campaign's lock and collects it after
    it: a fit asked for in between does not leak into the snapshot (the child answers in order)."""
    rng = np.random.default_rng(4)
    ps = _state(_pool(rng, 120))
    ps.learner = host.adopt("c1", ps.learner)
    _step([ps], rng, 20)
    assert isinstance(ps.learner, RemoteLearner)
    asked = ps.learner.predict(ps.X)
    state = ps.learner.request_state()
    without = ps.state_dict(learner=False)
    _step([ps], rng, 20)  # the next fit, asked for after the state
    later = ps.learner.predict(ps.X)
    with pytest.raises(ValueError, match="without its learner"):
        PoolState.from_state(without, device="cpu")
    restored = PoolState.from_state(loads(dumps(without)), device="cpu", learner=state.result())
    other = ModelHost(threads=1)
    try:
        restored.learner = other.adopt("c1", restored.learner)
        got = restored.learner.predict(restored.X)
        np.testing.assert_allclose(got[0], asked[0], rtol=0, atol=1e-9)
        assert np.abs(got[0] - later[0]).max() > 1e-6
    finally:
        other.close()


def test_state_dict_round_trip_moves_a_learner_between_processes(host: ModelHost) -> None:
    rng = np.random.default_rng(5)
    ps = _state(_pool(rng, 80))
    ps.learner = host.adopt("c1", ps.learner)
    _step([ps], rng, 15)
    assert isinstance(ps.learner, RemoteLearner)
    copy = make_learner("gp", device="cpu")
    copy.load_state_dict(loads(dumps(ps.learner.state_dict())))
    assert copy.n_seen == ps.learner.n_seen
    with pytest.raises(ModelHostError, match="already in a model process"):
        host.adopt("c2", ps.learner)
    other = ModelHost(threads=1)
    try:
        moved = other.adopt("c1", copy)
        np.testing.assert_allclose(moved.predict(ps.X)[0], ps.learner.predict(ps.X)[0], rtol=0, atol=1e-9)
    finally:
        other.close()
