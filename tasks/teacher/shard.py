"""Annotate shards of items with the teacher: render k prompts per item, send, parse.

Why shards: a shard (a few thousand items) is the unit of work, of Prefect task and of
output file. A shard whose Parquet part exists is done; a shard cut off by a crash is
re-run, and the response cache answers every request that had already succeeded, so
nothing is paid twice and no item is lost. Requests go out sample-major (all items'
sample 0, then sample 1, ...) so consecutive prompts share their few-shot prefix, which
a llama.cpp server reuses from its KV cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from distill.config import DistillConfig, SampleVariation, TeacherConfig, TeacherMode
from distill.runtime import long_lived_heap_frozen
from tasks.accounting.budget import SpendMeter
from tasks.teacher.cache import KeyMaker, ResponseCache
from tasks.teacher.label_probs import LabelMatcher, label_distribution
from tasks.accounting.pricing import TeacherPrice
from tasks.templates.label import PromptTemplate, prompt_hash
from tasks.teacher.ratelimit import RateLimiter, estimate_tokens
from tasks.teacher.client import ClientStats, Outcome, TeacherClient, TeacherRequest
from tasks.templates.tokens import TokenCounter

log = logging.getLogger("distill.annotate")


@dataclass
class PlannedSample:
    item_index: int
    sample_index: int
    key: str
    prompt_hash: str


@dataclass
class ShardPlan:
    requests: list[TeacherRequest]
    samples: list[PlannedSample]
    deduplicated: int = 0  # sample requests answered by an identical request of this shard

    @property
    def answers(self) -> int:
        """Distinct answers the requests return (what the progress bar counts to)."""
        return sum(len(r.keys) for r in self.requests)


def sampling_params(cfg: DistillConfig, sample_index: int, mode: TeacherMode = TeacherMode.completion) -> dict[str, Any]:
    """Everything but the prompt that shapes sample ``sample_index``'s answer (part of its cache key)."""
    t = cfg.teacher
    sp: dict[str, Any] = {
        "temperature": t.temperature,
        "top_p": t.top_p,
        "max_tokens": t.max_tokens,
        "stop": list(t.stop),
        "seed": t.seed + (sample_index if t.variation == SampleVariation.temperature else 0),
    }
    if t.logprobs:
        if mode == TeacherMode.chat:
            sp.update({"logprobs": True, "top_logprobs": t.top_logprobs})
        else:
            sp["logprobs"] = t.top_logprobs
    return sp


def endpoint_identity(teacher: TeacherConfig, endpoint: int) -> str:
    """What names the server behind endpoint ``endpoint`` in cache keys, stable across runs.

    A remote endpoint is its base URL; the local teacher, whose port changes every run, is
    its GGUF file (name and size). So two members that serve the same model name from two
    servers never share answers, and the local teacher's answers survive restarts.
    """
    url = teacher.base_url if endpoint == 0 else (teacher.members[endpoint - 1].base_url or teacher.base_url)
    own_url = endpoint > 0 and teacher.members[endpoint - 1].base_url is not None
    if teacher.local and not own_url:
        from tasks.teacher.local_server import default_gguf

        gguf = Path(teacher.gguf_path) if teacher.gguf_path else default_gguf()
        size = gguf.stat().st_size if gguf.exists() else 0
        return f"local:{gguf.name}:{size}"
    return url or ""


