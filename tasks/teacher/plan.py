"""The priced plan: what a run will send, cost and take, before a single request.

Why: money is spent only after the user has seen the bill. The plan renders every prompt
exactly as the run will (tasks/teacher/requests.py), looks each request up in the response
cache (cached answers cost nothing), counts prompt tokens with the teacher's tokenizer where
this machine has it (else calibrates on earlier answers of the same model, else 4
characters per token), and prices the result, one typed row per endpoint
(tasks/results/teacher.py ``PlanRow``). Every figure states how it was estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.parquet as pq

from distill.config import ClientConfig, PricingConfig, SampleVariation, TeacherConfig, TeacherMode, Transport
from distill.runtime import long_lived_heap_frozen
from tasks.accounting.pricing import busy_cost
from tasks.results.accounting import TeacherPrice
from tasks.results.teacher import PlanFigures, PlanRow
from tasks.teacher.cache import ResponseCache
from tasks.teacher.requests import plan_shard, transport_of
from tasks.templates.base import PromptError
from tasks.templates.load import Template
from tasks.templates.tokens import CHARS_PER_TOKEN, TokenCounter


@dataclass
class _Counts:
    """One endpoint's requests as counted over the shards, before any estimate."""

    requests_total: int = 0
    requests_cached: int = 0
    to_send: int = 0
    chars: int = 0  # prompt characters of the requests to send
    sample_chars: int = 0
    sample_tokens: int = 0
    sampled: int = 0
    choices: int = 0  # answers the requests to send will return


@dataclass(frozen=True)
class _Endpoint:
    """What a row is priced and timed with: the endpoint's model, mode, price and earlier answers."""

    index: int
    model: str
    chat: bool
    local: bool
    price: TeacherPrice
    history: dict[str, Any]


def _prompt_chars(payload: dict[str, Any]) -> int:
    if "messages" in payload:
        return sum(len(str(m.get("content", ""))) for m in payload["messages"])
    return len(str(payload.get("prompt", "")))


def _label_tokens(counter: TokenCounter, labels: list[str], chat: bool, max_tokens: int) -> float:
    per = [counter.count(lab if chat else " " + lab) + 1 for lab in labels]  # +1: the stop token
    return min(float(max_tokens), sum(per) / len(per))


def check_max_tokens(template: Template, max_tokens: int, counter: TokenCounter) -> None:
    """Refuse a ``teacher.max_tokens`` that cannot hold some label, when the teacher's tokenizer can tell.

    A label is written either right after the prompt's output prefix or after a space, so
    each label must fit in max_tokens in at least one of the two forms; otherwise every
    answer naming it would be cut short and parsed as invalid, after being paid for.
    """
    if not counter.exact:
        return
    for lab in template.labels:
        need = min(counter.count(lab), counter.count(" " + lab))
        if need > max_tokens:
            raise PromptError(
                f"teacher.max_tokens={max_tokens} cannot hold the label {lab!r} ({need} tokens with "
                f"{counter.method}): raise teacher.max_tokens to at least {need}"
            )


@long_lived_heap_frozen()
def make_plan(
    shard_paths: list[str],
    *,
    template: Template,
    teacher: TeacherConfig,
    client: ClientConfig,
    pricing: PricingConfig,
    max_usd: Optional[float],
    prices: list[TeacherPrice],
    counter: TokenCounter,
    sample_prompts: int = 2000,
) -> PlanFigures:
    """Estimate requests, tokens, USD and time for annotating ``shard_paths``: one priced row per endpoint."""
    check_max_tokens(template, teacher.max_tokens, counter)
    cache = ResponseCache(client.cache_path)
    try:
        counts, items, per_shard = _count_requests(
            shard_paths, template, teacher, cache=cache, counter=counter, sample_prompts=sample_prompts
        )
        models = [teacher.model] + [m.model for m in teacher.members]
        history = {i: cache.model_history(models[i], teacher.max_tokens) for i in counts}
    finally:
        cache.close()
    rows = []
    for i, c in sorted(counts.items()):
        mode = (teacher.members[i - 1].mode or teacher.mode) if i > 0 else teacher.mode
        ep = _Endpoint(
            i,
            models[i],
            mode == TeacherMode.chat,
            teacher.local and (i == 0 or teacher.members[i - 1].base_url is None),
            prices[i] if i < len(prices) else prices[0],
            history[i],
        )
        rows.append(
            _plan_row(ep, c, template=template, teacher=teacher, client=client, pricing=pricing, counter=counter)
        )
    parallel = teacher.variation == SampleVariation.teachers
    seconds = max((r.seconds for r in rows), default=0.0) if parallel else sum(r.seconds for r in rows)
    return PlanFigures(items, teacher.samples, teacher.variation.value, rows, seconds, max_usd, per_shard)


