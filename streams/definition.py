"""The campaign definition: one typed value, its defaults and its validation written once.

The CLI, the demo and the benches build a :class:`CampaignSpec`; the engine turns every
``Campaign`` event arriving from Kafka into one with :meth:`CampaignSpec.from_record`, so a
definition typed by hand and one sent straight to the topic meet the same checks. An invalid
definition raises :class:`InvalidDefinition`, naming the field and why; the engine dead-letters
the event and the campaign's previous valid definition stays in force.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from labloop.models.acquisition import POLICIES
from labloop.models.learners import LEARNERS, STABLE_ABS_MAX
from labloop.schemas import InvalidEvent
from labloop.schemas.types import Record

__all__ = ["DEFAULT_LEARNER", "DEFAULT_POLICY", "MAX_BATCH", "MAX_BUDGET", "MAX_TTL_S", "AssayRange", "CampaignSpec",
           "InvalidDefinition"]

# The benchmarked default (docs/benchmarks.md): a Tanimoto GP on Morgan count fingerprints with
# UCB (beta = 2) found 80.4 +- 0.8 % of Enamine 10k's top-100 scores at 6 % acquired (5 seeds),
# ahead of greedy (77.6), Thompson (66.7), bit fingerprints (52.0) and a deep ensemble (61.0).
DEFAULT_LEARNER = "gp"
DEFAULT_POLICY = "ucb"

MAX_BATCH = 10_000  # requests in one batch: a plate stack, not a library
MAX_BUDGET = 10_000_000  # requests over a campaign's life
MIN_TTL_S, MAX_TTL_S = 1.0, 366 * 86_400.0  # a request lives between a second and a year
MAX_ID = 200  # characters of a campaign, assay or unit id
# Fields a running campaign cannot change: its pool, model and readings are built on them.
FIXED = ("objective_assay_id", "unit", "direction", "learner", "seed")


class InvalidDefinition(InvalidEvent):
    """A campaign definition that cannot be used.

    Attributes:
        campaign_id: the campaign it names.
        field: the offending field.
    """

    def __init__(self, campaign_id: str, field_name: str, reason: str) -> None:
        super().__init__(f"campaign {campaign_id!r}: {field_name} {reason}")
        self.campaign_id = campaign_id
        self.field = field_name


@dataclass(frozen=True)
class AssayRange:
    """The plausible values of one assay's readings, in its unit: outside ``[low, high]`` a
    reading is dead-lettered, never learned."""

    assay_id: str
    low: float
    high: float


@dataclass(frozen=True)
class CampaignSpec:
    """One campaign's definition, validated on construction.

    Args:
        campaign_id: the campaign's key on every topic.
        objective_assay_id: the assay whose readings are the objective.
        unit: the unit the objective's readings must carry.
        direction: ``MINIMIZE`` or ``MAXIMIZE`` the objective.
        batch_size: requests per batch (``1..MAX_BATCH``).
        init_size: size of the random first batch (``0..MAX_BATCH``).
        budget: requests over the campaign's life (``0..MAX_BUDGET``).
        min_pool_size: request nothing until the pool holds this many compounds.
        policy, learner: names from :mod:`labloop.models.acquisition` / :mod:`labloop.models.learners`.
        schedule: ``ROUNDS`` (the next batch once the last is answered) or ``CONTINUOUS``.
        request_ttl_s: seconds before an unanswered request expires (1 s to a year).
        seed: seeds the random start and the policy (``>= 0``).
        ranges: plausible values per assay.

    The defaults are the loop's benchmarked setting (docs/benchmarks.md): a Tanimoto GP on
    Morgan count fingerprints with UCB (beta = 2).

    >>> CampaignSpec("c1", "vina", "kcal/mol", direction="MINIMIZE").budget
    960
    >>> try:
    ...     CampaignSpec("c1", "vina", "kcal/mol", request_ttl_s=float("nan"))
    ... except InvalidDefinition as exc:
    ...     print(exc, "/", exc.field)
    campaign 'c1': request_ttl_s = nan: must be a finite number of seconds in [1, 31622400] / request_ttl_s
    """

    campaign_id: str
    objective_assay_id: str
    unit: str
    direction: Literal["MINIMIZE", "MAXIMIZE"] = "MAXIMIZE"
    batch_size: int = 96
    init_size: int = 96
    budget: int = 960
    min_pool_size: int = 0
    policy: str = DEFAULT_POLICY
    learner: str = DEFAULT_LEARNER
    schedule: Literal["ROUNDS", "CONTINUOUS"] = "ROUNDS"
    request_ttl_s: float = 86_400.0
    seed: int = 0
    ranges: tuple[AssayRange, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        cid = self.campaign_id if isinstance(self.campaign_id, str) else repr(self.campaign_id)

        def bad(name: str, why: str) -> InvalidDefinition:
            return InvalidDefinition(cid, name, f"= {getattr(self, name)!r}: {why}")

        for name in ("campaign_id", "objective_assay_id", "unit"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or len(v) > MAX_ID or not v.isprintable():
                raise bad(name, f"must be 1 to {MAX_ID} printable characters")
        if self.direction not in ("MINIMIZE", "MAXIMIZE"):
            raise bad("direction", "must be MINIMIZE or MAXIMIZE")
        if self.schedule not in ("ROUNDS", "CONTINUOUS"):
            raise bad("schedule", "must be ROUNDS or CONTINUOUS")
        for name, low, high in (("batch_size", 1, MAX_BATCH), ("init_size", 0, MAX_BATCH), ("budget", 0, MAX_BUDGET),
                                ("min_pool_size", 0, 2**31 - 1), ("seed", 0, 2**63 - 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise bad(name, f"must be an integer in [{low}, {high}]")
        if self.policy not in POLICIES:
            raise bad("policy", f"is not a policy; known: {', '.join(sorted(POLICIES))}")
        if self.learner not in LEARNERS:
            raise bad("learner", f"is not a learner; known: {', '.join(sorted(LEARNERS))}")
        ttl = self.request_ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) \
                or not MIN_TTL_S <= ttl <= MAX_TTL_S:
            raise InvalidDefinition(cid, "request_ttl_s", f"= {ttl!r}: must be a finite number of seconds in "
                                    f"[{MIN_TTL_S:.0f}, {MAX_TTL_S:.0f}]")
        seen: set[str] = set()
        for r in self.ranges:
            if not isinstance(r.assay_id, str) or not r.assay_id or r.assay_id in seen:
                raise InvalidDefinition(cid, "ranges", f"names assay {r.assay_id!r} twice or not at all")
            seen.add(r.assay_id)
            if not (math.isfinite(r.low) and math.isfinite(r.high) and r.low < r.high
                    and max(abs(r.low), abs(r.high)) <= STABLE_ABS_MAX):
                raise InvalidDefinition(cid, "ranges", f"of {r.assay_id!r} = [{r.low}, {r.high}]: must be finite, "
                                        f"low < high, within +-{STABLE_ABS_MAX:g}")

    @property
    def maximize(self) -> bool:
        return self.direction == "MAXIMIZE"

    def range_of(self, assay_id: str) -> tuple[float, float]:
        """The plausible ``(low, high)`` of an assay's readings: its declared range, else what
        the learners represent stably."""
        for r in self.ranges:
            if r.assay_id == assay_id:
                return r.low, r.high
        return -STABLE_ABS_MAX, STABLE_ABS_MAX

    def check_change(self, new: CampaignSpec) -> None:
        """Raise :class:`InvalidDefinition` if ``new`` may not replace this running definition."""
        for name in FIXED:
            if getattr(new, name) != getattr(self, name):
                raise InvalidDefinition(self.campaign_id, name, f"cannot change from {getattr(self, name)!r} to "
                                        f"{getattr(new, name)!r} once the campaign is defined: define a new campaign")

    def to_record(self, event_time: int) -> Record:
        """The ``Campaign`` event for this definition (``event_time`` in ms since the epoch)."""
        rec = asdict(self)
        rec["ranges"] = [asdict(r) for r in self.ranges]
        rec["event_time"] = int(event_time)
        return rec

    @classmethod
    def from_record(cls, record: Record) -> CampaignSpec:
        """Validate a decoded ``Campaign`` event (any schema version).

        Raises:
            InvalidDefinition: naming the first field that is wrong.
        """
        names = {f for f in cls.__dataclass_fields__ if f != "ranges"}
        kwargs: dict[str, Any] = {k: record[k] for k in names if k in record}
        ranges = record.get("ranges") or []
        kwargs["ranges"] = tuple(AssayRange(str(r["assay_id"]), float(r["low"]), float(r["high"])) for r in ranges)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a missing field
            raise InvalidDefinition(str(record.get("campaign_id")), "record", f"is incomplete: {exc}") from None
