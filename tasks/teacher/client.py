"""The teacher client: one aiohttp session for any OpenAI-compatible endpoint.

Why one module: everything that touches money goes through here. Bounded concurrency (a
fixed pool of workers, so memory does not grow with the request count); requests- and
tokens-per-minute limits; retries with exponential backoff and full jitter on 429, 5xx,
timeouts, dropped connections and non-JSON bodies (an HTML error page is an error, never
an answer), honouring Retry-After; a persistent cache consulted before anything is sent;
and the token usage of every attempt recorded in the ledger, retries included.

One request is a retry loop (:meth:`TeacherClient._send`) around single attempts
(:meth:`TeacherClient._attempt`): the attempt reserves its worst-case cost, sends, reads
and settles what it really cost; the loop decides from its result whether to answer, give
up or wait and try again. What a response *means* is tasks/teacher/responses.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

from distill.config import ClientConfig
from tasks.accounting.budget import SpendMeter
from tasks.results.teacher import ClientStats
from tasks.teacher.cache import CachedAnswer, ResponseCache
from tasks.teacher.ratelimit import ProviderLimits, RateLimiter
from tasks.teacher.responses import (
    MAX_UNUSABLE_ATTEMPTS,
    RETRYABLE_STATUS,
    ServerError,
    backoff_delay,
    extract_answers,
    is_context_error,
    model_matches,
    parse_retry_after,
    reasoning_tokens,
    redact,
    snippet,
    usage_of,
)
from tasks.templates.tokens import TokenCounter, heuristic_counter

try:  # orjson ships with prefect; fall back to the stdlib
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    import json

    _loads = json.loads

log = logging.getLogger("distill.teacher")


@dataclass
class TeacherRequest:
    """One HTTP request. ``keys`` has one cache key per choice (k of them when using ``n``)."""

    keys: list[str]
    path: str  # "/completions" or "/chat/completions"
    payload: dict[str, Any]
    est_tokens: int  # prompt estimate + max_tokens per choice (what the rate limiter reserves)
    endpoint: int = 0  # index into the endpoints of the run (0: the main teacher)
    est_out: int = 0  # the max_tokens part of est_tokens (the budget reserves it as worst-case output)


@dataclass
class Outcome:
    """What became of one cache key: an answer, or a failure with its reason."""

    text: Optional[str]
    cached: bool
    error: Optional[str] = None
    attempts: int = 0
    prompt_tokens: Optional[int] = None  # usage of the request that produced it (first choice of an n-request)
    completion_tokens: Optional[int] = None
    usage_source: Optional[str] = None
    budget_stop: bool = False  # not sent because the budget was exhausted
    logprobs: Any = None  # the choice's raw log-probabilities, when the endpoint returned them
    finish_reason: Optional[str] = None
    # the server answered but the answer is unusable (another model's, no choices) or the prompt can never fit
    # (context length exceeded): a final outcome with its reason, not a transport failure worth more attempts
    invalid: bool = False
    transport: str = "online"  # how the answer was fetched ("batch": billed at the provider's batch rate)
    pending: bool = False  # still in a batch at the provider when the run stopped waiting (the next run collects it)


def from_cache(
    cache: ResponseCache, requests: list[TeacherRequest], stats: ClientStats
) -> tuple[dict[str, Outcome], list[TeacherRequest]]:
    """The outcomes the cache holds (every key of a request, or none of it) and the requests still to send."""
    results: dict[str, Outcome] = {}
    hits = cache.get_many([k for r in requests for k in r.keys])
    todo: list[TeacherRequest] = []
    for r in requests:
        if all(k in hits for k in r.keys):
            for k in r.keys:
                h = hits[k]
                results[k] = Outcome(
                    h.text,
                    cached=True,
                    prompt_tokens=h.prompt_tokens,
                    completion_tokens=h.completion_tokens,
                    usage_source=h.usage_source,
                    logprobs=h.logprobs,
                    finish_reason=h.finish_reason,
                    transport=h.transport,
                )
            stats.requests_cached += len(r.keys)
        else:
            todo.append(r)
    return results, todo


@dataclass(frozen=True)
class Endpoint:
    """One server a run asks: index 0 is the main teacher, then ``teacher.members`` in order."""

    base_url: str
    api_key: Optional[str] = field(default=None, repr=False)  # never shown
    index: int = 0
    check_model: bool = True  # an answer for another model than asked is invalid (see responses.model_matches)


@dataclass
class _Attempt:
    """What one attempt came to: answers (``outcomes``), or a failure the retry loop acts on."""

    outcomes: Optional[dict[str, Outcome]] = None
    kind: str = ""
    msg: str = ""
    http_status: Optional[int] = None
    retry_after: Optional[float] = None
    final_invalid: bool = False  # an unusable 200 seen too often: give up, the answer is invalid
    unusable: bool = False  # an unusable 200 (counts towards MAX_UNUSABLE_ATTEMPTS)


class TeacherClient:
    """Async client; use as ``async with TeacherClient(...) as c: await c.run(requests)``."""

    def __init__(
        self,
        endpoint: Endpoint,
        cache: ResponseCache,
        run_id: str,
        settings: ClientConfig,
        *,
        limiter: Optional[RateLimiter] = None,
        meter: Optional[SpendMeter] = None,
        counter: Optional[TokenCounter] = None,
        on_result: Optional[Callable[[ClientStats], None]] = None,
        logger: Any = None,
        seed: int = 0,
    ) -> None:
        self.endpoint = endpoint
        self.base_url = endpoint.base_url.rstrip("/")
        self.cache = cache
        self.run_id = run_id
        self.settings = settings
        self.timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self.limiter = limiter if limiter is not None and limiter.active else None
        # the provider's own x-ratelimit-* count, read from its answers (client.rate_limit_headers)
        self.provider = ProviderLimits() if settings.rate_limit_headers else None
        self.meter = meter
        self.counter = counter or heuristic_counter()
        self.on_result = on_result
        self.log = logger if logger is not None else log  # Prefect's run logger inside a run
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._pause_until = 0.0
        self._session: Optional[aiohttp.ClientSession] = None
        self._flush_scheduled = False
        self._headers = {"Content-Type": "application/json"}
        if endpoint.api_key:
            self._headers["Authorization"] = f"Bearer {endpoint.api_key}"

    def __repr__(self) -> str:  # never show the key
        return f"TeacherClient({self.base_url!r}, concurrency={self.settings.concurrency})"

    async def __aenter__(self) -> TeacherClient:
        self.cache.autoflush = False  # one transaction per event-loop turn, see _schedule_flush
        c = self.settings.concurrency
        connector = aiohttp.TCPConnector(limit=c, limit_per_host=c, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, headers=self._headers)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.cache.flush()
        self.cache.autoflush = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self, requests: list[TeacherRequest]) -> dict[str, Outcome]:
        """Answer every request: from the cache where possible, otherwise over HTTP."""
        results, todo = from_cache(self.cache, requests, self.stats)
        if self.on_result and results:
            self.on_result(self.stats)
        it = iter(todo)

        async def worker() -> None:
            for req in it:
                results.update(await self._send(req))
                if self.on_result:
                    self.on_result(self.stats)

        await asyncio.gather(*(worker() for _ in range(min(self.settings.concurrency, len(todo)) or 0)))
        return results

    # ------------------------------------------------------------------ one request: the retry loop
    async def _send(self, req: TeacherRequest) -> dict[str, Outcome]:
        """Attempt ``req`` until it is answered, fails for good, or the budget stops it."""
        assert self._session is not None, "use TeacherClient as an async context manager"
        s = self.settings
        est_prompt = self._prompt_estimate(req)
        last_error, unusable = "no attempt made", 0  # unusable: HTTP 200s without usable content so far
        for attempt in range(1, s.max_attempts + 1):
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            reservation = await self._reserve(req, est_prompt)
            if reservation is None:
                return self._budget_stop(req, attempt)
            a = await self._attempt(req, attempt, reservation, est_prompt, unusable)
            if a.outcomes is not None:
                return a.outcomes
            unusable += a.unusable
            last_error = a.msg
            if a.final_invalid:
                self.stats.invalid_answers += 1
                return self._give_up(
                    req,
                    f"invalid answer: {a.msg} ({unusable} unusable answers; not retried further)",
                    attempt,
                    invalid=True,
                )
            if attempt == s.max_attempts:
                break
            self.stats.retries += 1
            delay = backoff_delay(attempt, s.backoff_base_s, s.backoff_max_s, a.retry_after, self._rng)
            if a.http_status == 429 and a.retry_after is not None:
                # the server asked everyone to slow down: pause all workers, not only this one
                self._pause_until = max(self._pause_until, time.monotonic() + a.retry_after)
            self.log.debug("retrying %s after %s in %.2fs", req.keys[0][:12], a.kind, delay)
            await asyncio.sleep(delay)
        return self._give_up(req, f"gave up after {s.max_attempts} attempts; last error: {last_error}", s.max_attempts)

    def _prompt_estimate(self, req: TeacherRequest) -> int:
        if self.meter is not None and self.meter.limit_usd is not None:
            # under a budget: the counter's figure (the teacher's tokenizer when this machine has it; chat overhead)
            return self.counter.count_prompt(req.payload)
        return max(0, req.est_tokens - req.est_out)

    async def _reserve(self, req: TeacherRequest, est_prompt: int) -> Optional[float]:
        """The attempt's worst-case cost, reserved on the spend meter; None once the budget is exhausted."""
        if self.meter is None:
            return 0.0
        reservation = self.meter.estimate(self.endpoint.index, est_prompt, req.est_out)
        return reservation if await self.meter.acquire(self.endpoint.index, reservation) else None

    def _budget_stop(self, req: TeacherRequest, attempt: int) -> dict[str, Outcome]:
        self.stats.not_sent_budget += 1
        why = "not sent: budget.max_usd reached" + (f" (after {attempt - 1} failed attempts)" if attempt > 1 else "")
        out = self._give_up(req, why, attempt - 1)
        for o in out.values():
            o.budget_stop = True
        return out

    # ------------------------------------------------------------------ one attempt
    async def _attempt(
        self, req: TeacherRequest, attempt: int, reservation: float, est_prompt: int, unusable: int
    ) -> _Attempt:
        """Send once and read the answer; its real cost is settled with the meter whatever happens."""
        assert self._session is not None
        usage: tuple[Optional[int], Optional[int]] = (None, None)
        billed = False
        t_attempt = t0 = time.perf_counter()  # busy time from t_attempt (rate-limit wait included), latency from t0
        try:
            if self.limiter is not None:
                await self.limiter.acquire(req.est_tokens)
            if self.provider is not None:
                await self.provider.acquire(req.est_tokens)
            t0 = time.perf_counter()
            self.stats.requests_sent += 1
            try:
                async with self._session.post(self.base_url + req.path, json=req.payload) as resp:
                    status, body, ra_header = resp.status, await resp.read(), resp.headers.get("Retry-After")
                    if self.provider is not None:
                        self.provider.update(resp.headers)
                latency = time.perf_counter() - t0
                if status == 200:
                    usage, billed, result = self._answered(req, attempt, body, latency, unusable)
                    return result
                usage, billed, result = self._refused(req, attempt, status, body, ra_header=ra_header, latency=latency)
                return result
            except TimeoutError:
                if self.provider is not None:
                    self.provider.release()
                return self._failed(
                    req,
                    attempt,
                    "timeout",
                    f"no answer within {self.timeout.total:.0f}s",
                    status=None,
                    latency=time.perf_counter() - t0,
                    usage=usage,
                )
            except (aiohttp.ClientError, ConnectionError, OSError) as e:
                if self.provider is not None:
                    self.provider.release()
                return self._failed(
                    req,
                    attempt,
                    "connection",
                    f"{type(e).__name__}: {e}",
                    status=None,
                    latency=time.perf_counter() - t0,
                    usage=usage,
                )
        finally:
            if self.meter is not None:
                await self.meter.settle(
                    self.endpoint.index,
                    reservation,
                    prompt_tokens=usage[0],
                    completion_tokens=usage[1],
                    est_prompt=est_prompt,
                    billed=billed,
                    busy_s=time.perf_counter() - t_attempt,
                )

    def _answered(
        self, req: TeacherRequest, attempt: int, body: bytes, latency: float, unusable: int
    ) -> tuple[tuple[Optional[int], Optional[int]], bool, _Attempt]:
        """An HTTP 200: the answers, cached and counted; or an unusable body (still billed if it says so)."""
        data = None
        model = req.payload.get("model")
        try:
            data = _loads(body)
            answers, pt, ct = extract_answers(data, len(req.keys))
            got = data.get("model")
            if self.endpoint.check_model and not model_matches(model, got):
                raise ServerError(f"answer is for model {str(got)[:80]!r}, not the {model!r} asked for")
        except (ValueError, ServerError) as e:
            usage = usage_of(data)  # an unusable answer the server billed is still on the bill
            billed = usage[0] is not None or usage[1] is not None
            if isinstance(e, ValueError):
                kind, unusable_now = "bad_json", False
            else:
                kind, unusable_now = (
                    "wrong_model" if str(e).startswith("answer is for model") else "bad_response",
                    True,
                )
            msg = f"HTTP 200 but {kind}: {e}; body starts {snippet(body)!r}"
            final = unusable_now and unusable + 1 >= MAX_UNUSABLE_ATTEMPTS
            return (
                usage,
                billed,
                self._failed(
                    req,
                    attempt,
                    kind,
                    msg,
                    status=200,
                    latency=latency,
                    usage=usage,
                    unusable=unusable_now,
                    final=final,
                ),
            )
        pt, ct, source = self._fill_usage(req.payload, answers, pt, ct)
        self.stats.tokens_reasoning += reasoning_tokens(data)
        self.cache.put_success(
            list(zip(req.keys, answers)), req.payload, self.run_id, attempt=attempt, http_status=200, latency_s=latency
        )
        self._schedule_flush()
        self._count_usage(pt, ct)
        if self.limiter is not None:
            self.limiter.reconcile(req.est_tokens, pt + ct)
        self.stats.requests_ok += 1
        self.stats.bump("ok")
        outcomes = {
            k: Outcome(
                a.text,
                cached=False,
                attempts=attempt,
                prompt_tokens=a.prompt_tokens,
                completion_tokens=a.completion_tokens,
                usage_source=source,
                logprobs=a.logprobs,
                finish_reason=a.finish_reason,
            )
            for k, a in zip(req.keys, answers)
        }
        return (pt, ct), True, _Attempt(outcomes=outcomes)

    def _refused(
        self, req: TeacherRequest, attempt: int, status: int, body: bytes, *, ra_header: Optional[str], latency: float
    ) -> tuple[tuple[Optional[int], Optional[int]], bool, _Attempt]:
        """An error status: its usage read anyway (some servers bill failed calls); final, or worth a retry."""
        try:
            usage = usage_of(_loads(body))
        except Exception:
            usage = (None, None)
        billed = usage[0] is not None or usage[1] is not None
        msg = f"HTTP {status}: {snippet(body, 300)!r}"
        if status not in RETRYABLE_STATUS and is_context_error(body):
            # the prompt does not fit the model: the same request fails the same way every time
            self.stats.context_exceeded += 1
            self._record_failure(
                req, attempt, "context_length", http_status=status, latency=latency, usage=usage, msg=msg
            )
            msg = redact(msg, [self.endpoint.api_key or ""])
            return (
                usage,
                billed,
                _Attempt(
                    outcomes=self._give_up(
                        req, f"prompt longer than the teacher's context: {msg} (not retried)", attempt, invalid=True
                    )
                ),
            )
        if status not in RETRYABLE_STATUS and status < 500:
            self._record_failure(
                req, attempt, f"http_{status}", http_status=status, latency=latency, usage=usage, msg=msg
            )
            msg = redact(msg, [self.endpoint.api_key or ""])
            return usage, billed, _Attempt(outcomes=self._give_up(req, f"{msg} (not retryable)", attempt))
        attempt_result = self._failed(req, attempt, f"http_{status}", msg, status=status, latency=latency, usage=usage)
        attempt_result.retry_after = parse_retry_after(ra_header)
        return usage, billed, attempt_result

    def _failed(
        self,
        req: TeacherRequest,
        attempt: int,
        kind: str,
        msg: str,
        *,
        status: Optional[int],
        latency: float,
        usage: tuple[Optional[int], Optional[int]],
        unusable: bool = False,
        final: bool = False,
    ) -> _Attempt:
        """A failed attempt, recorded in the ledger; the retry loop decides what follows."""
        self._record_failure(req, attempt, kind, http_status=status, latency=latency, usage=usage, msg=msg)
        return _Attempt(
            kind=kind,
            msg=redact(msg, [self.endpoint.api_key or ""]),
            http_status=status,
            final_invalid=final,
            unusable=unusable,
        )

    # ------------------------------------------------------------------ bookkeeping
    def _fill_usage(
        self, payload: dict[str, Any], answers: list[CachedAnswer], pt: Optional[int], ct: Optional[int]
    ) -> tuple[int, int, str]:
        """Usage of an answered request; counted (or estimated) by distill when the server sent none."""
        source = "reported"
        if pt is None or ct is None:
            source = self.counter.usage_source
            counted = 0
            if pt is None:
                pt = self.counter.count_prompt(payload)
                counted += pt
            if ct is None:
                ct = sum(self.counter.count_completion(a.text, a.finish_reason) for a in answers)
                counted += ct
            self.stats.tokens_counted += counted
            answers[0].prompt_tokens, answers[0].completion_tokens = pt, ct
        for a in answers:
            a.usage_source = source
        return pt, ct, source

    def _schedule_flush(self) -> None:
        """Commit queued cache writes at the end of this event-loop turn (before any new I/O wait)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self.cache.flush()

    def _count_usage(self, pt: Optional[int], ct: Optional[int]) -> None:
        self.stats.tokens_in += pt or 0
        self.stats.tokens_out += ct or 0

    def _record_failure(
        self,
        req: TeacherRequest,
        attempt: int,
        kind: str,
        *,
        http_status: Optional[int],
        latency: float,
        usage: tuple[Optional[int], Optional[int]],
        msg: str,
    ) -> None:
        msg = redact(msg, [self.endpoint.api_key or ""])
        self.stats.attempt_errors += 1
        self.stats.bump(kind)
        self._count_usage(*usage)
        self.cache.put_attempt(
            req.keys[0],
            self.run_id,
            attempt,
            status=kind,
            http_status=http_status,
            latency_s=latency,
            prompt_tokens=usage[0],
            completion_tokens=usage[1],
            error=msg,
            model=req.payload.get("model"),
        )
        self._schedule_flush()
        if attempt == 1 or kind != "http_429":
            self.log.warning("teacher attempt %d failed: %s", attempt, msg[:300])

    def _give_up(self, req: TeacherRequest, reason: str, attempts: int, invalid: bool = False) -> dict[str, Outcome]:
        self.stats.requests_failed += 1
        return {k: Outcome(None, cached=False, error=reason, attempts=attempts, invalid=invalid) for k in req.keys}
