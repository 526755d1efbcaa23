"""The spend meter: what a run has spent on the teacher, and the hard budget cap.

Why reservations: a request's cost is known only when its answer arrives, and many are in
flight at once. Before an attempt starts, the meter reserves its worst-case cost (prompt
estimate x the prompt-token ratio seen so far, plus max_tokens of output). An attempt
starts only if spent + reserved + its reservation fits under the cap; if it does not fit
while others are in flight, it waits for them to settle (their unused reservation comes
back) and tries again; once nothing is in flight and it still does not fit, the budget is
exhausted: no new request starts, and the run ends at most one request's cost below the
cap, never above it (unless the server bills more than max_tokens). Self-hosted teachers
are charged for the time the endpoint is busy (at least one request in flight).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from tasks.results.accounting import TeacherPrice


class BudgetExhausted(RuntimeError):
    """The run reached budget.max_usd.

    The teacher's stage raises it with ``shards`` (what it had annotated, typed); the
    pipeline raises it again with ``summary``, the stop's figures under the summary's keys
    (what ``--summary-json`` and ``budget_stop.json`` show).
    """

    def __init__(self, message: str, summary: Optional[dict[str, Any]] = None, shards: Any = None) -> None:
        super().__init__(message)
        self.summary = summary or {}
        self.shards = shards

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for Prefect's state results
        return (BudgetExhausted, (str(self), self.summary, self.shards))


@dataclass
class _Busy:
    in_flight: int = 0
    since: float = 0.0
    total_s: float = 0.0


@dataclass
class SpendMeter:
    """Spend of one shard (``limit_usd``: what is left of the run's budget when it starts).

    ``servers`` maps each endpoint to the server behind it: hourly-priced endpoints on one
    server (teacher members without their own base_url) share its busy time, so an hour
    is charged once. ``max_request_s`` (the client timeout) bounds one hourly request's
    busy time until a real one has been seen. ``ratio_known`` is False while the prompt
    estimate is a characters-per-token guess that no real usage has corrected yet; then
    attempts go one at a time until the first usage arrives, so a burst of under-reserved
    requests cannot cross the cap.
    """

    prices: list[TeacherPrice]
    limit_usd: Optional[float] = None
    servers: Optional[list[str]] = None
    max_request_s: float = 60.0
    prompt_ratio: float = 1.0  # real prompt tokens / estimated, the worst seen so far
    ratio_known: bool = False
    clock: Callable[[], float] = time.monotonic
    token_usd: float = 0.0
    reserved_usd: float = 0.0
    exhausted: bool = False
    _busy: dict[str, _Busy] = field(default_factory=dict)
    _max_busy_s: float = 0.0  # longest single hourly attempt seen
    _cond: Optional[asyncio.Condition] = None

    # ------------------------------------------------------------------ figures
    def _price(self, endpoint: int) -> TeacherPrice:
        return self.prices[endpoint] if endpoint < len(self.prices) else self.prices[0]

    def _server(self, endpoint: int) -> str:
        return self.servers[endpoint] if self.servers and endpoint < len(self.servers) else str(endpoint)

    def _hourly_servers(self) -> dict[str, float]:
        """server -> USD per hour, for the servers behind hourly-priced endpoints."""
        out: dict[str, float] = {}
        for e, p in enumerate(self.prices):
            if p.kind == "hourly":
                out.setdefault(self._server(e), p.usd_per_hour)
        return out

    def _busy_s(self, server: str) -> float:
        b = self._busy.get(server)
        if not b:
            return 0.0
        return b.total_s + (self.clock() - b.since if b.in_flight else 0.0)

    def busy_seconds(self) -> float:
        """Seconds the hourly-priced servers were busy with at least one request (each server once)."""
        return sum(self._busy_s(srv) for srv in self._hourly_servers())

    def hourly_usd(self) -> float:
        return sum(rate * self._busy_s(srv) / 3600.0 for srv, rate in self._hourly_servers().items())

    def spent_usd(self) -> float:
        return self.token_usd + self.hourly_usd()

    def estimate(self, endpoint: int, est_prompt: int, est_completion: int, *, batch: bool = False) -> float:
        """Worst-case cost of one attempt, for its reservation (``batch``: at the provider's batch price)."""
        p = self._price(endpoint).batch_variant() if batch else self._price(endpoint)
        if p.kind == "tokens":
            return p.token_cost(int(est_prompt * self.prompt_ratio) + 1, est_completion)
        if p.kind == "hourly":
            return p.usd_per_hour * (self._max_busy_s or self.max_request_s) / 3600.0
        return 0.0

    # ------------------------------------------------------------------ gate
    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def acquire(self, endpoint: int, reservation: float) -> bool:
        """Start an attempt if the budget allows; False once the budget is exhausted."""
        if self.limit_usd is None:
            self._start(endpoint)
            return True
        calibrating = self._price(endpoint).kind == "tokens" and not self.ratio_known
        cond = self._condition()
        async with cond:
            while True:
                if self.exhausted:
                    return False
                if calibrating and not self.ratio_known and self._in_flight() > 0:
                    await cond.wait()
                    continue
                if self.spent_usd() + self.reserved_usd + reservation <= self.limit_usd:
                    self.reserved_usd += reservation
                    self._start(endpoint)
                    return True
                if self._in_flight() == 0:
                    self.exhausted = True
                    cond.notify_all()
                    return False
                await cond.wait()

    async def settle(
        self,
        endpoint: int,
        reservation: float,
        *,
        prompt_tokens: Optional[int],
        completion_tokens: Optional[int],
        est_prompt: int,
        billed: bool,
        busy_s: float = 0.0,
    ) -> float:
        """End an attempt: release its reservation, charge what it really cost; returns its token cost."""
        p = self._price(endpoint)
        cost = p.token_cost(prompt_tokens, completion_tokens) if billed else 0.0
        self.token_usd += cost
        if prompt_tokens and est_prompt > 0:
            self.prompt_ratio = max(self.prompt_ratio, prompt_tokens / est_prompt)
            self.ratio_known = True
        if p.kind == "hourly":
            self._max_busy_s = max(self._max_busy_s, busy_s)
        self._end(endpoint)
        if self.limit_usd is not None:
            self.reserved_usd = max(0.0, self.reserved_usd - reservation)
            cond = self._condition()
            async with cond:
                cond.notify_all()
        return cost

    # ------------------------------------------------------------------ batches
    def try_reserve(self, reservation: float) -> bool:
        """Hold a batch's worst-case cost before it is submitted; False where it could cross the cap.

        A batch cannot be stopped halfway like a stream of requests: once submitted, all of it
        may be billed. So it is submitted only if spend + every reservation + its own worst
        case fits under the cap.
        """
        if self.limit_usd is None:
            return True
        if self.spent_usd() + self.reserved_usd + reservation > self.limit_usd:
            return False
        self.reserved_usd += reservation
        return True

    def hold(self, reservation: float) -> None:
        """Count a batch submitted by an earlier run against the cap (it is at the provider whatever the cap says)."""
        if self.limit_usd is not None:
            self.reserved_usd += reservation

    def charge_batch(
        self, endpoint: int, *, prompt_tokens: Optional[int], completion_tokens: Optional[int], est_prompt: int = 0
    ) -> float:
        """Bill one answer (or one billed failure) that came through the batch transport, at the batch price."""
        cost = self._price(endpoint).batch_variant().token_cost(prompt_tokens, completion_tokens)
        self.token_usd += cost
        if prompt_tokens and est_prompt > 0:
            self.prompt_ratio = max(self.prompt_ratio, prompt_tokens / est_prompt)
            self.ratio_known = True
        return cost

    def release(self, reservation: float) -> None:
        """Give back what a batch held once its answers are charged (or it never ran)."""
        if self.limit_usd is not None:
            self.reserved_usd = max(0.0, self.reserved_usd - reservation)

    # ------------------------------------------------------------------ busy time
    def _in_flight(self) -> int:
        return sum(b.in_flight for b in self._busy.values())

    def _start(self, endpoint: int) -> None:
        b = self._busy.setdefault(self._server(endpoint), _Busy())
        if b.in_flight == 0:
            b.since = self.clock()
        b.in_flight += 1

    def _end(self, endpoint: int) -> None:
        b = self._busy.setdefault(self._server(endpoint), _Busy())
        b.in_flight = max(0, b.in_flight - 1)
        if b.in_flight == 0:
            b.total_s += self.clock() - b.since