def plan_shard(texts: list[str], cfg: DistillConfig, template: PromptTemplate,
               endpoints: Optional[list[str]] = None, samples: bool = True) -> ShardPlan:
    """Build the requests (and the per-sample bookkeeping) for one shard of texts.

    A request identical to one already planned (same endpoint, model, rendered prompt and
    sampling: a repeated text, say) is not planned again: its samples point at the first
    one's answer, and ``deduplicated`` counts them. ``endpoints`` are the endpoints'
    identities (:func:`endpoint_identity`); computed from ``cfg`` when not given. With
    ``samples=False`` (``distill plan``, which only counts requests) the per-sample records
    and their prompt hashes are not built: a third of the time per item.
    """
    t = cfg.teacher
    k = t.samples
    vary = t.variation == SampleVariation.prompt_variants
    if vary:
        template.check_variants(k)
    mixed = t.variation == SampleVariation.teachers
    use_n = t.supports_n and t.variation == SampleVariation.temperature and k > 1
    if endpoints is None:
        endpoints = [endpoint_identity(t, e) for e in range(1 + len(t.members))]
    reqs: list[TeacherRequest] = []
    planned_samples: list[PlannedSample] = []
    planned: set[str] = set()
    dedup = 0
    for i in [0] if use_n else range(k):
        # sample i: which teacher (endpoint index, model, mode) asks it
        if mixed:
            m_idx = i % len(t.members)
            member = t.members[m_idx]
            endpoint, model, mode = m_idx + 1, member.model, member.mode or t.mode
        else:
            endpoint, model, mode = 0, t.model, t.mode
        chat = mode == TeacherMode.chat
        path = "/chat/completions" if chat else "/completions"
        ep = endpoints[endpoint]
        # the key's constant parts (model, sampling, endpoint) serialised once per sample, not per item
        if use_n:
            base = sampling_params(cfg, 0, mode)
            makers = [KeyMaker(model, {**base, "n": k}, j, ep) for j in range(k)]
        else:
            sp = sampling_params(cfg, i, mode)
            makers = [KeyMaker(model, sp, endpoint=ep)]
        for idx, text in enumerate(texts):
            rendered: Any = template.render_chat(text, i, vary) if chat else template.render_completion(text, i, vary)
            keys = [m(rendered) for m in makers]
            if samples:
                ph = prompt_hash(rendered)
                planned_samples.extend(PlannedSample(idx, j if use_n else i, key, ph) for j, key in enumerate(keys))
            if keys[0] in planned:
                dedup += 1
                continue
            planned.add(keys[0])
            payload = {"model": model, **base, "n": k} if use_n else {"model": model, **sp}
            payload["messages" if chat else "prompt"] = rendered
            chars = sum(len(m["content"]) for m in rendered) if chat else len(rendered)
            reqs.append(TeacherRequest(keys, path, payload, estimate_tokens(chars, t.max_tokens, len(keys)), endpoint,
                                       est_out=t.max_tokens * len(keys)))
    return ShardPlan(reqs, planned_samples, dedup)


def assemble(items: pd.DataFrame, plan: ShardPlan, outcomes: dict[str, Outcome], template: PromptTemplate,
             k: int, label_forms: str = "answer_form") -> pd.DataFrame:
    """One row per item with its k answers, parsed votes, label distributions, per-sample status and errors.

    ``sample_probs[j]`` is sample j's label distribution read from its log-probabilities
    (in ``template.labels`` order), None where the answer had none; ``sample_label_mass[j]``
    is the probability the teacher put on the label set at all.
    """
    n = len(items)
    matcher = LabelMatcher(template.labels, template.aliases) if template.labels else None  # None: free text
    answers: list[list[Optional[str]]] = [[None] * k for _ in range(n)]
    votes: list[list[Optional[str]]] = [[None] * k for _ in range(n)]
    status: list[list[str]] = [["failed"] * k for _ in range(n)]
    errors: list[list[Optional[str]]] = [[None] * k for _ in range(n)]
    hashes: list[list[str]] = [[""] * k for _ in range(n)]
    cached: list[list[bool]] = [[False] * k for _ in range(n)]
    probs: list[list[Optional[list[float]]]] = [[None] * k for _ in range(n)]
    mass: list[list[Optional[float]]] = [[None] * k for _ in range(n)]
    finish: list[list[Optional[str]]] = [[None] * k for _ in range(n)]
    for s in plan.samples:
        o = outcomes.get(s.key)
        i, j = s.item_index, s.sample_index
        hashes[i][j] = s.prompt_hash
        if o is None:
            errors[i][j] = "no outcome recorded"
            continue
        cached[i][j] = o.cached
        if o.budget_stop:
            status[i][j] = "not_sent"
        if o.text is None:
            errors[i][j] = o.error
            if o.invalid:  # the server answered, unusably (another model's, no choices): a vote for nothing, not a
                status[i][j] = "invalid"  # transport failure (the item abstains "no valid votes", not "failed")
            continue
        answers[i][j] = o.text
        finish[i][j] = o.finish_reason
        lab = template.parse(o.text)
        votes[i][j] = lab
        status[i][j] = "ok" if lab is not None else "invalid"
        if lab is None:
            errors[i][j] = f"answer not in label set {template.labels}" if template.labels else "empty answer"
        dist = label_distribution(o.logprobs, matcher, label_forms) if o.logprobs is not None and matcher else None
        if dist is not None:
            probs[i][j], mass[i][j] = dist.probs, dist.mass
    out = items.reset_index(drop=True).copy()
    out["answers"] = answers
    out["votes"] = votes
    out["sample_status"] = status
    out["sample_errors"] = errors
    out["prompt_hashes"] = hashes
    out["cached"] = cached
    out["sample_probs"] = probs
    out["sample_label_mass"] = mass
    out["finish_reasons"] = finish
    return out


