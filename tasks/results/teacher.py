"""What asking the teacher counted and cost, typed: per client, per shard, and summed for a run.

Why typed parts with ``add``: a run's totals are sums over shards (and over clients, one per
endpoint, when teachers are mixed). Summed as dataclasses, every counter is added by the
class that defines it, so a new or renamed figure is summed or fails, never silently
reads as zero; string keys appear only where these figures become the summary JSON and
MLflow metrics (tasks/pipeline/summary.py). As Curator's ``TokenUsage``/``CostInfo``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Optional, TypeVar

T = TypeVar("T", bound="_Summable")


class _Summable:
    """A dataclass of numbers (and counters by name) that adds field by field."""

    def add(self: T, other: T) -> T:
        """Add ``other``'s figures to this one's, in place; returns self."""
        for f in fields(self):  # type: ignore[arg-type]
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, dict):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            elif f.metadata.get("combine") == "min":
                setattr(self, f.name, min(mine, theirs))
            else:
                setattr(self, f.name, mine + theirs)
        return self

    @classmethod
    def total(cls: type[T], parts: Iterable[T]) -> T:
        out = cls()
        for p in parts:
            out.add(p)
        return out


@dataclass
class ClientStats(_Summable):
    """A client's requests: sent, answered, from the cache, failed, and their token usage."""

    requests_sent: int = 0  # HTTP attempts made, retries included
    requests_ok: int = 0
    requests_cached: int = 0  # answers served from the cache (per choice)
    requests_failed: int = 0  # gave up after retries / non-retryable error
    attempt_errors: int = 0
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_counted: int = 0  # of tokens_in + tokens_out: counted or estimated by distill (no usage in the response)
    tokens_reasoning: int = 0  # of tokens_out: a reasoning model's hidden reasoning (billed as output)
    not_sent_budget: int = 0  # requests never sent because the budget was exhausted
    invalid_answers: int = 0  # requests given up on an unusable 200 (another model's answer, no choices)
    context_exceeded: int = 0  # requests the server refused as longer than its context (never retried)
    batches_submitted: int = 0  # Batch API: batches this client submitted
    batches_collected: int = 0  # batches whose answers it wrote to the cache (re-attached ones included)
    batch_requests: int = 0  # requests that went out inside a batch (retries in a later batch count again)
    batch_pending: int = 0  # requests still in a batch at the provider when the run stopped waiting
    status_counts: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic, metadata={"combine": "min"})

    def bump(self, status: str) -> None:
        self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def merged(self, other: ClientStats) -> ClientStats:
        """The sum of two clients' counts as a new object (one client per endpoint when teachers are mixed)."""
        return ClientStats(status_counts={}, started=self.started).add(self).add(other)


@dataclass
class Spend(_Summable):
    """What a shard's attempts cost (the spend meter's figures) and what its answers are worth at the token price."""

    spent_usd: float = 0.0  # token_usd + hourly_usd: the bill
    token_usd: float = 0.0  # token usage of every attempt, retries and billed failures included
    hourly_usd: float = 0.0  # busy hours of hourly-priced servers
    busy_s: float = 0.0
    answers_usd: float = 0.0  # token price of the answers used, fresh or cached (what labelling the items costs)
    fresh_answers_usd: float = 0.0  # of which the answers sent in this run


@dataclass
class AnswerUsage(_Summable):
    """The usage behind every answer used, fresh or cached (its request's first choice carries it)."""

    answers: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    estimated: int = 0  # answers whose usage is distill's 4-characters-per-token estimate


@dataclass
class ShardTimes(_Summable):
    wall_s: float = 0.0  # the whole shard: plan, send, assemble, write
    send_s: float = 0.0  # sending and waiting for answers
    send_cpu_s: float = 0.0  # this process's CPU while sending


