"""Acquisition policies: which candidates to measure next.

A policy maximizes; the campaign layer negates a minimized objective first.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import numpy as np

from labloop.models.errors import UnknownName

__all__ = ["POLICIES", "Greedy", "Policy", "RandomPolicy", "Thompson", "UCB", "make_policy"]


class Policy(abc.ABC):
    """Pick ``k`` candidates out of ``n``.

    ``select(mean, std, pending, k)``: ``mean`` and ``std`` are length-``n``
    predictions (higher mean is better); ``pending`` is a length-``n`` bool mask
    of candidates that must not be picked (measured, in flight or failed).
    Returns at most ``k`` distinct indices into ``[0, n)``, best first, none of
    them pending; fewer only when fewer than ``k`` are available.
    """

    name: str = "policy"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict[str, Any]:
        """The random stream's position (JSON values): a restored policy draws what this one would."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

    def select(self, mean: np.ndarray, std: np.ndarray, pending: np.ndarray, k: int) -> np.ndarray:
        """Indices of the chosen candidates (see the class docstring)."""
        return self.select_scored(mean, std, pending, k)[0]

    def select_scored(self, mean: np.ndarray, std: np.ndarray, pending: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`select`, also returning the acquisition value of each pick."""
        mean = np.asarray(mean, dtype=np.float64)
        std = np.nan_to_num(np.asarray(std, dtype=np.float64), nan=0.0, posinf=0.0).clip(min=0.0)
        if mean.shape != std.shape or mean.shape != pending.shape:
            raise ValueError(f"mean {mean.shape}, std {std.shape} and pending {pending.shape} must match")
        available = np.flatnonzero(~pending)
        if k <= 0 or available.size == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        score = self.score(np.nan_to_num(mean[available], nan=-np.inf), std[available])
        order = np.lexsort((available, -score))[:k]  # ties broken by index: deterministic
        return available[order].astype(np.int64), score[order]

    @abc.abstractmethod
    def score(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        """Acquisition value per available candidate, higher is picked first."""


class Greedy(Policy):
    """Exploit: the best predicted mean."""

    name = "greedy"

    def score(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return mean


class UCB(Policy):
    """Upper confidence bound ``mean + beta * std``."""

    name = "ucb"

    def __init__(self, seed: int = 0, beta: float = 2.0) -> None:
        super().__init__(seed)
        self.beta = beta

    def score(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return mean + self.beta * std


class Thompson(Policy):
    """One posterior draw per candidate (independent marginals)."""

    name = "thompson"

    def score(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return mean + std * self.rng.standard_normal(mean.shape[0])


class RandomPolicy(Policy):
    """Uniform at random: the baseline every campaign must beat."""

    name = "random"

    def score(self, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        return np.asarray(self.rng.random(mean.shape[0]))


POLICIES: dict[str, Callable[..., Policy]] = {p.name: p for p in (Greedy, UCB, Thompson, RandomPolicy)}


def make_policy(name: str, seed: int = 0) -> Policy:
    """Build a registered policy: ``greedy``, ``ucb``, ``thompson`` or ``random``."""
    try:
        return POLICIES[name](seed=seed)
    except KeyError:
        raise UnknownName("policy", name, list(POLICIES)) from None