def _count_requests(
    shard_paths: list[str],
    template: Template,
    teacher: TeacherConfig,
    *,
    cache: ResponseCache,
    counter: TokenCounter,
    sample_prompts: int,
) -> tuple[dict[int, _Counts], int, dict[str, int]]:
    """Every request the run will make, by endpoint: cached or to send, its prompt characters, a tokenized sample."""
    counts: dict[int, _Counts] = {}
    items = 0
    per_shard: dict[str, int] = {}
    for path in shard_paths:
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
        items += len(texts)
        plan = plan_shard(texts, teacher, template, samples=False)
        hits = cache.has_many([k for r in plan.requests for k in r.keys])
        per_shard[path] = 0
        for r in plan.requests:
            c = counts.setdefault(r.endpoint, _Counts())
            c.requests_total += 1
            if all(k in hits for k in r.keys):
                c.requests_cached += 1
                continue
            per_shard[path] += 1
            c.to_send += 1
            c.choices += len(r.keys)
            chars = _prompt_chars(r.payload)
            c.chars += chars
            if counter.exact and c.sampled < sample_prompts:
                c.sampled += 1
                c.sample_chars += chars
                c.sample_tokens += counter.count_prompt(r.payload)
    return counts, items, per_shard


def _plan_row(
    ep: _Endpoint,
    c: _Counts,
    *,
    template: Template,
    teacher: TeacherConfig,
    client: ClientConfig,
    pricing: PricingConfig,
    counter: TokenCounter,
) -> PlanRow:
    tin, tin_how = _prompt_tokens(ep, c, counter)
    per_answer, tout_how = _answer_tokens(ep, template, teacher.max_tokens, counter)
    tout = round(c.choices * per_answer)
    seconds, time_how = _send_time(ep, c, tin, tout, client=client, pricing=pricing, max_tokens=teacher.max_tokens)
    price = ep.price
    transport = transport_of(teacher, ep.index)
    usd_online: Optional[float] = None
    if price.kind == "tokens":
        usd, usd_how = price.token_cost(tin, tout, c.to_send), f"estimated: tokens above x {price.describe()}"
        b = price.batch_variant()
        usd_batch = b.token_cost(tin, tout, c.to_send) if b is not price else None
        if transport == Transport.batch:  # what the run will be billed: the batch price; online beside it
            usd_online, usd = usd, b.token_cost(tin, tout, c.to_send)
            usd_how = f"estimated: tokens above x {b.describe()} (teacher.transport: batch)"
    elif price.kind == "hourly":
        usd, usd_how, usd_batch = busy_cost(price, seconds), f"estimated: hours above x {price.describe()}", None
    else:
        usd, usd_how, usd_batch = 0.0, price.describe(), None
    return PlanRow(
        endpoint=ep.index,
        model=ep.model,
        price=price.describe(),
        requests_total=c.requests_total,
        requests_cached=c.requests_cached,
        requests_to_send=c.to_send,
        tokens_in=tin,
        tokens_out=tout,
        usd=usd,
        usd_batch=usd_batch,
        usd_online=usd_online,
        transport=transport.value,
        seconds=seconds,
        tokens_in_method=tin_how,
        tokens_out_method=tout_how,
        usd_method=usd_how,
        seconds_method=time_how,
    )


def _prompt_tokens(ep: _Endpoint, c: _Counts, counter: TokenCounter) -> tuple[int, str]:
    """Prompt tokens of the requests to send: counted on a sample, else calibrated on history, else estimated."""
    h = ep.history
    if counter.exact and c.sampled:
        scaled = "" if c.sampled == c.to_send else f", on {c.sampled:,} of {c.to_send:,} prompts, scaled by characters"
        return round(c.chars * c.sample_tokens / max(1, c.sample_chars)), counter.method + scaled
    if h["tokens_per_char"]:
        return (
            round(c.chars * h["tokens_per_char"]),
            f"calibrated on {h['usage_n']:,} earlier answers of {ep.model} ({1 / h['tokens_per_char']:.2f} "
            "chars/token)",
        )
    how = counter.method if not counter.exact else f"estimated at {CHARS_PER_TOKEN:g} characters per token"
    return round(c.chars / CHARS_PER_TOKEN) + c.to_send, how


def _answer_tokens(ep: _Endpoint, template: Template, max_tokens: int, counter: TokenCounter) -> tuple[float, str]:
    """Tokens per answer: the mean of earlier answers at this max_tokens, else the labels' (or examples') length."""
    h = ep.history
    if h["completion_tokens"] is not None:
        return float(
            h["completion_tokens"]
        ), f"mean of {h['usage_n']:,} earlier answers of {ep.model} at max_tokens={max_tokens}"
    if template.labels:
        return (
            _label_tokens(counter, template.labels, ep.chat, max_tokens),
            f"mean label length + 1 stop token, capped at max_tokens ({counter.method})",
        )
    # free text: as long as the template's example outputs
    return (
        _label_tokens(counter, [e.label for e in template.examples] or ["x" * 4 * max_tokens], ep.chat, max_tokens),
        f"mean length of the template's example outputs + 1 stop token, capped at max_tokens ({counter.method})",
    )