@dataclass
class ShardResult:
    """One annotated shard: its Parquet part and what asking for it counted and cost.

    ``skipped``: the part existed (an earlier run finished it), nothing was asked.
    ``budget_exhausted``: cut short at the cap; the part is written as ``*.partial.parquet``.
    """

    path: str
    items: int
    client: ClientStats = field(default_factory=ClientStats)
    spend: Spend = field(default_factory=Spend)
    usage: AnswerUsage = field(default_factory=AnswerUsage)
    times: ShardTimes = field(default_factory=ShardTimes)
    requests_deduplicated: int = 0  # sample requests answered by an identical request of the shard
    items_reused: int = 0  # items every answer of which came from the cache (an earlier run paid for them)
    prompt_ratio: Optional[float] = None  # real / estimated prompt tokens learned here (the next shard starts from it)
    skipped: bool = False
    budget_exhausted: bool = False
    batch_pending: bool = False  # requests are still in batches at the provider: written as ``*.partial.parquet``


@dataclass
class ShardTotals:
    """A run's shards added up: what the run report's request, token, spend and reuse figures come from."""

    items: int = 0  # items of the shards annotated now (skipped shards not included)
    items_in_skipped: int = 0
    client: ClientStats = field(default_factory=ClientStats)
    spend: Spend = field(default_factory=Spend)
    usage: AnswerUsage = field(default_factory=AnswerUsage)
    requests_deduplicated: int = 0
    items_reused: int = 0  # including every item of a skipped shard
    shards_reused: int = 0
    sending_wall_s: float = 0.0  # wall time of the shards that sent at least one request

    @classmethod
    def of(
        cls, shards: Iterable[ShardResult], probe: Optional[Probe] = None, submitted: Optional[ClientStats] = None
    ) -> ShardTotals:
        """The shards added up; with the preflight ``probe``, what it sent and paid too (no item of it); with
        ``submitted``, the batches a batch run's first pass submitted (the shards then collected them)."""
        t = cls(client=ClientStats(status_counts={}))
        if submitted is not None:
            t.client.add(submitted)
        for s in shards:
            t.client.add(s.client)
            t.spend.add(s.spend)
            t.usage.add(s.usage)
            t.requests_deduplicated += s.requests_deduplicated
            if s.skipped:
                t.items_in_skipped += s.items
                t.items_reused += s.items
                t.shards_reused += 1
            else:
                t.items += s.items
                t.items_reused += s.items_reused
            if s.client.requests_sent:
                t.sending_wall_s += s.times.wall_s
        if probe is not None:
            t.client.add(probe.client)
            # the shards found the probe's answers in the cache, but they were asked and paid for in this run:
            # requests_cached counts only what earlier runs paid for
            t.client.requests_cached -= probe.answers
            t.spend.add(probe.spend)
            if probe.client.requests_sent:
                t.sending_wall_s += probe.wall_s
        return t


@dataclass
class Probe:
    """The preflight probe: one real item's requests, paid and counted with the run, but no item of it.

    The shard that holds the item later takes these answers from the cache and counts the
    item and its answers there; so the probe brings to the run's totals only what it sent
    and paid (requests, attempts, tokens, spend), and the answers it received are told
    apart from answers cached by earlier runs (``answers``).
    """

    client: ClientStats
    spend: Spend
    answers: int  # answers the probe received fresh in this run (the shards find them in the cache)
    wall_s: float = 0.0
    path: str = ""


@dataclass
class PlanRow:
    """The plan for one endpoint (the main teacher, or one of teacher.members), each figure with its method."""

    endpoint: int
    model: str
    price: str
    requests_total: int
    requests_cached: int
    requests_to_send: int
    tokens_in: int
    tokens_out: int
    usd: float  # at the price of the endpoint's transport (teacher.transport)
    usd_batch: Optional[float]  # the same at the provider's batch-API price, where it has one
    seconds: float
    tokens_in_method: str
    tokens_out_method: str
    usd_method: str
    seconds_method: str
    transport: str = "online"
    usd_online: Optional[float] = None  # the same sent online, where the endpoint sends through batches


@dataclass
class TeacherSpeed:
    """The teacher's measured speed: answers per second of the shards that sent requests, or an earlier run's."""

    teacher_requests_per_s: Optional[float]
    teacher_items_per_s: Optional[float]
    teacher_speed_source: Optional[str]  # "this run", or "an earlier run (all answers cached now)"


