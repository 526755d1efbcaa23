"""The teacher client: one aiohttp session for any OpenAI-compatible endpoint.

Why one module: everything that touches money lives here. Bounded concurrency (a fixed
pool of workers, so memory does not grow with the request count); requests- and
tokens-per-minute limits; retries with exponential backoff and full jitter on 429, 5xx,
timeouts, dropped connections and non-JSON bodies (an HTML error page is an error, never
an answer), honouring Retry-After; a persistent cache consulted before anything is sent;
and the token usage of every attempt recorded in the ledger, retries included.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import aiohttp

from tasks.accounting.budget import SpendMeter
from tasks.teacher.cache import CachedAnswer, ResponseCache
from tasks.teacher.ratelimit import RateLimiter
from tasks.templates.tokens import TokenCounter, heuristic_counter

try:  # orjson ships with prefect; fall back to the stdlib
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    import json

    _loads = json.loads

log = logging.getLogger("distill.teacher")

RETRYABLE_STATUS = {408, 409, 425, 429}


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


@dataclass
class ClientStats:
    requests_sent: int = 0  # HTTP attempts made, retries included
    requests_ok: int = 0
    requests_cached: int = 0  # answers served from the cache (per choice)
    requests_failed: int = 0  # gave up after retries / non-retryable error
    attempt_errors: int = 0
    retries: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_counted: int = 0  # of tokens_in + tokens_out: counted or estimated by distill (no usage in the response)
    not_sent_budget: int = 0  # requests never sent because the budget was exhausted
    invalid_answers: int = 0  # requests given up on an unusable 200 (another model's answer, no choices)
    context_exceeded: int = 0  # requests the server refused as longer than its context (never retried)
    status_counts: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def bump(self, status: str) -> None:
        self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def merged(self, other: "ClientStats") -> "ClientStats":
        """Sum of two clients' counts (one client per endpoint when teachers are mixed)."""
        out = ClientStats(started=min(self.started, other.started))
        for f in ("requests_sent", "requests_ok", "requests_cached", "requests_failed", "attempt_errors", "retries",
                  "tokens_in", "tokens_out", "tokens_counted", "not_sent_budget", "invalid_answers",
                  "context_exceeded"):
            setattr(out, f, getattr(self, f) + getattr(other, f))
        for st in (self.status_counts, other.status_counts):
            for k, v in st.items():
                out.status_counts[k] = out.status_counts.get(k, 0) + v
        return out


class ServerError(Exception):
    pass


# An HTTP 200 whose content is unusable (no choices, another model's answer) is tried at most this many times per
# request: one more attempt rides out a proxy's hiccup; a server that keeps answering that way is not paid again and
# again until max_attempts runs out.
MAX_UNUSABLE_ATTEMPTS = 2

# what servers say when the prompt is longer than their context (OpenAI, vLLM, llama.cpp's servers, TGI, Anthropic);
# such a request fails the same way every time, whatever its status code, so it is never retried
_CONTEXT_ERROR = re.compile(
    r"context[_ ]length[_ ]exceeded|maximum context length|exceeds? (?:the )?(?:model'?s? )?context|"
    r"exceeds? the available context|context window|prompt is too long|too many (?:input |prompt )?tokens|"
    r"input (?:is )?too long|must be <= \d+|longer than the model'?s? (?:maximum )?context",
    re.IGNORECASE)


def is_context_error(body: bytes) -> bool:
    """Whether an error body says the prompt does not fit the model's context."""
    return bool(_CONTEXT_ERROR.search(body[:4000].decode("utf-8", "replace")))


# a dated snapshot or version of the model asked for: gpt-4o-mini -> gpt-4o-mini-2024-07-18, gpt-4-0613,
# claude-3-5-sonnet -> claude-3-5-sonnet-20241022 or @20241022, llama3 -> llama3:latest (Ollama's tags)
_VERSION_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|[-@]\d{8}|-\d{4}|:[\w.-]+|-latest|-v\d+(?:[.:]\d+)*)",
                             re.IGNORECASE)
_MODEL_FILE = re.compile(r"\.(?:gguf|ggml|bin|safetensors)$", re.IGNORECASE)


