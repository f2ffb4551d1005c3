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
from labloop.models.errors import STABLE_ABS_MAX
from labloop.schemas import InvalidEvent
from labloop.schemas.types import Record

__all__ = ["DEFAULT_LEARNER", "DEFAULT_POLICY", "MAX_BATCH", "MAX_BUDGET", "MAX_OBJECTIVES", "MAX_TTL_S", "AssayRange",
           "CampaignSpec", "InvalidDefinition", "Objective"]

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
FIXED = ("objective_assay_id", "unit", "direction", "learner", "seed", "objectives")
MAX_OBJECTIVES = 8  # assays besides the first: each has a model of its own


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
class Objective:
    """An assay a campaign optimizes or constrains besides its first objective.

    ``goal``: ``MINIMIZE`` / ``MAXIMIZE`` (an objective, with its ``weight`` in the
    scalarizations) or ``AT_MOST`` / ``AT_LEAST`` ``bound`` (a constraint, in ``unit``).

    >>> Objective.parse("HLM_CLint:mL/min/kg<=1.0")
    Objective(assay_id='HLM_CLint', unit='mL/min/kg', goal='AT_MOST', bound=1.0, weight=1.0)
    >>> Objective.parse("solubility:ug/mL:max").goal
    'MAXIMIZE'
    """

    assay_id: str
    unit: str
    goal: Literal["MINIMIZE", "MAXIMIZE", "AT_MOST", "AT_LEAST"]
    bound: float | None = None
    weight: float = 1.0

    @property
    def is_constraint(self) -> bool:
        return self.goal in ("AT_MOST", "AT_LEAST")

    @classmethod
    def parse(cls, text: str) -> Objective:
        """``ASSAY:UNIT:min|max[:WEIGHT]`` or ``ASSAY:UNIT<=BOUND`` / ``ASSAY:UNIT>=BOUND``.

        Raises:
            ValueError: not of either form.
        """
        for op, goal in (("<=", "AT_MOST"), (">=", "AT_LEAST")):
            if op in text:
                head, bound = text.rsplit(op, 1)
                assay, unit = head.rsplit(":", 1)
                return cls(assay, unit, goal, float(bound))  # type: ignore[arg-type]
        parts = text.rsplit(":", 3) if text.count(":") >= 3 else text.rsplit(":", 2)
        if len(parts) < 3 or parts[2].lower() not in ("min", "max"):
            raise ValueError(f"{text!r}: expected ASSAY:UNIT:min|max[:WEIGHT], ASSAY:UNIT<=BOUND or ASSAY:UNIT>=BOUND")
        weight = float(parts[3]) if len(parts) == 4 else 1.0
        return cls(parts[0], parts[1], "MINIMIZE" if parts[2].lower() == "min" else "MAXIMIZE", None, weight)


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
        objectives: further objectives and constraints (:class:`Objective`); every request then
            names all their assays, and the next batch is chosen by ParEGO over every objective's
            model with the probability of meeting the constraints
            (:func:`labloop.models.pareto.parego_batch`, the default of ``labloop bench mo``).
        approval: hold each new request as *proposed* until a person approves it (``labloop
            approve``, the dashboard); nothing reaches a robot before.

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
    objectives: tuple[Objective, ...] = field(default_factory=tuple)
    approval: bool = False

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
        if len(self.objectives) > MAX_OBJECTIVES:
            raise InvalidDefinition(cid, "objectives", f"has {len(self.objectives)}, more than {MAX_OBJECTIVES}")
        names = {self.objective_assay_id}
        for o in self.objectives:
            if not isinstance(o.assay_id, str) or not o.assay_id or len(o.assay_id) > MAX_ID or o.assay_id in names \
                    or not o.assay_id.isprintable():
                raise InvalidDefinition(cid, "objectives", f"names assay {o.assay_id!r} twice, or it is not 1 to {MAX_ID} "
                                        f"printable characters")
            names.add(o.assay_id)
            if not isinstance(o.unit, str) or not o.unit or len(o.unit) > MAX_ID:
                raise InvalidDefinition(cid, "objectives", f"of {o.assay_id!r}: unit {o.unit!r} must be 1 to {MAX_ID} characters")
            if o.goal not in ("MINIMIZE", "MAXIMIZE", "AT_MOST", "AT_LEAST"):
                raise InvalidDefinition(cid, "objectives", f"of {o.assay_id!r}: goal {o.goal!r} is not MINIMIZE, MAXIMIZE, "
                                        f"AT_MOST or AT_LEAST")
            if o.is_constraint != (o.bound is not None) or o.bound is not None and not (
                    math.isfinite(o.bound) and abs(o.bound) <= STABLE_ABS_MAX):
                raise InvalidDefinition(cid, "objectives", f"of {o.assay_id!r}: a constraint (AT_MOST, AT_LEAST) needs a "
                                        f"finite bound, and an objective none (bound = {o.bound!r})")
            if not (isinstance(o.weight, int | float) and math.isfinite(o.weight) and 0 < o.weight <= 1000):
                raise InvalidDefinition(cid, "objectives", f"of {o.assay_id!r}: weight {o.weight!r} must be in (0, 1000]")
        if not isinstance(self.approval, bool):
            raise bad("approval", "must be true or false")
        if self.policy not in POLICIES:
            raise bad("policy", f"is not a policy; known: {', '.join(sorted(POLICIES))}")
        from labloop.models.learners import LEARNERS  # torch: only where a definition is checked

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

    @property
    def assays(self) -> list[str]:
        """Every assay a request of this campaign runs: the first objective, then the others."""
        return [self.objective_assay_id, *(o.assay_id for o in self.objectives)]

    def unit_of(self, assay_id: str) -> str | None:
        """The unit an objective's or constraint's readings must carry (None: not one of them)."""
        if assay_id == self.objective_assay_id:
            return self.unit
        return next((o.unit for o in self.objectives if o.assay_id == assay_id), None)

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
        rec["objectives"] = [asdict(o) for o in self.objectives]
        rec["event_time"] = int(event_time)
        return rec

    @classmethod
    def from_record(cls, record: Record) -> CampaignSpec:
        """Validate a decoded ``Campaign`` event (any schema version).

        Raises:
            InvalidDefinition: naming the first field that is wrong.
        """
        names = {f for f in cls.__dataclass_fields__ if f not in ("ranges", "objectives")}
        kwargs: dict[str, Any] = {k: record[k] for k in names if k in record}
        ranges = record.get("ranges") or []
        kwargs["ranges"] = tuple(AssayRange(str(r["assay_id"]), float(r["low"]), float(r["high"])) for r in ranges)
        kwargs["objectives"] = tuple(Objective(o["assay_id"], o["unit"], o["goal"], o.get("bound"), float(o.get("weight", 1.0)))
                                     for o in record.get("objectives") or [])
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a missing field
            raise InvalidDefinition(str(record.get("campaign_id")), "record", f"is incomplete: {exc}") from None