@dataclass(frozen=True)
class EarlierRun:
    """What the last annotation summary in the run folder measured, for a run whose answers all came from the cache.

    Read from ``annotation_summary.json`` (an interface: the keys are the summary's).
    """

    teacher_items_per_s: Optional[float] = None
    teacher_requests_per_s: Optional[float] = None
    teacher_kwh_per_item: Optional[float] = None
    teacher_usd_per_item: Optional[float] = None

    @classmethod
    def from_summary(cls, summary: Optional[dict[str, object]]) -> Optional[EarlierRun]:
        if not summary:
            return None

        def num(key: str) -> Optional[float]:
            v = summary.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        return cls(
            num("teacher_items_per_s"),
            num("teacher_requests_per_s"),
            num("teacher_kwh_per_item"),
            num("teacher_usd_per_item"),
        )


@dataclass
class PlanFigures:
    """The whole plan: the rows added up, and what a budget split across parallel shards follows.

    ``as_dict`` is the plan's JSON (``distill plan --json``, ``plan.json`` in the run folder):
    its keys are this class's fields, with the endpoints' rows as a list.
    """

    items: int
    samples_per_item: int
    variation: str
    endpoints: list[PlanRow]
    seconds: float  # endpoints work in parallel with variation 'teachers'; one after another otherwise
    budget_max_usd: Optional[float]
    shard_requests: dict[str, int] = field(default_factory=dict)  # requests to send per shard

    @property
    def requests_total(self) -> int:
        return sum(r.requests_total for r in self.endpoints)

    @property
    def requests_cached(self) -> int:
        return sum(r.requests_cached for r in self.endpoints)

    @property
    def requests_to_send(self) -> int:
        return sum(r.requests_to_send for r in self.endpoints)

    @property
    def tokens_in(self) -> int:
        return sum(r.tokens_in for r in self.endpoints)

    @property
    def tokens_out(self) -> int:
        return sum(r.tokens_out for r in self.endpoints)

    @property
    def usd(self) -> float:
        return sum(r.usd for r in self.endpoints)

    @property
    def usd_batch(self) -> Optional[float]:
        """The plan at the provider's batch-API price (endpoints without one at their own price)."""
        if not any(r.usd_batch is not None for r in self.endpoints):
            return None
        return sum(r.usd_batch if r.usd_batch is not None else r.usd for r in self.endpoints)

    @property
    def usd_online(self) -> float:
        """The plan with every endpoint sending online (one request per answer)."""
        return sum(r.usd_online if r.usd_online is not None else r.usd for r in self.endpoints)

    @property
    def batch_transport(self) -> bool:
        return any(r.transport == "batch" for r in self.endpoints)

    @property
    def usd_per_1m_items(self) -> Optional[float]:
        """USD per 1M items as if nothing were cached (the to-send cost scaled to all requests)."""
        total = 0.0
        for r in self.endpoints:
            if r.requests_to_send:
                total += r.usd * r.requests_total / r.requests_to_send
            elif r.requests_total:
                return None  # everything cached: no fresh figure to scale
        return total / self.items * 1e6 if self.items else None

    @property
    def over_budget(self) -> bool:
        return self.budget_max_usd is not None and self.usd > self.budget_max_usd

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "items": self.items,
            "samples_per_item": self.samples_per_item,
            "variation": self.variation,
            "requests_total": self.requests_total,
            "requests_cached": self.requests_cached,
            "requests_to_send": self.requests_to_send,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "usd": self.usd,
            "usd_batch": self.usd_batch,
            "usd_online": self.usd_online,
            "seconds": self.seconds,
            "usd_per_1m_items": self.usd_per_1m_items,
            "budget_max_usd": self.budget_max_usd,
            "endpoints": [vars(r).copy() for r in self.endpoints],
            "shard_requests": self.shard_requests,
            "over_budget": self.over_budget,
        }
        if len(self.endpoints) == 1:
            r = self.endpoints[0]
            out.update(
                {
                    "tokens_in_method": r.tokens_in_method,
                    "tokens_out_method": r.tokens_out_method,
                    "usd_method": r.usd_method,
                    "seconds_method": r.seconds_method,
                    "price": r.price,
                }
            )
        return out