def model_matches(asked: Optional[str], answered: Any) -> bool:
    """Whether a response's ``model`` names the model that was asked for.

    Lenient where servers are known to differ honestly: no ``model`` in the response (many
    servers send none); the same name in another case; a dated snapshot or tag of the name
    asked (OpenAI answers ``gpt-4o-mini`` as ``gpt-4o-mini-2024-07-18``); the same name
    with or without a ``vendor/`` prefix (routers); and a model *file* (llama.cpp's own
    server without ``--alias`` names the one GGUF it serves; llama-cpp-python, distill's
    local teacher, echoes the name asked). Anything else is another model's answer.
    """
    if not asked or not isinstance(answered, str) or not answered.strip():
        return True
    a, g = asked.strip().lower(), answered.strip().lower()
    if a == g:
        return True
    if _MODEL_FILE.search(g) or g.startswith(("/", "./", "~")):
        return True
    for x, y in ((a, g), (a.rsplit("/", 1)[-1], g.rsplit("/", 1)[-1])):
        if x == y or (y.startswith(x) and _VERSION_SUFFIX.fullmatch(y[len(x):])):
            return True
        # "-latest" asked, a dated snapshot answered (claude-3-5-sonnet-latest -> claude-3-5-sonnet-20241022)
        if x.endswith("-latest") and y.startswith(x[:-len("latest")]) and _VERSION_SUFFIX.fullmatch("-" + y[len(x) - 6:]):
            return True
    return False


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    return max(0.0, dt.timestamp() - (now if now is not None else time.time()))


def backoff_delay(attempt: int, base: float, cap: float, retry_after: Optional[float], rng: random.Random) -> float:
    """Full-jitter exponential backoff; a Retry-After from the server is a floor."""
    delay = rng.uniform(0, min(cap, base * (2 ** (attempt - 1))))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def _usage(data: Any) -> tuple[Optional[int], Optional[int]]:
    """(prompt_tokens, completion_tokens) of an OpenAI-style body, None where absent."""
    usage = data.get("usage") if isinstance(data, dict) and isinstance(data.get("usage"), dict) else {}
    pt = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else None
    ct = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else None
    return pt, ct


def _extract(data: Any, n: int) -> tuple[list[CachedAnswer], Optional[int], Optional[int]]:
    """Pull choices and usage out of an OpenAI-style body; raises ServerError if it is not one."""
    if not isinstance(data, dict):
        raise ServerError(f"response JSON is a {type(data).__name__}, not an object")
    pt, ct = _usage(data)
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) < n:
        raise ServerError(f"response has {len(choices) if isinstance(choices, list) else 'no'} choices, expected {n}")
    out = []
    for i, ch in enumerate(sorted(choices[:n], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)):
        if not isinstance(ch, dict):
            raise ServerError("choice is not an object")
        if "text" in ch and isinstance(ch["text"], str):
            text = ch["text"]
        elif isinstance(ch.get("message"), dict) and isinstance(ch["message"].get("content"), str):
            text = ch["message"]["content"]
        else:
            raise ServerError("choice has neither text nor message.content")
        lp = ch.get("logprobs") if isinstance(ch.get("logprobs"), dict) else None
        out.append(CachedAnswer(text, ch.get("finish_reason"), pt if i == 0 else None, ct if i == 0 else None,
                                logprobs=lp))
    return out, pt, ct


