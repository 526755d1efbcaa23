"""The priced plan: what a run will send, cost and take, before a single request.

Why: money is spent only after the user has seen the bill. The plan renders every prompt
exactly as the run will, looks each request up in the response cache (cached answers
cost nothing), counts prompt tokens with the teacher's tokenizer where this machine has
it (else calibrates on earlier answers of the same model, else 4 characters per token),
and prices the result. Every figure states how it was estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pyarrow.parquet as pq

from distill.config import DistillConfig, SampleVariation, TeacherMode
from distill.runtime import long_lived_heap_frozen
from tasks.teacher.shard import plan_shard
from tasks.teacher.cache import ResponseCache
from tasks.accounting.pricing import TeacherPrice, busy_cost
from tasks.templates.label import PromptError, PromptTemplate
from tasks.templates.tokens import CHARS_PER_TOKEN, TokenCounter


@dataclass
class _Endpoint:
    requests_total: int = 0
    requests_cached: int = 0
    to_send: int = 0
    chars: int = 0  # prompt characters of the requests to send
    sample_chars: int = 0
    sample_tokens: int = 0
    sampled: int = 0
    choices: int = 0  # answers the requests to send will return


def _prompt_chars(payload: dict[str, Any]) -> int:
    if "messages" in payload:
        return sum(len(str(m.get("content", ""))) for m in payload["messages"])
    return len(str(payload.get("prompt", "")))


def _label_tokens(counter: TokenCounter, labels: list[str], chat: bool, max_tokens: int) -> float:
    per = [counter.count(lab if chat else " " + lab) + 1 for lab in labels]  # +1: the stop token
    return min(float(max_tokens), sum(per) / len(per))


def check_max_tokens(template: PromptTemplate, max_tokens: int, counter: TokenCounter) -> None:
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
            raise PromptError(f"teacher.max_tokens={max_tokens} cannot hold the label {lab!r} ({need} tokens with "
                              f"{counter.method}): raise teacher.max_tokens to at least {need}")


@long_lived_heap_frozen()
def make_plan(cfg: DistillConfig, template: PromptTemplate, shard_paths: list[str], prices: list[TeacherPrice],
              counter: TokenCounter, sample_prompts: int = 2000) -> dict[str, Any]:
    """Estimate requests, tokens, USD and time for annotating ``shard_paths`` with ``cfg``."""
    t = cfg.teacher
    check_max_tokens(template, t.max_tokens, counter)
    cache = ResponseCache(cfg.client.cache_path)
    eps: dict[int, _Endpoint] = {}
    items = 0
    per_shard: dict[str, int] = {}  # requests to send per shard: what a budget split across parallel shards follows
    try:
        for path in shard_paths:
            texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
            items += len(texts)
            plan = plan_shard(texts, cfg, template, samples=False)
            hits = cache.has_many([k for r in plan.requests for k in r.keys])
            per_shard[path] = 0
            for r in plan.requests:
                e = eps.setdefault(r.endpoint, _Endpoint())
                e.requests_total += 1
                if all(k in hits for k in r.keys):
                    e.requests_cached += 1
                    continue
                per_shard[path] += 1
                e.to_send += 1
                e.choices += len(r.keys)
                c = _prompt_chars(r.payload)
                e.chars += c
                if counter.exact and e.sampled < sample_prompts:
                    e.sampled += 1
                    e.sample_chars += c
                    e.sample_tokens += counter.count_prompt(r.payload)
        models = [t.model] + [m.model for m in t.members]
        history = {i: cache.model_history(models[i], t.max_tokens) for i in eps}
    finally:
        cache.close()

    rows = []
    for i, e in sorted(eps.items()):
        price = prices[i] if i < len(prices) else prices[0]
        model = models[i]
        mode = (t.members[i - 1].mode or t.mode) if i > 0 else t.mode
        chat = mode == TeacherMode.chat
        h = history[i]
        # prompt tokens
        if counter.exact and e.sampled:
            ratio = e.sample_tokens / max(1, e.sample_chars)
            tin = round(e.chars * ratio)
            tin_how = (f"{counter.method}" + ("" if e.sampled == e.to_send else
                       f", on {e.sampled:,} of {e.to_send:,} prompts, scaled by characters"))
        elif h["tokens_per_char"]:
            tin = round(e.chars * h["tokens_per_char"])
            tin_how = f"calibrated on {h['usage_n']:,} earlier answers of {model} ({1 / h['tokens_per_char']:.2f} chars/token)"
        else:
            tin = round(e.chars / CHARS_PER_TOKEN) + e.to_send
            tin_how = counter.method if not counter.exact else f"estimated at {CHARS_PER_TOKEN:g} characters per token"
        # completion tokens
        if h["completion_tokens"] is not None:
            per_answer = float(h["completion_tokens"])
            tout_how = f"mean of {h['usage_n']:,} earlier answers of {model} at max_tokens={t.max_tokens}"
        else:
            if template.labels:
                per_answer = _label_tokens(counter, template.labels, chat, t.max_tokens)
                tout_how = f"mean label length + 1 stop token, capped at max_tokens ({counter.method})"
            else:  # free text: as long as the template's example outputs
                per_answer = _label_tokens(counter, [e.label for e in template.examples] or ["x" * 4 * t.max_tokens],
                                           chat, t.max_tokens)
                tout_how = f"mean length of the template's example outputs + 1 stop token, capped at max_tokens ({counter.method})"
        tout = round(e.choices * per_answer)
        # time at the configured limits
        per_req_tokens = (tin + tout) / e.to_send if e.to_send else 0.0
        local = t.local and (i == 0 or t.members[i - 1].base_url is None)
        if h["latency_s"]:
            rps = cfg.client.concurrency / h["latency_s"]
            time_how = (f"measured mean latency {h['latency_s']:.2f} s over {h['latency_n']:,} earlier requests"
                        f" at max_tokens={t.max_tokens}, concurrency {cfg.client.concurrency}")
        elif local:
            lat = (tin / e.to_send if e.to_send else 0.0) / cfg.pricing.assumed_local_tokens_per_s
            rps = 1.0 / lat if lat else float("inf")
            time_how = (f"assumed {cfg.pricing.assumed_local_tokens_per_s:g} prompt tokens/s of the local server "
                        f"(pricing.assumed_local_tokens_per_s; nothing measured yet)")
        else:
            rps = cfg.client.concurrency / cfg.pricing.assumed_remote_latency_s
            time_how = (f"assumed {cfg.pricing.assumed_remote_latency_s:g} s per request (pricing.assumed_remote_latency_s), "
                        f"concurrency {cfg.client.concurrency}")
        limits = []
        if cfg.client.requests_per_minute:
            rps = min(rps, cfg.client.requests_per_minute / 60.0)
            limits.append(f"{cfg.client.requests_per_minute:g} requests/min")
        if cfg.client.tokens_per_minute and per_req_tokens:
            rps = min(rps, cfg.client.tokens_per_minute / 60.0 / per_req_tokens)
            limits.append(f"{cfg.client.tokens_per_minute:g} tokens/min")
        if limits:
            time_how += "; capped by " + " and ".join(limits)
        seconds = e.to_send / rps if e.to_send and rps else 0.0
        if price.kind == "tokens":
            usd = price.token_cost(tin, tout, e.to_send)
            usd_how = f"estimated: tokens above x {price.describe()}"
            b = price.batch_variant()
            usd_batch = b.token_cost(tin, tout, e.to_send) if b is not price else None
        elif price.kind == "hourly":
            usd = busy_cost(price, seconds)
            usd_how = f"estimated: hours above x {price.describe()}"
            usd_batch = None
        else:
            usd, usd_how, usd_batch = 0.0, price.describe(), None
        rows.append({"endpoint": i, "model": model, "requests_total": e.requests_total, "requests_cached": e.requests_cached,
                     "requests_to_send": e.to_send, "tokens_in": tin, "tokens_out": tout, "usd": usd,
                     "usd_batch": usd_batch, "seconds": seconds, "tokens_in_method": tin_how,
                     "tokens_out_method": tout_how, "usd_method": usd_how, "seconds_method": time_how,
                     "price": price.describe()})

    def total(key: str) -> Any:
        return sum(r[key] for r in rows)

    usd = total("usd")
    out: dict[str, Any] = {
        "items": items, "samples_per_item": t.samples, "variation": t.variation.value,
        "requests_total": total("requests_total"), "requests_cached": total("requests_cached"),
        "requests_to_send": total("requests_to_send"), "tokens_in": total("tokens_in"),
        "tokens_out": total("tokens_out"), "usd": usd,
        "usd_batch": (sum(r["usd_batch"] if r["usd_batch"] is not None else r["usd"] for r in rows)
                      if any(r["usd_batch"] is not None for r in rows) else None),
        # endpoints work in parallel with variation 'teachers'; one after another otherwise there is one
        "seconds": max((r["seconds"] for r in rows), default=0.0) if t.variation == SampleVariation.teachers
        else total("seconds"),
        "usd_per_1m_items": _per_1m(rows, items),
        "budget_max_usd": cfg.budget.max_usd,
        "endpoints": rows,
        "shard_requests": per_shard,
    }
    out["over_budget"] = cfg.budget.max_usd is not None and usd > cfg.budget.max_usd
    if len(rows) == 1:
        for k in ("tokens_in_method", "tokens_out_method", "usd_method", "seconds_method", "price"):
            out[k] = rows[0][k]
    return out


def _per_1m(rows: list[dict[str, Any]], items: int) -> Optional[float]:
    """USD per 1M items as if nothing were cached (the to-send cost scaled to all requests)."""
    total = 0.0
    for r in rows:
        if r["requests_to_send"]:
            total += r["usd"] * r["requests_total"] / r["requests_to_send"]
        elif r["requests_total"]:
            return None  # everything cached: no fresh figure to scale
    return total / items * 1e6 if items else None


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


def plan_text(p: dict[str, Any]) -> str:
    """The plan as a markdown table plus the methods, for the terminal and the Prefect artifact."""
    lines = [
        "| teacher | requests (all) | cached | to send | input tokens | output tokens | USD | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p["endpoints"]:
        lines.append(f"| {r['model']} | {r['requests_total']:,} | {r['requests_cached']:,} | {r['requests_to_send']:,} | "
                     f"{r['tokens_in']:,} | {r['tokens_out']:,} | {_money(r['usd'])} | {_dur(r['seconds'])} |")
    lines += [
        "",
        f"{p['items']:,} items x k={p['samples_per_item']} ({p['variation']}): {p['requests_to_send']:,} requests to send, "
        f"about {_money(p['usd'])} and {_dur(p['seconds'])}."
        + (f" With the provider's batch API: {_money(p['usd_batch'])}." if p.get("usd_batch") is not None else "")
        + (f" Per 1M items: {_money(p['usd_per_1m_items'])}." if p.get("usd_per_1m_items") is not None else ""),
    ]
    if p.get("budget_max_usd") is not None:
        lines.append(f"Budget: {_money(p['budget_max_usd'])}" + (" - the plan is OVER budget: the run will stop at the cap."
                                                                 if p["over_budget"] else " - the plan fits."))
    lines.append("")
    lines.append("How each figure was estimated:")
    for r in p["endpoints"]:
        pre = f"{r['model']}: " if len(p["endpoints"]) > 1 else ""
        lines += [f"- {pre}price: {r['price']}", f"- {pre}input tokens: {r['tokens_in_method']}",
                  f"- {pre}output tokens: {r['tokens_out_method']}", f"- {pre}USD: {r['usd_method']}",
                  f"- {pre}time: {r['seconds_method']}"]
    return "\n".join(lines)


def plan_run(cfg: DistillConfig) -> dict[str, Any]:
    """The plan of a whole run from its config, without Prefect: what ``distill plan`` prints."""
    from pathlib import Path

    from tasks.data.load import prepare_inputs
    from tasks.accounting.pricing import resolve_prices
    from tasks.templates.label import load_prompt
    from tasks.templates.tokens import counter_for

    template = load_prompt(cfg.prompt)
    prices = resolve_prices(cfg)
    inputs = prepare_inputs(cfg, template.labels or None, Path(cfg.run_dir) / "input")
    return make_plan(cfg, template, inputs["gold_shards"] + inputs["pool_shards"], prices, counter_for(cfg.teacher))


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
