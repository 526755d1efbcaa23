"""Annotate one shard of items with the teacher: plan its requests, send them, parse the answers, write the part.

Why shards: a shard (a few thousand items) is the unit of work, of Prefect task and of
output file. A shard whose Parquet part exists is done; a shard cut off by a crash is
re-run, and the response cache answers every request that had already succeeded, so
nothing is paid twice and no item is lost. What the shard asks is
tasks/teacher/requests.py; how each request is sent, tasks/teacher/client.py.
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

from distill.config import ClientConfig, TeacherConfig, Transport
from distill.runtime import long_lived_heap_frozen
from tasks.accounting.budget import SpendMeter
from tasks.results.accounting import TeacherPrice
from tasks.results.teacher import AnswerUsage, ClientStats, ShardResult, ShardTimes, Spend
from tasks.teacher.batch import BatchClient
from tasks.teacher.cache import ResponseCache
from tasks.teacher.client import Endpoint, Outcome, TeacherClient, TeacherRequest
from tasks.teacher.label_probs import LabelMatcher, label_distribution
from tasks.teacher.ratelimit import RateLimiter
from tasks.teacher.requests import ShardPlan, choices_per_request, plan_shard, transport_of
from tasks.templates.load import Template
from tasks.templates.tokens import TokenCounter

log = logging.getLogger("distill.annotate")


@dataclass(frozen=True)
class ShardSettings:
    """What every shard of a run is asked with: the same template, teacher, client limits, endpoints and prices."""

    template: Template
    teacher: TeacherConfig
    client: ClientConfig
    endpoints: list[Endpoint]  # index 0 the main teacher, then teacher.members in order
    run_id: str
    prices: list[TeacherPrice] = field(default_factory=list)  # one per endpoint; none: nothing is priced or capped
    counter: Optional[TokenCounter] = None
    batch_deadline: Optional[float] = None  # epoch seconds: the batch transport stops waiting then


@dataclass(frozen=True)
class SubmitStats:
    """What the first pass of a batch run submitted for one shard."""

    client: ClientStats = field(default_factory=ClientStats)  # its batches and requests submitted
    reserved_usd: float = 0.0  # worst-case cost held against budget.max_usd until the batches are collected


def assemble(
    items: pd.DataFrame,
    plan: ShardPlan,
    outcomes: dict[str, Outcome],
    template: Template,
    *,
    k: int,
    label_forms: str = "answer_form",
) -> pd.DataFrame:
    """One row per item with its k answers, parsed votes, label distributions, per-sample status and errors.

    ``sample_probs[j]`` is sample j's label distribution read from its log-probabilities
    (in ``template.labels`` order), None where the answer had none; ``sample_label_mass[j]``
    is the probability the teacher put on the label set at all.
    """
    n = len(items)
    aliases = getattr(template, "aliases", {})  # a writing template has labels [] and no aliases
    matcher = LabelMatcher(template.labels, aliases) if template.labels else None  # None: free text
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
        if o.budget_stop or o.pending:
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
        # a structured answer ({"label": ...}, teacher.constrain: json_schema) or one that reasons first (the
        # template's answer_marker): its first tokens are not the label's, so the item's probability comes from its
        # votes (as without log-probabilities)
        structured = o.text.lstrip().startswith("{") or bool(getattr(template, "answer_marker", None))
        use_lp = o.logprobs is not None and matcher is not None and not structured
        dist = label_distribution(o.logprobs, matcher, label_forms) if use_lp and matcher else None
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

    def __init__(
        self,
        total_requests: int,
        desc: str,
        *,
        logger: Optional[logging.Logger | Any] = None,
        every_s: float = 10.0,
        enabled: bool = True,
        samples_per_item: int = 1,
    ) -> None:
        self.bar = tqdm(
            total=total_requests, desc=desc, unit="sample", disable=not enabled, mininterval=0.5, dynamic_ncols=True
        )
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
                {
                    "items≈": done // self.k,
                    "rps": f"{stats.requests_sent / el:.1f}",
                    "err": stats.attempt_errors,
                    "cached": stats.requests_cached,
                    "tok": stats.tokens_in + stats.tokens_out,
                },
                refresh=False,
            )
        if self.logger is not None and (now - self.last_log >= self.every_s or done == self.total):
            self.last_log = now
            el = max(now - self.t0, 1e-9)
            self.logger.info(
                "annotate: %d/%d samples done (~%d items; %.1f req/s sent, %d cached, %d attempt errors, %d tokens)",
                done,
                self.total,
                done // self.k,
                stats.requests_sent / el,
                stats.requests_cached,
                stats.attempt_errors,
                stats.tokens_in + stats.tokens_out,
            )

    def close(self) -> None:
        self.bar.close()


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
    in_path: str,
    out_path: str,
    run: ShardSettings,
    *,
    budget_left_usd: Optional[float] = None,
    prompt_ratio: Optional[float] = None,
    logger: Any = None,
    show_progress: bool = True,
) -> ShardResult:
    """Annotate one input shard into ``out_path``; a no-op if that part already exists.

    With prices, every attempt is priced, and with ``budget_left_usd`` the shard starts no
    request past that spend. A shard cut short by the budget writes its answers so far to
    ``<part>.partial.parquet`` and not the part itself, so a rerun redoes it (from the
    cache) instead of taking it as finished. ``prompt_ratio`` carries the real/estimated
    prompt-token ratio learned by earlier shards of the run.
    """
    out = Path(out_path)
    if out.exists():
        return ShardResult(str(out), pq.ParquetFile(out).metadata.num_rows, skipped=True)
    items = pq.read_table(in_path).to_pandas()
    plan = plan_shard(items["text"].tolist(), run.teacher, run.template)
    meter = _spend_meter(run, budget_left_usd, prompt_ratio)
    progress = Progress(
        plan.answers,
        f"teacher {Path(in_path).parent.name}/{Path(in_path).stem}",
        logger=logger,
        enabled=show_progress,
        samples_per_item=run.teacher.samples,
    )
    t0 = time.monotonic()  # the shard's wall time: from its first request to its written part
    t_send, cpu_send = time.monotonic(), time.process_time()
    outcomes, stats = _send(plan, run, meter, progress, logger)
    times = ShardTimes(send_s=time.monotonic() - t_send, send_cpu_s=time.process_time() - cpu_send)
    df = assemble(items, plan, outcomes, run.template, k=run.teacher.samples, label_forms=run.teacher.label_forms.value)
    exhausted = stats.not_sent_budget > 0
    pending = stats.batch_pending > 0
    path = _write_part(df, out, partial=exhausted or pending)
    times.wall_s = time.monotonic() - t0
    result = ShardResult(
        path,
        len(df),
        client=stats,
        spend=_spend(plan, outcomes, run.prices, meter),
        usage=_answer_usage(outcomes),
        times=times,
        requests_deduplicated=plan.deduplicated,
        items_reused=int(sum(all(c) for c in df["cached"])),
        prompt_ratio=meter.prompt_ratio if meter and meter.ratio_known else None,
        budget_exhausted=exhausted,
        batch_pending=pending,
    )
    if logger is not None:  # one line per shard: what bench/million.py reads to compare the first and last shard
        s = times.send_s
        logger.info(
            "shard %s/%s done: %d items, %d requests sent in %.2f s (%.1f req/s), %d cached, %.2f s in all, "
            "%.2f s of this process's CPU while sending",
            Path(in_path).parent.name,
            Path(in_path).stem,
            len(df),
            stats.requests_sent,
            s,
            stats.requests_sent / s if s > 0 else 0.0,
            stats.requests_cached,
            times.wall_s,
            times.send_cpu_s,
        )
    return result


def submit_shard(
    in_path: str, out_path: str, run: ShardSettings, *, budget_left_usd: Optional[float] = None, logger: Any = None
) -> SubmitStats:
    """Submit a shard's batches (its batch-transport endpoints' requests) without waiting for them.

    The first of a batch run's two passes over its shards (tasks/teacher/stages.py): every
    shard's batches are at the provider before the run waits on the first one. Nothing is
    written for the shard; the second pass (:func:`annotate_shard`) collects.
    """
    if Path(out_path).exists():
        return SubmitStats()
    items = pq.read_table(in_path).to_pandas()
    plan = plan_shard(items["text"].tolist(), run.teacher, run.template)
    meter = _spend_meter(run, budget_left_usd, None)
    cache = ResponseCache(run.client.cache_path)
    by_endpoint: dict[int, list[TeacherRequest]] = {}
    for r in plan.requests:
        if transport_of(run.teacher, r.endpoint) == Transport.batch:
            by_endpoint.setdefault(r.endpoint, []).append(r)
    stats = ClientStats()

    async def submit(e: int, reqs: list[TeacherRequest]) -> None:
        cl = _batch(run, e, cache=cache, meter=meter, on_result=None, logger=logger)
        async with cl:
            await cl.submit(reqs)
        stats.add(cl.stats)

    try:
        for e, reqs in by_endpoint.items():
            run_async(submit(e, reqs))
    finally:
        cache.close()
    held = meter.reserved_usd if meter is not None else 0.0
    return SubmitStats(stats, held)


def _spend_meter(
    run: ShardSettings, budget_left_usd: Optional[float], prompt_ratio: Optional[float]
) -> Optional[SpendMeter]:
    if not run.prices:
        return None
    exact = run.counter is not None and run.counter.exact
    return SpendMeter(
        run.prices,
        budget_left_usd,
        servers=[e.base_url for e in run.endpoints],
        max_request_s=run.client.timeout_s,
        prompt_ratio=max(1.0, prompt_ratio or 1.0),
        ratio_known=exact or bool(prompt_ratio),
    )


def _send(
    plan: ShardPlan, run: ShardSettings, meter: Optional[SpendMeter], progress: Progress, logger: Any
) -> tuple[dict[str, Outcome], ClientStats]:
    """Every request of the shard through one client per endpoint (at once), the cache first."""
    by_endpoint: dict[int, list[TeacherRequest]] = {}
    for r in plan.requests:
        by_endpoint.setdefault(r.endpoint, []).append(r)
    per_request = choices_per_request(run.teacher)
    cache = ResponseCache(run.client.cache_path)
    clients: dict[int, TeacherClient | BatchClient] = {}

    def on_result(stats: ClientStats) -> None:
        total = stats  # one endpoint (the usual case): no merge per answer
        if len(clients) > 1:
            total = ClientStats.total(cl.stats for cl in clients.values())
        progress.update(total, total.requests_cached + (total.requests_ok + total.requests_failed) * per_request)

    for e in by_endpoint:
        if e >= len(run.endpoints):
            raise ValueError(f"teacher.members[{e - 1}] has no endpoint: pass every member's endpoint")
        make = _batch if transport_of(run.teacher, e) == Transport.batch else _online
        clients[e] = make(run, e, cache=cache, meter=meter, on_result=on_result, logger=logger)

    async def one(e: int) -> dict[str, Outcome]:
        async with clients[e] as cl:
            out = await cl.run(by_endpoint[e])
        if isinstance(cl, BatchClient) and cl.retry_online:  # failed inside batches, retried online by config
            online = _online(run, e, cache=cache, meter=meter, on_result=on_result, logger=logger)
            async with online as oc:
                out.update(await oc.run(cl.retry_online))
            cl.stats.add(online.stats)
        return out

    async def all_endpoints() -> dict[str, Outcome]:
        results: dict[str, Outcome] = {}
        for part in await asyncio.gather(*(one(e) for e in by_endpoint)):
            results.update(part)
        return results

    try:
        outcomes = run_async(all_endpoints())
    finally:
        progress.close()
        cache.close()
    return outcomes, ClientStats.total(cl.stats for cl in clients.values())


def _batch(
    run: ShardSettings, e: int, *, cache: ResponseCache, meter: Optional[SpendMeter], on_result: Any, logger: Any
) -> BatchClient:
    return BatchClient(
        run.endpoints[e],
        cache,
        run.run_id,
        run.client,
        run.teacher.batch,
        meter=meter,
        counter=run.counter,
        on_result=on_result,
        logger=logger,
        deadline=run.batch_deadline,
    )


def _online(
    run: ShardSettings, e: int, *, cache: ResponseCache, meter: Optional[SpendMeter], on_result: Any, logger: Any
) -> TeacherClient:
    c = run.client
    return TeacherClient(
        run.endpoints[e],
        cache,
        run.run_id,
        c,
        on_result=on_result,
        logger=logger,
        limiter=RateLimiter(c.requests_per_minute, c.tokens_per_minute),
        meter=meter,
        counter=run.counter,
    )


def _write_part(df: pd.DataFrame, out: Path, *, partial: bool) -> str:
    """Write the shard's part atomically (a part exists only when complete); a budget-cut shard as ``.partial``."""
    if partial:
        out = out.with_name(out.stem + ".partial.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    tmp.replace(out)
    if not partial:
        out.with_name(out.stem + ".partial.parquet").unlink(missing_ok=True)
    return str(out)


def _spend(
    plan: ShardPlan, outcomes: dict[str, Outcome], prices: list[TeacherPrice], meter: Optional[SpendMeter]
) -> Spend:
    """The meter's bill, and the token price of the answers used (usage sits on a request's first key)."""
    answers_usd = fresh_usd = 0.0
    for r in plan.requests:
        o = outcomes.get(r.keys[0])
        if prices and o is not None and o.text is not None:
            price = prices[min(r.endpoint, len(prices) - 1)]
            price = price.batch_variant() if o.transport == "batch" else price
            c = price.token_cost(o.prompt_tokens, o.completion_tokens, 1)
            answers_usd += c
            fresh_usd += 0.0 if o.cached else c
    if meter is None:
        return Spend(answers_usd=answers_usd, fresh_answers_usd=fresh_usd)
    return Spend(
        spent_usd=meter.spent_usd(),
        token_usd=meter.token_usd,
        hourly_usd=meter.hourly_usd(),
        busy_s=meter.busy_seconds(),
        answers_usd=answers_usd,
        fresh_answers_usd=fresh_usd,
    )


def _answer_usage(outcomes: dict[str, Outcome]) -> AnswerUsage:
    """The usage behind every answer used, fresh or cached: what labelling these items costs."""
    used = [o for o in outcomes.values() if o.text is not None]
    return AnswerUsage(
        answers=len(used),
        tokens_in=sum(o.prompt_tokens or 0 for o in used),
        tokens_out=sum(o.completion_tokens or 0 for o in used),
        estimated=sum(1 for o in used if o.usage_source == "estimated"),
    )
