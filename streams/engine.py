"""The campaign engine: the one writer of campaign state.

Every campaign event goes in through one method and what it makes the loop say comes out as
:class:`~labloop.streams.campaign.Emit` values: a definition, compounds, readings (single or a
plate), a robot's status, a person's decision on a proposed request, the expiry tick, a decision step (requests, or the final report) and a
finished model update. The Faust worker (:mod:`labloop.streams.worker`) consumes, batches, calls
the engine under the campaign's lock and sends what it returns; recovery
(:mod:`labloop.streams.recovery`) replays the log through the same methods and drops what they
would emit, plus two that only replay the loop's own outputs (:meth:`CampaignEngine.replay_request`,
:meth:`CampaignEngine.replay_model_update`). Nothing else writes a campaign's fields.

The engine knows no Kafka and no asyncio: it is tested alone, a whole campaign with no broker
(tests/test_engine.py). It is not thread-safe; the caller serializes calls per campaign.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from labloop.models.learners import OnlineLearner
from labloop.schemas import InvalidEvent
from labloop.schemas.types import Record
from labloop.streams.campaign import CampaignRuntime, Emit, Update, unknown_campaign

__all__ = ["CampaignEngine"]


class CampaignEngine:
    """Every campaign of one worker.

    Args:
        device: torch device for new campaigns' learners (None: CUDA when present).
    """

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self._campaigns: dict[str, CampaignRuntime] = {}

    # ---- reading ------------------------------------------------------------------------------
    def __contains__(self, campaign_id: object) -> bool:
        return campaign_id in self._campaigns

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._campaigns))

    def __len__(self) -> int:
        return len(self._campaigns)

    def get(self, campaign_id: str) -> CampaignRuntime | None:
        """The campaign's runtime, to read (its fields are written only through the engine)."""
        return self._campaigns.get(campaign_id)

    def defined(self, campaign_id: str) -> bool:
        rt = self._campaigns.get(campaign_id)
        return rt is not None and rt.definition is not None and rt.pool is not None

    # ---- inputs -------------------------------------------------------------------------------
    def define(self, record: Record) -> None:
        """Apply a ``Campaign`` event.

        Raises:
            InvalidDefinition: nothing changed, and no state is kept for a campaign never validly defined.
        """
        cid = record["campaign_id"]
        rt = self._campaigns.get(cid) or CampaignRuntime(cid, device=self.device)
        rt.define(record)
        self._campaigns[cid] = rt

    def register(self, campaign_id: str, records: list[Record], X: np.ndarray, packed: dict[str, Any] | None = None) -> int:
        """Add featurized compounds (row ``i`` of ``X`` for ``records[i]``); returns how many were new.
        Compounds may come before their campaign's definition: they wait for it."""
        rt = self._campaigns.get(campaign_id)
        if rt is None:
            rt = self._campaigns[campaign_id] = CampaignRuntime(campaign_id, device=self.device)
        return rt.add_compounds(records, X, packed)

    def readings(self, campaign_id: str, assay_id: str, unit: str, readings: list[Record],
                 sources: Iterable[tuple[str, int, int]] = ()) -> list[InvalidEvent]:
        """Apply readings of one assay and unit; ``sources``: the (topic, partition, offset) of the
        messages that carried them, recorded as what the next model learned from. Returns one
        error per rejected reading (``index`` into ``readings``), or one for all when the campaign
        is unknown: no state is made for an id that may be junk."""
        rt = self._campaigns.get(campaign_id)
        if rt is None:
            return [unknown_campaign(campaign_id, readings)]
        errors = rt.apply_readings(assay_id, unit, readings)
        for topic, partition, offset in sources:
            rt.processed(topic, partition, offset)
        return errors

    def status(self, record: Record) -> None:
        """Apply a robot's ``RequestStatus``.

        Raises:
            InvalidEvent: an unknown campaign or request.
        """
        rt = self._campaigns.get(record["campaign_id"])
        if rt is None:
            raise InvalidEvent(f"status for unknown campaign {record['campaign_id']!r}")
        rt.on_status(record)

    def decision(self, record: Record, now_ms: int) -> list[Emit]:
        """Apply a person's ``Decision`` on a proposed request: the ``ExperimentRequest`` to send
        when it approves one (see :meth:`CampaignRuntime.decide_on`).

        Raises:
            InvalidEvent: an unknown campaign or request, or a decision that cannot apply.
        """
        rt = self._campaigns.get(record["campaign_id"])
        if rt is None:
            raise InvalidEvent(f"decision for unknown campaign {record['campaign_id']!r}")
        return rt.decide_on(record, now_ms)

    def expire(self, campaign_id: str, now_ms: int) -> list[Emit]:
        """Expire the campaign's requests past their deadline: the ``RequestStatus`` events to send."""
        rt = self._campaigns.get(campaign_id)
        return rt.expire(now_ms) if rt is not None else []

    # ---- decisions ----------------------------------------------------------------------------
    def take_update(self, campaign_id: str) -> Update | None:
        """What the next model update needs, or None when nothing is new (see :class:`Update`)."""
        rt = self._campaigns.get(campaign_id)
        return rt.take_update() if rt is not None else None

    def fit(self, campaign_id: str, update: Update) -> tuple[np.ndarray, np.ndarray]:
        """Run a model update's fit (the heavy part: on a thread, without the campaign's lock; one
        fit per campaign at a time): the first objective's learner, and each further assay's with
        new readings (their predictions go into ``update.side_pred``). Returns the pool's
        ``(mean, std)`` of the first objective in its units, for :meth:`commit_update`."""
        rt = self._campaigns[campaign_id]
        assert rt.pool is not None
        for assay, (y, keys) in update.side.items():  # a further assay's learner: in this process
            update.side_pred[assay] = rt.side[assay].fit(y, keys, update.X_pool)
        if update.keys.size == 0:  # only further assays learned: the first objective's model stands
            m, s = rt.pool.learner.predict(update.X_pool)
            return rt.pool.sign * m, s
        return rt.pool.fit(update.y_new, update.keys, update.X_pool)

    def commit_update(self, campaign_id: str, update: Update, pred: tuple[np.ndarray, np.ndarray], train_s: float,
                      device: str) -> list[Emit]:
        """Install a finished fit as the next model version; returns its ``ModelUpdate``."""
        return self._campaigns[campaign_id].commit_update(update, pred, train_s, device)

    def decide(self, campaign_id: str, device: str) -> list[Emit]:
        """The requests the campaign wants now, or its final report once the budget is spent."""
        rt = self._campaigns.get(campaign_id)
        return rt.requests_now(device) if rt is not None else []

    def place_learner(self, campaign_id: str, move: Callable[[OnlineLearner], OnlineLearner]) -> None:
        """Replace a defined campaign's learner by ``move(learner)`` (into a model process, say)."""
        rt = self._campaigns.get(campaign_id)
        if rt is not None and rt.pool is not None:
            rt.pool.learner = move(rt.pool.learner)

    # ---- replay of the loop's own outputs -----------------------------------------------------
    def replay_request(self, record: Record, proposed: bool = False) -> bool:
        """Re-adopt an ``ExperimentRequest`` published before a restart (``proposed``: one from the
        proposals topic); False when unknown or known."""
        rt = self._campaigns.get(record["campaign_id"])
        return rt is not None and rt.restore_request(record, proposed)

    def replay_model_update(self, record: Record) -> None:
        """A ``ModelUpdate`` published before a restart: model versions continue after it, and a
        campaign it reported done is not reported again."""
        rt = self._campaigns.get(record["campaign_id"])
        if rt is not None:
            rt.continue_after(int(record["model_version"]), bool(record["done"]))

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self, campaign_id: str, learner: bool = True) -> dict[str, Any]:
        """The campaign as data (:meth:`CampaignRuntime.state_dict`)."""
        return self._campaigns[campaign_id].state_dict(learner=learner)

    def restore(self, states: dict[str, Any]) -> None:
        """Load campaigns from checkpoint states (``campaign_id -> state``), replacing any held.

        Raises:
            InvalidEvent, ModelError, ValueError: a state that does not rebuild; nothing was loaded.
        """
        rebuilt = {cid: CampaignRuntime.from_state(state, self.device) for cid, state in states.items()}
        self._campaigns.update(rebuilt)
