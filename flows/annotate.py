"""The ``annotate`` flow: load -> annotate shards -> vote -> report.

Usable alone (``distill annotate CONFIG``, or ``annotate_flow(cfg)`` from Python) and as a
subflow of the full distillation flow. Tasks are coarse: one per stage and one per shard
of a few thousand items, never one per item. Data moves between them as Parquet files.
"""

import contextlib
import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from distill.config import DistillConfig, SampleVariation, SelectionConfig, TrackingConfig
from distill.runtime import resolve_api_key, run_logger, set_offline_env
from tasks.annotate import annotate_shard, choices_per_request
from tasks.budget import BudgetExhausted
from tasks.cache import ResponseCache
from tasks.carbon import measure_energy
from tasks.costs import teacher_costs
from tasks.load import load_task
from tasks.local_teacher import local_teacher
from tasks.plan import budget_shares, make_plan, plan_text
from tasks.runners import task_runner_for, workers
from tasks.pricing import TeacherPrice, resolve_prices
from tasks.prompting import PromptTemplate, load_prompt
from tasks.select import Selection, commit_selection, select_items
from tasks.report import markdown_summary
from tasks.task_types import aggregate_task, check_template_suits, task_kind
from tasks.tokens import counter_for

set_offline_env()


@task(name="annotate-shard", task_run_name="annotate-{name}")
def annotate_shard_task(in_path: str, out_path: str, cfg: DistillConfig, base_url: str, run_id: str,
                        name: str, show_progress: bool = True, prices: list[TeacherPrice] | None = None,
                        budget_left_usd: float | None = None, prompt_ratio: float | None = None) -> dict[str, Any]:
    """Thin Prefect wrapper: the API key is resolved here, never passed as a parameter."""
    template = load_prompt(cfg.prompt)
    t = cfg.teacher
    api_key = resolve_api_key(t.api_key_env, t.api_key_secret_block)
    members = [
        (m.base_url or base_url,
         resolve_api_key(m.api_key_env, m.api_key_secret_block) if (m.api_key_env or m.api_key_secret_block) else api_key)
        for m in t.members
    ]
    res = annotate_shard(in_path, out_path, cfg, template, base_url, api_key, run_id, logger=run_logger(),
                         show_progress=show_progress, member_endpoints=members, prices=prices,
                         budget_left_usd=budget_left_usd, counter=counter_for(t), prompt_ratio=prompt_ratio)
    return {"path": res.path, "items": res.items, "skipped": res.skipped, "budget_exhausted": res.budget_exhausted,
            **res.stats}


@flow(name="annotate-shards")
def annotate_shards_flow(jobs: list[tuple[str, str, str, str]], cfg: DistillConfig, base_url: str, run_id: str,
                         prices: list[TeacherPrice], shares: dict[str, float | None]) -> list[dict[str, Any]]:
    """All shards at once on the task runner this subflow is given (Dask), keeping one process's guarantees.

    The budget cap is split across the shards from the plan (``shares``: they sum to the
    cap, so together they cannot cross it); each worker's rate limits are the configured
    ones divided by the workers, so together they keep to them; all workers share the
    response cache file (sqlite in WAL mode, on storage they all reach), so nothing is
    paid twice and a rerun after a crash resumes as in-process.
    """
    w = workers(cfg.runtime)
    c = cfg.client
    per_worker = cfg.model_copy(update={"client": c.model_copy(update={
        "requests_per_minute": c.requests_per_minute / w if c.requests_per_minute else None,
        "tokens_per_minute": c.tokens_per_minute / w if c.tokens_per_minute else None})})
    futures = annotate_shard_task.map(
        [j[1] for j in jobs], [j[2] for j in jobs], unmapped(per_worker), unmapped(base_url), unmapped(run_id),
        [j[3] for j in jobs], unmapped(False), unmapped(prices), [shares.get(j[1]) for j in jobs], unmapped(None))
    return [f.result() for f in futures]


@task(name="plan")
def plan_task(cfg: DistillConfig, shard_paths: list[str], prices: list[TeacherPrice]) -> dict[str, Any]:
    """The priced plan (no request sent); the counter is built here, where the tokenizer lives."""
    return make_plan(cfg, load_prompt(cfg.prompt), shard_paths, prices, counter_for(cfg.teacher))


