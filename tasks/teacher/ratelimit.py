"""Requests- and tokens-per-minute limits as token buckets.

Why reservations: a request's real token count is known only after the answer. The
client reserves an estimate (prompt tokens + max_tokens) before sending, and reconciles
with the reported usage afterwards: unused tokens go back to the bucket, an overrun is
charged (the bucket may go negative, which delays later requests). This keeps a
tokens-per-minute budget honest without waiting for answers to start the next request.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: Optional[str]) -> Optional[float]:
    """Seconds in an ``x-ratelimit-reset-*`` header: OpenAI's "6m0s", "1.5s", "20ms", or plain seconds."""
    if not value:
        return None
    v = value.strip()
    try:
        return max(0.0, float(v))
    except ValueError:
        pass
    parts = _DURATION.findall(v)
    if not parts or "".join(n + u for n, u in parts) != v.replace(" ", ""):
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


class ProviderLimits:
    """The provider's own count of what is left, from its ``x-ratelimit-*`` headers: pace before its 429, not after.

    OpenAI (and Azure, Groq, Together, gateways in front of vLLM) send with every answer how
    many requests and tokens are left in the current window, the window's limit, and when
    it resets. A request starts only if what the last answer said is left, less what was
    sent since, covers it; otherwise it waits for the reset. When a window has reset and
    no answer has said more yet, the new window holds the limit, and lasts as long as the
    longest reset seen. With no such headers nothing changes.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.left: dict[str, Optional[float]] = {"requests": None, "tokens": None}
        self.limit: dict[str, Optional[float]] = {"requests": None, "tokens": None}
        self.reset_at: dict[str, float] = {"requests": 0.0, "tokens": 0.0}
        self.window_s: dict[str, float] = {"requests": 1.0, "tokens": 1.0}
        self.waited_s = 0.0
        self.in_flight = 0  # requests started and not yet answered: the provider's count does not hold them yet
        self._lock = asyncio.Lock()

    @property
    def requests_left(self) -> Optional[float]:
        return self.left["requests"]

    def release(self) -> None:
        """A request ended without an answer (timeout, dropped connection)."""
        self.in_flight = max(0, self.in_flight - 1)

    def update(self, headers: Mapping[str, str]) -> None:
        """One answer's headers. What is left is the provider's figure less the requests still in flight; within
        one window, answers arriving out of order never raise it."""
        self.release()
        now = self.clock()
        for kind in ("requests", "tokens"):
            left = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            if left is None:
                continue
            reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
            if kind == "requests":
                left -= self.in_flight
            before = self.left[kind]
            self.left[kind] = min(left, before) if before is not None and now < self.reset_at[kind] else left
            self.limit[kind] = _number(headers.get(f"x-ratelimit-limit-{kind}")) or self.limit[kind]
            if reset is not None:
                self.window_s[kind] = max(self.window_s[kind] if self.limit[kind] else 0.0, reset, 0.001)
            self.reset_at[kind] = now + (reset if reset is not None else self.window_s[kind])

    def _roll(self, now: float) -> None:
        """A window that has reset: it holds the limit again (unknown limit: no pacing until an answer says)."""
        for kind in ("requests", "tokens"):
            if self.left[kind] is not None and now >= self.reset_at[kind]:
                self.left[kind] = self.limit[kind]
                self.reset_at[kind] = now + self.window_s[kind]

    def _wait(self, est_tokens: int) -> float:
        now = self.clock()
        self._roll(now)
        w = 0.0
        if self.left["requests"] is not None and self.left["requests"] < 1:
            w = self.reset_at["requests"] - now
        if self.left["tokens"] is not None and self.left["tokens"] < est_tokens:
            w = max(w, self.reset_at["tokens"] - now)
        return max(0.0, w)

    async def acquire(self, est_tokens: int) -> None:
        """Wait until the provider's window has room, then count the request against it."""
        self.in_flight += 1
        if self.left["requests"] is None and self.left["tokens"] is None:
            return
        async with self._lock:
            while (w := self._wait(est_tokens)) > 0:
                self.waited_s += w
                await asyncio.sleep(w)
            if self.left["requests"] is not None:
                self.left["requests"] -= 1
            if self.left["tokens"] is not None:
                self.left["tokens"] -= est_tokens


def _number(v: Optional[str]) -> Optional[float]:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None
