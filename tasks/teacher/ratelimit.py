"""Requests- and tokens-per-minute limits as token buckets.

Why reservations: a request's real token count is known only after the answer. The
client reserves an estimate (prompt tokens + max_tokens) before sending, and reconciles
with the reported usage afterwards: unused tokens go back to the bucket, an overrun is
charged (the bucket may go negative, which delays later requests). This keeps a
tokens-per-minute budget honest without waiting for answers to start the next request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Optional


class TokenBucket:
    """A bucket refilled at ``rate_per_s`` up to ``capacity``; FIFO waiters."""

    def __init__(self, per_minute: float, burst_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError("per_minute must be > 0")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.clock = clock
        self.t = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_time(self, amount: float) -> float:
        """Seconds until ``amount`` can be taken (0 if now). Amounts above capacity need a full bucket."""
        self._refill()
        need = min(amount, self.capacity)
        if self.level >= need:
            return 0.0
        return (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give_back(self, amount: float) -> None:
        """Reconcile a reservation: positive returns tokens, negative charges an overrun."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    async def acquire(self, amount: float = 1.0) -> float:
        """Wait until ``amount`` is available and take it; returns seconds waited."""
        waited = 0.0
        async with self._lock:
            while True:
                w = self.wait_time(amount)
                if w <= 0:
                    self.take(amount)
                    return waited
                await asyncio.sleep(w)
                waited += w


class RateLimiter:
    """Both limits together; either may be None (no limit)."""

    def __init__(
        self,
        requests_per_minute: Optional[float],
        tokens_per_minute: Optional[float],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests = TokenBucket(requests_per_minute, clock=clock) if requests_per_minute else None
        # a tokens bucket holds up to one second's budget or one big request, whichever is larger
        self.tokens = TokenBucket(tokens_per_minute, burst_s=1.0, clock=clock) if tokens_per_minute else None

    @property
    def active(self) -> bool:
        return self.requests is not None or self.tokens is not None

    async def acquire(self, est_tokens: int) -> None:
        if self.requests is not None:
            await self.requests.acquire(1)
        if self.tokens is not None:
            await self.tokens.acquire(est_tokens)

    def reconcile(self, est_tokens: int, actual_tokens: Optional[int]) -> None:
        if self.tokens is not None and actual_tokens is not None:
            self.tokens.give_back(est_tokens - actual_tokens)


def estimate_tokens(prompt_chars: int, max_tokens: int, n: int = 1) -> int:
    """A cheap upper-ish estimate: about 4 characters per token plus the answer budget."""
    return prompt_chars // 4 + 1 + max_tokens * n