@task(name="report")
def report_task(summary: dict[str, Any], run_dir: str) -> dict[str, Any]:
    md = markdown_summary(summary)
    Path(run_dir, "annotation_summary.md").write_text(md)
    Path(run_dir, "annotation_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    with contextlib.suppress(Exception):  # outside a Prefect run there is nowhere to publish
        create_markdown_artifact(markdown=md, key="annotation-summary", description="distill annotation summary")
    return summary


def input_fingerprint(cfg: DistillConfig, template: PromptTemplate, selected_shards: list[str] | None = None) -> str:
    """Hash of what makes existing annotation parts valid; a change invalidates them (the cache stays).

    With a selection, the chosen items change night by night in the same files, so their
    ids are part of the hash.
    """
    def stat(path: str | None) -> list[int] | None:
        if not path or not Path(path).exists():
            return None
        st = Path(path).stat()
        return [st.st_size, st.st_mtime_ns]

    blob = json.dumps(
        {"data": cfg.data.model_dump(mode="json"), "prompt": template.template_hash(),
         "selected": _ids_hash(selected_shards) if selected_shards is not None else None,
         "files": [stat(cfg.data.pool_path), stat(cfg.data.gold_path)],
         "teacher": cfg.teacher.model_dump(mode="json", exclude={"startup_timeout_s", "n_threads",
                                                                 "tokenizer"})},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _ids_hash(shards: list[str]) -> str:
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for p in shards:
        for i in pq.read_table(p, columns=["id"]).column("id").to_pylist():
            h.update(str(i).encode() + b"\0")
    return h.hexdigest()[:16]


@task(name="select-items")
def select_task(pool_shards: list[str], run_dir: str, selection: SelectionConfig, tracking: TrackingConfig,
                chunk_rows: int) -> Selection:
    """Tonight's items (tasks/select.py); the champion is looked up in the configured registry."""
    if selection.strategy.value != "all":
        import mlflow

        from tasks.registry import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(tracking.tracking_uri))
    return select_items(pool_shards, Path(run_dir), selection.strategy.value, selection.max_new_items,
                        selection.seed, f"models:/{tracking.model_name}@{selection.champion_alias}", chunk_rows)


@contextlib.contextmanager
def teacher_endpoint(cfg: DistillConfig) -> Iterator[str]:
    t = cfg.teacher
    if t.local:
        with local_teacher(t.gguf_path, t.n_ctx, t.n_threads, t.model, t.startup_timeout_s, logprobs=t.logprobs) as url:
            yield url
    else:
        assert t.base_url
        yield t.base_url


def _current_run_id() -> str:
    try:
        ctx = get_run_context()
        return str(ctx.flow_run.id)  # type: ignore[union-attr]
    except Exception:
        return uuid.uuid4().hex


def reuse_summary(pool_results: list[dict[str, Any]], usd_per_item: float | None) -> dict[str, Any]:
    """New vs reused pool items and what reusing cached answers saved (what asking again would cost).

    An item is reused when all its answers came from the cache or from a finished part of
    an earlier run (a nightly run over a source that grew annotates only what is new).
    """
    reused = sum(int(r.get("items", 0) or 0) if r.get("skipped") else int(r.get("items_reused", 0) or 0)
                 for r in pool_results)
    total = sum(int(r.get("items", 0) or 0) for r in pool_results)
    return {"items_new": total - reused, "items_reused": reused,
            "reuse_saved_usd": reused * usd_per_item if usd_per_item is not None else None,
            "reuse_saved_usd_method": (f"{reused:,} reused items x teacher_usd_per_item (what labelling one item costs, "
                                       "see its method)") if usd_per_item is not None else "teacher cost per item unknown"}


def _sum(results: list[dict[str, Any]], key: str) -> int:
    return sum(int(r.get(key, 0) or 0) for r in results)


@flow(name="annotate", log_prints=True)
def annotate_flow(config: DistillConfig, show_progress: bool = True, dry_run: bool = False) -> dict[str, Any]:
    """Annotate the pool (and the gold subset) with k teacher samples per item and vote them.

    ``dry_run``: stop after the priced plan; nothing is sent and no teacher is started.
    """
    t_start = time.monotonic()
    cfg = config
    logger = run_logger()
    template = load_prompt(cfg.prompt)
    check_template_suits(cfg.task, template, cfg.prompt)
    kind = task_kind(cfg.task)
    if cfg.teacher.variation == SampleVariation.prompt_variants:
        template.check_variants(cfg.teacher.samples)  # k distinct prompts, or a clear refusal before any request
    prices = resolve_prices(cfg)  # an unpriced teacher fails here, before any request
    for p in prices:
        logger.info("teacher price: %s", p.describe())
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    inputs = load_task(cfg, template.labels or None, str(run_dir / "input"))
    load_s = time.monotonic() - t0
    pr = inputs["pool_report"]
    logger.info("loaded %d pool items (%d empty texts and %d repeated ids set aside, %d repeated texts, "
                "%d rows with invalid UTF-8)", pr["items"], pr["empty_text"], pr["duplicate_ids"],
                pr["duplicate_texts"], pr["invalid_utf8"])
    sel = select_task(inputs["pool_shards"], str(run_dir), cfg.selection, cfg.tracking, cfg.data.chunk_rows)
    inputs["pool_shards"] = sel.pool_shards
    if cfg.selection.strategy.value != "all":
        logger.info("selection: %d items labelled before, %d chosen tonight, %d deferred (%s)", sel.labelled_before,
                    sel.selected, sel.deferred, sel.method)

    fp = input_fingerprint(cfg, template, sel.pool_shards if cfg.selection.strategy.value != "all" else None)
    manifest = run_dir / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") != fp:
        logger.info("config, prompt or items changed since the last run in %s: re-annotating (from cache where "
                    "possible)", run_dir)
        for sub in ("annotations", "votes"):
            shutil.rmtree(run_dir / sub, ignore_errors=True)
    manifest.write_text(json.dumps({"fingerprint": fp, "prompt_hash": template.template_hash()}))
    plan = plan_task(cfg, inputs["gold_shards"] + inputs["pool_shards"], prices)
    ptext = plan_text(plan)
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=2, default=str))
    logger.info("plan before any request:\n%s", ptext)
    if dry_run:
        with contextlib.suppress(Exception):
            create_markdown_artifact(markdown="# distill plan (dry run: nothing sent)\n\n" + ptext, key="distill-plan",
                                     description="priced plan of the annotation, before any request")
        return {"dry_run": True, "plan": plan, "plan_text": ptext, "run_name": cfg.run_name}
    if plan["over_budget"]:
        logger.warning("the plan (about $%.4f) is over budget.max_usd=$%g: the run will stop at the cap",
                       plan["usd"], cfg.budget.max_usd)
    run_id = _current_run_id()
    shard_results: dict[str, list[dict[str, Any]]] = {"pool": [], "gold": []}
    t0 = time.monotonic()
    spent, exhausted, ratio = 0.0, False, None
    max_usd = cfg.budget.max_usd
    e = cfg.energy
    with measure_energy("teacher", e.country_iso_code, e.measure and cfg.teacher.local, e.cpu_power_w,
                        e.measure_power_secs) as teacher_energy, teacher_endpoint(cfg) as base_url:
        logger.info("teacher endpoint %s healthy; model %r, k=%d (%s)", base_url, cfg.teacher.model,
                    cfg.teacher.samples, cfg.teacher.variation.value)
        jobs = [(split, p, str(run_dir / "annotations" / split / Path(p).name), f"{split}-{Path(p).stem}")
                for split in ("gold", "pool") for p in inputs[f"{split}_shards"]]
        if cfg.runtime.task_runner.value == "dask":
            results = annotate_shards_flow.with_options(task_runner=task_runner_for(cfg.runtime))(
                jobs, cfg, base_url, run_id, prices, budget_shares(max_usd, plan["shard_requests"]))
            for (split, *_), r in zip(jobs, results):
                shard_results[split].append(r)
            exhausted = any(r.get("budget_exhausted") for r in results)
        for split, p, out, name in [] if cfg.runtime.task_runner.value == "dask" else jobs:
            if exhausted:
                break
            left = None if max_usd is None else max(0.0, max_usd - spent)
            r = annotate_shard_task(p, out, cfg, base_url, run_id, name, show_progress, prices, left, ratio)
            spent += float(r.get("spent_usd", 0.0) or 0.0)
            ratio = r.get("prompt_ratio") or ratio  # the next shard starts from what this one learned
            exhausted = exhausted or bool(r.get("budget_exhausted"))
            shard_results[split].append(r)
    annotate_s = time.monotonic() - t0
    all_results = shard_results["pool"] + shard_results["gold"]
    cache = ResponseCache(cfg.client.cache_path)
    try:
        ledger = cache.ledger_usage(run_id)
    finally:
        cache.close()
    prev_path = run_dir / "annotation_summary.json"
    previous = json.loads(prev_path.read_text()) if prev_path.exists() else None
    if exhausted:
        costs = teacher_costs(cfg, prices, all_results, ledger, teacher_energy, 0, None, previous,
                              choices_per_request(cfg))
        not_sent = _sum(all_results, "not_sent_budget")
        msg = (f"budget.max_usd=${max_usd:g} reached: spent ${costs['teacher_usd']:.4f} on "
               f"{costs['teacher_attempts']:,} attempts; {not_sent:,} requests in the last shard not sent and "
               f"{sum(len(inputs[f'{sp}_shards']) - len(shard_results[sp]) for sp in ('gold', 'pool'))} shards not "
               f"started. Answers so far are in the cache ({cfg.client.cache_path}) and partial parts in "
               f"{run_dir / 'annotations'}; rerun with a higher budget.max_usd to continue without paying for them again.")
        partial = {"run_name": cfg.run_name, "stopped": "budget", "message": msg, "plan_usd": plan["usd"],
                   "requests_sent": _sum(all_results, "requests_sent"), "requests_ok": _sum(all_results, "requests_ok"),
                   "requests_cached": _sum(all_results, "requests_cached"), "not_sent_budget": not_sent,
                   "budget_max_usd": max_usd, **costs}
        (run_dir / "budget_stop.json").write_text(json.dumps(partial, indent=2, default=str))
        logger.error(msg)
        with contextlib.suppress(Exception):
            create_markdown_artifact(markdown="# distill stopped at its budget\n\n" + msg, key="distill-budget-stop",
                                     description="the run reached budget.max_usd")
        raise BudgetExhausted(msg, partial)

    commit_selection(run_dir)  # tonight's items are annotated: they join the run's ledger
    t0 = time.monotonic()
    voted = {split: aggregate_task([r["path"] for r in shard_results[split]], str(run_dir / "votes" / split), cfg,
                                   name=split)
             for split in ("pool", "gold")}
    vote_s = time.monotonic() - t0

    k = cfg.teacher.samples
    summary: dict[str, Any] = {"run_name": cfg.run_name, "teacher_model": cfg.teacher.model,
                               "samples_per_item": k, "variation": cfg.teacher.variation.value,
                               "aggregation": cfg.vote.aggregation.value, "prompt_hash": template.template_hash()}
    summary.update(kind.aggregate_summary(voted["pool"], k))
    per_request = choices_per_request(cfg)
    sent_wall = sum(r.get("wall_s", 0.0) for r in all_results if r.get("requests_sent"))
    ok = _sum(all_results, "requests_ok")
    summary.update({
        "requests_sent": _sum(all_results, "requests_sent"),
        "requests_ok": ok,
        "requests_cached": _sum(all_results, "requests_cached"),
        "requests_deduplicated": _sum(all_results, "requests_deduplicated"),
        "shards_reused": sum(1 for r in all_results if r.get("skipped")),
        "requests_failed": _sum(all_results, "requests_failed"),
        "retries": _sum(all_results, "retries"),
        "tokens_in": _sum(all_results, "tokens_in"),
        "tokens_out": _sum(all_results, "tokens_out"),
        "teacher_requests_per_s": ok / sent_wall if sent_wall > 0 else None,
        # one request answers `per_request` samples (k with `n`, else 1)
        "teacher_items_per_s": ok * per_request / k / sent_wall if sent_wall > 0 else None,
        "teacher_speed_source": "this run" if sent_wall > 0 else None,
    })
    if summary["teacher_items_per_s"] is None and previous:
        # everything came from the cache: keep the teacher speed measured when it was last asked
        if previous.get("teacher_items_per_s"):
            summary["teacher_items_per_s"] = previous["teacher_items_per_s"]
            summary["teacher_requests_per_s"] = previous.get("teacher_requests_per_s")
            summary["teacher_speed_source"] = "an earlier run (all answers cached now)"
    items_total = sum(int(r.get("items", 0) or 0) for r in all_results if not r.get("skipped"))
    summary.update(teacher_costs(cfg, prices, all_results, ledger, teacher_energy, items_total,
                                 summary["teacher_items_per_s"], previous, per_request))
    summary.update(reuse_summary(shard_results["pool"], summary.get("teacher_usd_per_item")))
    summary.update(sel.summary())
    summary.update({"plan_requests": plan["requests_to_send"], "plan_tokens": plan["tokens_in"] + plan["tokens_out"],
                    "plan_usd": plan["usd"], "plan_seconds": plan["seconds"], "budget_max_usd": max_usd})
    if voted["gold"]:
        summary.update(kind.teacher_gold_scores(voted["gold"], template))
        g = kind.aggregate_summary(voted["gold"], k)
        summary["gold_invalid_votes"] = g["invalid_votes"]
        summary["gold_abstained"] = g["abstained"]
    summary["stage_seconds"] = {"load": round(load_s, 2), "annotate": round(annotate_s, 2), "vote": round(vote_s, 2)}
    summary["wall_s"] = time.monotonic() - t_start
    summary["votes_dir"] = str(run_dir / "votes" / "pool")
    summary["data_pool"] = inputs["pool_report"]
    summary["data_gold"] = inputs["gold_report"]
    summary["pool_rejected_file"] = inputs["pool_rejected"]
    report_task(summary, str(run_dir))
    return summary


__all__ = ["annotate_flow"]