class Progress:
    """Terminal bar (items, req/s, errors, tokens) and a periodic line through the run logger."""

    def __init__(self, total_requests: int, desc: str, logger: Optional[logging.Logger | Any] = None,
                 every_s: float = 10.0, enabled: bool = True, samples_per_item: int = 1) -> None:
        self.bar = tqdm(total=total_requests, desc=desc, unit="sample", disable=not enabled, mininterval=0.5,
                        dynamic_ncols=True)
        self.k = max(1, samples_per_item)
        self.logger = logger
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.last_post = self.t0
        self.done = 0
        self.total = total_requests

    def update(self, stats: ClientStats, done: int) -> None:
        delta = done - self.done
        self.done = done
        now = time.monotonic()
        if delta:
            self.bar.update(delta)
        if now - self.last_post >= 0.5 or done == self.total:
            self.last_post = now
            el = max(now - self.t0, 1e-9)
            self.bar.set_postfix(
                **{"items≈": done // self.k}, rps=f"{stats.requests_sent / el:.1f}", err=stats.attempt_errors,
                cached=stats.requests_cached,
                tok=stats.tokens_in + stats.tokens_out, refresh=False,
            )
        if self.logger is not None and (now - self.last_log >= self.every_s or done == self.total):
            self.last_log = now
            el = max(now - self.t0, 1e-9)
            self.logger.info(
                "annotate: %d/%d samples done (~%d items; %.1f req/s sent, %d cached, %d attempt errors, %d tokens)",
                done, self.total, done // self.k, stats.requests_sent / el, stats.requests_cached, stats.attempt_errors,
                stats.tokens_in + stats.tokens_out,
            )

    def close(self) -> None:
        self.bar.close()


@dataclass
class ShardResult:
    path: str
    items: int
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    budget_exhausted: bool = False


def run_async(coro: Any) -> Any:
    """Run a coroutine from sync code, even when an event loop already runs in this thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


@long_lived_heap_frozen()
def annotate_shard(
    in_path: str, out_path: str, cfg: DistillConfig, template: PromptTemplate, base_url: str,
    api_key: Optional[str], run_id: str, logger: Any = None, show_progress: bool = True,
    member_endpoints: Optional[list[tuple[str, Optional[str]]]] = None,
    prices: Optional[list[TeacherPrice]] = None, budget_left_usd: Optional[float] = None,
    counter: Optional[TokenCounter] = None, prompt_ratio: Optional[float] = None,
) -> ShardResult:
    """Annotate one input shard into ``out_path``; a no-op if that part already exists.

    ``member_endpoints`` gives (base_url, api_key) per ``teacher.members`` entry, for
    ``variation: teachers``; endpoint 0 is the main teacher (``base_url``, ``api_key``).
    ``prices`` (one per endpoint) price every attempt; with ``budget_left_usd`` the shard
    starts no request past that spend. A shard cut short by the budget writes its answers
    so far to ``<part>.partial.parquet`` and not the part itself, so a rerun redoes it
    (from the cache) instead of taking it as finished. ``prompt_ratio`` carries the
    real/estimated prompt-token ratio learned by earlier shards of the run.
    """
    out = Path(out_path)
    if out.exists():
        n = pq.ParquetFile(out).metadata.num_rows
        return ShardResult(str(out), n, skipped=True)
    items = pq.read_table(in_path).to_pandas()
    plan = plan_shard(items["text"].tolist(), cfg, template)
    cache = ResponseCache(cfg.client.cache_path)
    c = cfg.client
    progress = Progress(plan.answers, f"teacher {Path(in_path).parent.name}/{Path(in_path).stem}", logger,
                        enabled=show_progress, samples_per_item=cfg.teacher.samples)
    t0 = time.monotonic()

    endpoints = [(base_url, api_key)] + list(member_endpoints or [])
    per_request = choices_per_request(cfg)
    meter = None
    if prices:
        exact = counter is not None and counter.exact
        meter = SpendMeter(prices, budget_left_usd, servers=[url for url, _ in endpoints],
                           max_request_s=c.timeout_s, prompt_ratio=max(1.0, prompt_ratio or 1.0),
                           ratio_known=exact or bool(prompt_ratio))

    async def go() -> tuple[dict[str, Outcome], ClientStats]:
        by_endpoint: dict[int, list[TeacherRequest]] = {}
        for r in plan.requests:
            by_endpoint.setdefault(r.endpoint, []).append(r)
        clients: dict[int, TeacherClient] = {}

        def on_result(stats: ClientStats) -> None:
            total = stats  # one endpoint (the usual case): no merge per answer
            if len(clients) > 1:
                total = ClientStats()
                for cl in clients.values():
                    total = total.merged(cl.stats)
            done = total.requests_cached + (total.requests_ok + total.requests_failed) * per_request
            progress.update(total, done)

        for e in by_endpoint:
            if e >= len(endpoints):
                raise ValueError(f"teacher.members[{e - 1}] has no endpoint: pass member_endpoints")
            url, key = endpoints[e]
            clients[e] = TeacherClient(
                url, key, cache, run_id, concurrency=c.concurrency, timeout_s=c.timeout_s,
                max_attempts=c.max_attempts, backoff_base_s=c.backoff_base_s, backoff_max_s=c.backoff_max_s,
                limiter=RateLimiter(c.requests_per_minute, c.tokens_per_minute), on_result=on_result,
                logger=logger, meter=meter, endpoint=e, counter=counter, check_model=cfg.teacher.check_model,
            )

        async def one(e: int) -> dict[str, Outcome]:
            async with clients[e] as cl:
                return await cl.run(by_endpoint[e])

        results: dict[str, Outcome] = {}
        for part in await asyncio.gather(*(one(e) for e in by_endpoint)):
            results.update(part)
        total = ClientStats()
        for cl in clients.values():
            total = total.merged(cl.stats)
        return results, total

    t_send, cpu_send = time.monotonic(), time.process_time()
    try:
        outcomes, stats = run_async(go())
    finally:
        progress.close()
        cache.close()
    send_s, send_cpu_s = time.monotonic() - t_send, time.process_time() - cpu_send
    df = assemble(items, plan, outcomes, template, cfg.teacher.samples, cfg.teacher.label_forms.value)
    exhausted = stats.not_sent_budget > 0
    if exhausted:
        out = out.with_name(out.stem + ".partial.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    tmp.replace(out)  # atomic: a part exists only when complete
    if not exhausted:
        out.with_name(out.stem + ".partial.parquet").unlink(missing_ok=True)
    used = [o for o in outcomes.values() if o.text is not None]
    busy = meter.busy_seconds() if meter else 0.0
    answers_usd = fresh_usd = 0.0  # token price of the answers used (usage sits on a request's first key)
    for r in plan.requests:
        o = outcomes.get(r.keys[0])
        if prices and o is not None and o.text is not None:
            c = prices[min(r.endpoint, len(prices) - 1)].token_cost(o.prompt_tokens, o.completion_tokens, 1)
            answers_usd += c
            fresh_usd += 0.0 if o.cached else c
    st = {
        "requests_sent": stats.requests_sent, "requests_ok": stats.requests_ok,
        "requests_cached": stats.requests_cached, "requests_failed": stats.requests_failed,
        "attempt_errors": stats.attempt_errors, "retries": stats.retries,
        "tokens_in": stats.tokens_in, "tokens_out": stats.tokens_out,
        "status_counts": stats.status_counts, "wall_s": time.monotonic() - t0, "send_s": send_s,
        "send_cpu_s": send_cpu_s,
        "tokens_counted": stats.tokens_counted, "not_sent_budget": stats.not_sent_budget,
        "spent_usd": meter.spent_usd() if meter else 0.0, "busy_s": busy,
        "token_usd": meter.token_usd if meter else 0.0, "hourly_usd": meter.hourly_usd() if meter else 0.0,
        "prompt_ratio": meter.prompt_ratio if meter and meter.ratio_known else None,
        # usage behind every answer used (fresh or cached): what labelling these items costs
        "answers_used": len(used), "answer_tokens_in": sum(o.prompt_tokens or 0 for o in used),
        "answer_tokens_out": sum(o.completion_tokens or 0 for o in used),
        "answers_usage_estimated": sum(1 for o in used if o.usage_source == "estimated"),
        "answers_usd": answers_usd, "fresh_answers_usd": fresh_usd,
        "requests_deduplicated": plan.deduplicated,
        # items every answer of which came from the cache (an earlier run paid for them)
        "items_reused": int(sum(all(c) for c in df["cached"])),
    }
    if logger is not None:  # one line per shard: what bench/million.py reads to compare the first and last shard
        logger.info("shard %s/%s done: %d items, %d requests sent in %.2f s (%.1f req/s), %d cached, %.2f s in all, "
                    "%.2f s of this process's CPU while sending", Path(in_path).parent.name, Path(in_path).stem,
                    len(df), stats.requests_sent, send_s, stats.requests_sent / send_s if send_s > 0 else 0.0,
                    stats.requests_cached, st["wall_s"], send_cpu_s)
    return ShardResult(str(out), len(df), st, budget_exhausted=exhausted)


def choices_per_request(cfg: DistillConfig) -> int:
    t = cfg.teacher
    return t.samples if (t.supports_n and t.variation == SampleVariation.temperature and t.samples > 1) else 1