def _send_time(
    ep: _Endpoint, c: _Counts, tin: int, tout: int, *, client: ClientConfig, pricing: PricingConfig, max_tokens: int
) -> tuple[float, str]:
    """Seconds to send at the configured limits: measured latency, else the assumed local or remote speed."""
    h = ep.history
    per_req_tokens = (tin + tout) / c.to_send if c.to_send else 0.0
    if h["latency_s"]:
        rps = client.concurrency / h["latency_s"]
        how = (
            f"measured mean latency {h['latency_s']:.2f} s over {h['latency_n']:,} earlier requests"
            f" at max_tokens={max_tokens}, concurrency {client.concurrency}"
        )
    elif ep.local:
        lat = (tin / c.to_send if c.to_send else 0.0) / pricing.assumed_local_tokens_per_s
        rps = 1.0 / lat if lat else float("inf")
        how = (
            f"assumed {pricing.assumed_local_tokens_per_s:g} prompt tokens/s of the local server "
            f"(pricing.assumed_local_tokens_per_s; nothing measured yet)"
        )
    else:
        rps = client.concurrency / pricing.assumed_remote_latency_s
        how = (
            f"assumed {pricing.assumed_remote_latency_s:g} s per request (pricing.assumed_remote_latency_s), "
            f"concurrency {client.concurrency}"
        )
    limits = []
    if client.requests_per_minute:
        rps = min(rps, client.requests_per_minute / 60.0)
        limits.append(f"{client.requests_per_minute:g} requests/min")
    if client.tokens_per_minute and per_req_tokens:
        rps = min(rps, client.tokens_per_minute / 60.0 / per_req_tokens)
        limits.append(f"{client.tokens_per_minute:g} tokens/min")
    if limits:
        how += "; capped by " + " and ".join(limits)
    return (c.to_send / rps if c.to_send and rps else 0.0), how


def _money(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def _dur(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def plan_text(p: PlanFigures) -> str:
    """The plan as a markdown table plus the methods, for the terminal and the Prefect artifact."""
    lines = [
        "| teacher | requests (all) | cached | to send | input tokens | output tokens | USD | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p.endpoints:
        lines.append(
            f"| {r.model} | {r.requests_total:,} | {r.requests_cached:,} | {r.requests_to_send:,} | "
            f"{r.tokens_in:,} | {r.tokens_out:,} | {_money(r.usd)} | {_dur(r.seconds)} |"
        )
    lines += [
        "",
        f"{p.items:,} items x k={p.samples_per_item} ({p.variation}): {p.requests_to_send:,} requests to send, "
        + (
            f"about {_money(p.usd)} through the provider's Batch API (answers within its completion window); "
            f"online it would be {_money(p.usd_online)} and {_dur(p.seconds)}."
            if p.batch_transport
            else f"about {_money(p.usd)} and {_dur(p.seconds)}."
            + (
                f" With the provider's Batch API (teacher.transport: batch): {_money(p.usd_batch)}."
                if p.usd_batch is not None
                else ""
            )
        )
        + (f" Per 1M items: {_money(p.usd_per_1m_items)}." if p.usd_per_1m_items is not None else ""),
    ]
    if p.budget_max_usd is not None:
        lines.append(
            f"Budget: {_money(p.budget_max_usd)}"
            + (" - the plan is OVER budget: the run will stop at the cap." if p.over_budget else " - the plan fits.")
        )
    lines.append("")
    lines.append("How each figure was estimated:")
    for r in p.endpoints:
        pre = f"{r.model}: " if len(p.endpoints) > 1 else ""
        lines += [
            f"- {pre}price: {r.price}",
            f"- {pre}input tokens: {r.tokens_in_method}",
            f"- {pre}output tokens: {r.tokens_out_method}",
            f"- {pre}USD: {r.usd_method}",
            f"- {pre}time: {r.seconds_method}",
        ]
    return "\n".join(lines)


def budget_shares(max_usd: Optional[float], shard_requests: dict[str, int]) -> dict[str, Optional[float]]:
    """Split a run's cap across shards that run at once, in proportion to each one's planned requests.

    The shares sum to the cap, so shards spending in parallel can never cross it together;
    a shard that needs more than its share stops at it (its part is written as partial and
    a rerun continues from the cache), and what another shard leaves unused is not lent
    out. Shards with nothing to send get nothing.
    """
    if max_usd is None:
        return {p: None for p in shard_requests}
    total = sum(shard_requests.values())
    return {p: (max_usd * n / total if total else 0.0) for p, n in shard_requests.items()}