class TeacherClient:
    """Async client; use as ``async with TeacherClient(...) as c: await c.run(requests)``."""

    def __init__(
        self,
        base_url: str,
        api_key: Optional[str],
        cache: ResponseCache,
        run_id: str,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        max_attempts: int = 6,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        limiter: Optional[RateLimiter] = None,
        on_result: Optional[Callable[[ClientStats], None]] = None,
        seed: int = 0,
        logger: Any = None,
        meter: Optional[SpendMeter] = None,
        endpoint: int = 0,
        counter: Optional[TokenCounter] = None,
        check_model: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.check_model = check_model  # an answer for another model than asked is invalid (see model_matches)
        self._api_key = api_key
        self.cache = cache
        self.run_id = run_id
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.limiter = limiter if limiter is not None and limiter.active else None
        self.on_result = on_result
        self.log = logger if logger is not None else log  # Prefect's run logger inside a run
        self.stats = ClientStats()
        self.meter = meter
        self.endpoint = endpoint
        self.counter = counter or heuristic_counter()
        self._rng = random.Random(seed)
        self._pause_until = 0.0
        self._session: Optional[aiohttp.ClientSession] = None
        self._flush_scheduled = False
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:  # never show the key
        return f"TeacherClient({self.base_url!r}, concurrency={self.concurrency})"

    async def __aenter__(self) -> "TeacherClient":
        self.cache.autoflush = False  # one transaction per event-loop turn, see _schedule_flush
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=self.concurrency, ttl_dns_cache=300)
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
        results: dict[str, Outcome] = {}
        all_keys = [k for r in requests for k in r.keys]
        hits = self.cache.get_many(all_keys)
        todo: list[TeacherRequest] = []
        for r in requests:
            if all(k in hits for k in r.keys):
                for k in r.keys:
                    h = hits[k]
                    results[k] = Outcome(h.text, cached=True, prompt_tokens=h.prompt_tokens,
                                         completion_tokens=h.completion_tokens, usage_source=h.usage_source,
                                         logprobs=h.logprobs, finish_reason=h.finish_reason)
                self.stats.requests_cached += len(r.keys)
            else:
                todo.append(r)
        if self.on_result and hits:
            self.on_result(self.stats)
        it = iter(todo)

        async def worker() -> None:
            for req in it:
                results.update(await self._send(req))
                if self.on_result:
                    self.on_result(self.stats)

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(todo)) or 0)))
        return results

    async def _send(self, req: TeacherRequest) -> dict[str, Outcome]:
        assert self._session is not None, "use TeacherClient as an async context manager"
        url = self.base_url + req.path
        n = len(req.keys)
        key0 = req.keys[0]
        model = req.payload.get("model")
        if self.meter is not None and self.meter.limit_usd is not None:
            # under a budget: the counter's figure (the teacher's tokenizer when this machine has it; chat overhead included)
            est_prompt = self.counter.count_prompt(req.payload)
        else:
            est_prompt = max(0, req.est_tokens - req.est_out)
        last_error = "no attempt made"
        unusable = 0  # HTTP 200 answers without usable content so far (capped at MAX_UNUSABLE_ATTEMPTS)
        for attempt in range(1, self.max_attempts + 1):
            final_invalid = False
            pause = self._pause_until - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            reservation = 0.0
            if self.meter is not None:
                reservation = self.meter.estimate(self.endpoint, est_prompt, req.est_out)
                if not await self.meter.acquire(self.endpoint, reservation):
                    self.stats.not_sent_budget += 1
                    why = "not sent: budget.max_usd reached" + (f" (after {attempt - 1} failed attempts)" if attempt > 1 else "")
                    out = self._give_up(req, why, attempt - 1)
                    for o in out.values():
                        o.budget_stop = True
                    return out
            billed = False
            pt = ct = None
            t_attempt = time.perf_counter()
            try:
                if self.limiter is not None:
                    await self.limiter.acquire(req.est_tokens)
                retry_after: Optional[float] = None
                http_status: Optional[int] = None
                t0 = time.perf_counter()
                self.stats.requests_sent += 1
                try:
                    async with self._session.post(url, json=req.payload) as resp:
                        http_status = resp.status
                        body = await resp.read()
                        ra_header = resp.headers.get("Retry-After")
                    latency = time.perf_counter() - t0
                    if http_status == 200:
                        data = None
                        try:
                            data = _loads(body)
                            answers, pt, ct = _extract(data, n)
                            got = data.get("model")
                            if self.check_model and not model_matches(model, got):
                                raise ServerError(f"answer is for model {str(got)[:80]!r}, not the {model!r} asked for")
                        except (ValueError, ServerError) as e:
                            pt, ct = _usage(data)  # an unusable answer the server billed is still on the bill
                            billed = pt is not None or ct is not None
                            if isinstance(e, ValueError):
                                raise _Retryable("bad_json", f"HTTP 200 but bad_json: {e}; body starts "
                                                             f"{_snippet(body)!r}") from None
                            unusable += 1
                            kind = "wrong_model" if str(e).startswith("answer is for model") else "bad_response"
                            raise _Retryable(kind, f"HTTP 200 but {kind}: {e}; body starts {_snippet(body)!r}",
                                             final=unusable >= MAX_UNUSABLE_ATTEMPTS) from None
                        pt, ct, source = self._fill_usage(req.payload, answers, pt, ct)
                        billed = True
                        self.cache.put_success(
                            list(zip(req.keys, answers)), req.payload, self.run_id, attempt, http_status, latency
                        )
                        self._schedule_flush()
                        self._count_usage(pt, ct)
                        if self.limiter is not None:
                            self.limiter.reconcile(req.est_tokens, pt + ct)
                        self.stats.requests_ok += 1
                        self.stats.bump("ok")
                        return {k: Outcome(a.text, cached=False, attempts=attempt, prompt_tokens=a.prompt_tokens,
                                           completion_tokens=a.completion_tokens, usage_source=source,
                                           logprobs=a.logprobs, finish_reason=a.finish_reason)
                                for k, a in zip(req.keys, answers)}
                    # an error status: read usage anyway (some servers bill failed calls) and price it
                    try:
                        pt, ct = _usage(_loads(body))
                    except Exception:
                        pt = ct = None
                    billed = pt is not None or ct is not None
                    retry_after = parse_retry_after(ra_header)
                    retryable = http_status in RETRYABLE_STATUS or http_status >= 500
                    kind = f"http_{http_status}"
                    msg = f"HTTP {http_status}: {_snippet(body, 300)!r}"
                    if http_status not in RETRYABLE_STATUS and is_context_error(body):
                        # the prompt does not fit the model: the same request fails the same way every time
                        self.stats.context_exceeded += 1
                        msg = redact(msg, [self._api_key or ""])
                        self._record_failure(key0, attempt, "context_length", http_status, latency, pt, ct, msg, model)
                        return self._give_up(req, f"prompt longer than the teacher's context: {msg} (not retried)",
                                             attempt, invalid=True)
                    if not retryable:
                        self._record_failure(key0, attempt, kind, http_status, latency, pt, ct, msg, model)
                        return self._give_up(req, f"{msg} (not retryable)", attempt)
                except _Retryable as e:
                    kind, msg = e.kind, e.msg
                    latency = time.perf_counter() - t0
                    if e.final:
                        final_invalid = True
                except asyncio.TimeoutError:
                    kind, msg = "timeout", f"no answer within {self.timeout.total:.0f}s"
                    latency = time.perf_counter() - t0
                except (aiohttp.ClientError, ConnectionError, OSError) as e:
                    kind, msg = "connection", f"{type(e).__name__}: {e}"
                    latency = time.perf_counter() - t0
            finally:
                if self.meter is not None:
                    await self.meter.settle(self.endpoint, reservation, pt, ct, est_prompt, billed,
                                            time.perf_counter() - t_attempt)
            msg = redact(msg, [self._api_key or ""])
            last_error = msg
            self._record_failure(key0, attempt, kind, http_status, latency, pt, ct, msg, model)
            if final_invalid:
                self.stats.invalid_answers += 1
                return self._give_up(req, f"invalid answer: {msg} ({unusable} unusable answers; not retried "
                                          f"further)", attempt, invalid=True)
            if attempt == self.max_attempts:
                break
            self.stats.retries += 1
            delay = backoff_delay(attempt, self.backoff_base_s, self.backoff_max_s, retry_after, self._rng)
            if http_status == 429 and retry_after is not None:
                # the server asked everyone to slow down: pause all workers, not only this one
                self._pause_until = max(self._pause_until, time.monotonic() + retry_after)
            self.log.debug("retrying %s after %s in %.2fs", key0[:12], kind, delay)
            await asyncio.sleep(delay)
        return self._give_up(req, f"gave up after {self.max_attempts} attempts; last error: {last_error}", self.max_attempts)

    def _fill_usage(self, payload: dict[str, Any], answers: list[CachedAnswer], pt: Optional[int],
                    ct: Optional[int]) -> tuple[int, int, str]:
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

    def _record_failure(self, key: str, attempt: int, kind: str, http_status: Optional[int], latency: float,
                        pt: Optional[int], ct: Optional[int], msg: str, model: Optional[str] = None) -> None:
        self.stats.attempt_errors += 1
        self.stats.bump(kind)
        self._count_usage(pt, ct)
        self.cache.put_attempt(key, self.run_id, attempt, kind, http_status, latency, pt, ct, msg, model)
        self._schedule_flush()
        if attempt == 1 or kind not in ("http_429",):
            self.log.warning("teacher attempt %d failed: %s", attempt, msg[:300])

    def _give_up(self, req: TeacherRequest, reason: str, attempts: int, invalid: bool = False) -> dict[str, Outcome]:
        self.stats.requests_failed += 1
        return {k: Outcome(None, cached=False, error=reason, attempts=attempts, invalid=invalid) for k in req.keys}


class _Retryable(Exception):
    def __init__(self, kind: str, msg: str, final: bool = False) -> None:
        super().__init__(msg)
        self.kind = kind
        self.msg = msg
        self.final = final  # no further attempt: the answer is invalid


def _snippet(body: bytes, n: int = 160) -> str:
    return body[:n].decode("utf-8", "replace").replace("\n", " ")
