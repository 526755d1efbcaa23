"""The teacher's stages: load -> plan -> preflight -> annotate shards -> aggregate -> report.

Usable alone (``distill annotate CONFIG``, or ``annotate_flow(cfg)`` from Python) and as a
subflow of the full distillation flow. Tasks are coarse: one per stage and one per shard
of a few thousand items, never one per item. Data moves between them as Parquet files.
"""

import contextlib
import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from prefect import task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context

from distill.config import DistillConfig, SampleVariation, SelectionConfig, TrackingConfig
from distill.faults import failpoint
from distill.runtime import resolve_api_key, run_logger, set_offline_env
from tasks.teacher.shard import annotate_shard, choices_per_request
from tasks.accounting.budget import BudgetExhausted
from tasks.teacher.cache import ResponseCache
from tasks.accounting.carbon import measure_energy
from tasks.pipeline.checkpoints import run_lock
from tasks.accounting.costs import teacher_costs
from tasks.data.load import prepare_inputs
from tasks.teacher.local_server import local_teacher
from tasks.teacher.plan import budget_shares, make_plan, plan_text
from tasks.pipeline.preflight import PreflightError, check_outputs, check_probe, probe_item
from tasks.pipeline.runners import task_runner_for, workers
from tasks.accounting.pricing import TeacherPrice, resolve_prices
from tasks.templates.label import PromptTemplate, load_prompt
from tasks.data.select import Selection, commit_selection, select_items
from tasks.pipeline.annotation_report import markdown_summary
from tasks.pipeline.report import annotation_figures, annotation_summary, budget_stop_summary
from tasks.results.stages import Aggregation, Annotation, Loaded, Plan
from tasks.pipeline.task_types import aggregate_task, check_template_suits, task_kind
from tasks.templates.tokens import counter_for

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


def annotate_shards_at_once(jobs: list[tuple[str, str, str, str]], cfg: DistillConfig, base_url: str, run_id: str,
                            prices: list[TeacherPrice], shares: dict[str, float | None]) -> list[dict[str, Any]]:
    """All shards at once on the configured task runner (Dask), keeping one process's guarantees.

    The budget cap is split across the shards from the plan (``shares``: they sum to the
    cap, so together they cannot cross it); each worker's rate limits are the configured
    ones divided by the workers, so together they keep to them; all workers share the
    response cache file (sqlite in WAL mode, on storage they all reach), so nothing is
    paid twice and a rerun after a crash resumes as in-process. The shards are task runs
    of the flow run itself, submitted to the runner directly (no subflow in between).
    """
    w = workers(cfg.runtime)
    c = cfg.client
    per_worker = cfg.model_copy(update={"client": c.model_copy(update={
        "requests_per_minute": c.requests_per_minute / w if c.requests_per_minute else None,
        "tokens_per_minute": c.tokens_per_minute / w if c.tokens_per_minute else None})})
    with task_runner_for(cfg.runtime) as runner:
        futures = runner.map(annotate_shard_task, {
            "in_path": [j[1] for j in jobs], "out_path": [j[2] for j in jobs], "cfg": unmapped(per_worker),
            "base_url": unmapped(base_url), "run_id": unmapped(run_id), "name": [j[3] for j in jobs],
            "show_progress": unmapped(False), "prices": unmapped(prices),
            "budget_left_usd": [shares.get(j[1]) for j in jobs], "prompt_ratio": unmapped(None)})
        return [f.result() for f in futures]


@task(name="load-data")
def load_task(cfg: DistillConfig, labels: Optional[list[str]], out_dir: str) -> dict[str, Any]:
    return prepare_inputs(cfg, labels, Path(out_dir))


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
    """Tonight's items (tasks/data/select.py); the champion is looked up in the configured registry."""
    if selection.strategy.value != "all":
        import mlflow

        from tasks.registry.gate import tracking_uri

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


def load_inputs(cfg: DistillConfig) -> Loaded:
    """Template, prices and data checked and sharded, tonight's items chosen; nothing sent yet.

    Everything that can refuse a run (a template that does not suit the task or cannot give
    k distinct variants, an unpriced teacher, a bad data file) refuses it here.
    """
    logger = run_logger()
    template = load_prompt(cfg.prompt)
    check_template_suits(cfg.task, template, cfg.prompt)
    if cfg.teacher.variation == SampleVariation.prompt_variants:
        template.check_variants(cfg.teacher.samples)  # k distinct prompts, or a clear refusal before any request
    prices = resolve_prices(cfg)  # an unpriced teacher fails here, before any request
    for p in prices:
        logger.info("teacher price: %s", p.describe())
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    inputs = load_task(cfg, template.labels or None, str(run_dir / "input"))
    pr = inputs["pool_report"]
    logger.info("loaded %d pool items (%d empty texts and %d repeated ids set aside, %d repeated texts, "
                "%d rows with invalid UTF-8)", pr["items"], pr["empty_text"], pr["duplicate_ids"],
                pr["duplicate_texts"], pr["invalid_utf8"])
    sel = select_task(inputs["pool_shards"], str(run_dir), cfg.selection, cfg.tracking, cfg.data.chunk_rows)
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
    return Loaded(template, prices, sel.pool_shards, inputs["gold_shards"], inputs["pool_report"],
                  inputs["gold_report"], inputs["pool_rejected"], sel, fp)


def plan_annotation(cfg: DistillConfig, loaded: Loaded) -> Plan:
    """The priced plan of what annotation will send (tokens, requests, time, dollars), written and logged."""
    plan = plan_task(cfg, loaded.gold_shards + loaded.pool_shards, loaded.prices)
    text = plan_text(plan)
    (cfg.run_dir / "plan.json").write_text(json.dumps(plan, indent=2, default=str))
    run_logger().info("plan before any request:\n%s", text)
    return Plan(plan, text)


def dry_run_result(cfg: DistillConfig, plan: Plan) -> dict[str, Any]:
    """What ``--dry-run`` returns: the plan, published as an artifact; nothing was sent."""
    with contextlib.suppress(Exception):
        create_markdown_artifact(markdown="# distill plan (dry run: nothing sent)\n\n" + plan.text, key="distill-plan",
                                 description="priced plan of the annotation, before any request")
    return {"dry_run": True, "plan": plan.figures, "plan_text": plan.text, "run_name": cfg.run_name}


def preflight(cfg: DistillConfig, loaded: Loaded) -> dict[str, Any]:
    """Before any request: the run and cache folders writable and disk for the student (the tracking
    store was written when the run opened); the teacher's probe follows once its endpoint is up."""
    figures = check_outputs(cfg)
    run_logger().info("preflight: outputs writable, %.0f MB free (student needs about %s MB)", figures["disk_free_mb"],
                      "?" if figures["student_mb_needed"] is None else f"{figures['student_mb_needed']:.0f}")
    return figures


def probe_teacher(cfg: DistillConfig, loaded: Loaded, base_url: str, run_id: str) -> Optional[dict[str, Any]]:
    """One real item's requests through the run's client, cache and price meter, before any other request.

    Its answers stay in the cache (annotation takes them from there) and its spend is counted
    with the run's: the result joins the shard results as a shard of no items.
    """
    probe_dir = cfg.run_dir / "preflight"
    src = probe_item(cfg, loaded.gold_shards + loaded.pool_shards, probe_dir)
    if src is None:
        return None
    out = probe_dir / "probe.parquet"
    out.unlink(missing_ok=True)
    r = annotate_shard_task(str(src), str(out), cfg, base_url, run_id, "preflight-probe", False, loaded.prices,
                            cfg.budget.max_usd, None)
    problem = check_probe(r["path"], base_url, cfg.teacher.model)
    if problem:
        raise PreflightError(problem)
    run_logger().info("preflight: the teacher answered a probe (%d requests sent, %d from the cache)",
                      r.get("requests_sent", 0), r.get("requests_cached", 0))
    # the shard that follows takes the probe's answers from the cache and counts them (items, cached answers, their
    # usage): the probe keeps only what it sent and paid, so every figure is what it would be without a probe
    paid = {k: r.get(k) for k in ("requests_sent", "requests_ok", "requests_failed", "attempt_errors", "retries",
                                  "tokens_in", "tokens_out", "status_counts", "wall_s", "tokens_counted", "spent_usd",
                                  "busy_s", "token_usd", "hourly_usd", "fresh_answers_usd", "path")}
    return {**paid, "items": 0, "requests_cached": -int(r.get("requests_ok", 0) or 0) * choices_per_request(cfg),
            "probe": True}


def annotate_items(cfg: DistillConfig, loaded: Loaded, plan: Plan, show_progress: bool = True) -> Annotation:
    """Ask the teacher k samples per item, shard by shard (or all shards on Dask), within the budget.

    At the cap the run stops with :class:`BudgetExhausted` (its text from tasks/pipeline/report.py);
    what was paid for stays in the cache, so a rerun continues without paying again.
    """
    logger = run_logger()
    run_dir = cfg.run_dir
    if plan.over_budget:
        logger.warning("the plan (about $%.4f) is over budget.max_usd=$%g: the run will stop at the cap",
                       plan.figures["usd"], cfg.budget.max_usd)
    run_id = _current_run_id()
    shard_results: dict[str, list[dict[str, Any]]] = {"pool": [], "gold": []}
    spent, exhausted, ratio = 0.0, False, None
    max_usd = cfg.budget.max_usd
    e = cfg.energy
    with measure_energy("teacher", e.country_iso_code, e.measure and cfg.teacher.local, e.cpu_power_w,
                        e.measure_power_secs) as teacher_energy, teacher_endpoint(cfg) as base_url:
        logger.info("teacher endpoint %s healthy; model %r, k=%d (%s)", base_url, cfg.teacher.model,
                    cfg.teacher.samples, cfg.teacher.variation.value)
        probe = probe_teacher(cfg, loaded, base_url, run_id)
        if probe is not None:
            shard_results["gold" if loaded.gold_shards else "pool"].append(probe)
            spent += float(probe.get("spent_usd", 0.0) or 0.0)
        jobs = [(split, p, str(run_dir / "annotations" / split / Path(p).name), f"{split}-{Path(p).stem}")
                for split in ("gold", "pool") for p in loaded.shards(split)]
        if cfg.runtime.task_runner.value == "dask":
            results = annotate_shards_at_once(jobs, cfg, base_url, run_id, loaded.prices,
                                              budget_shares(max_usd, plan.figures["shard_requests"]))
            for (split, *_), r in zip(jobs, results):
                shard_results[split].append(r)
            exhausted = any(r.get("budget_exhausted") for r in results)
        for split, p, out, name in [] if cfg.runtime.task_runner.value == "dask" else jobs:
            if exhausted:
                break
            left = None if max_usd is None else max(0.0, max_usd - spent)
            r = annotate_shard_task(p, out, cfg, base_url, run_id, name, show_progress, loaded.prices, left, ratio)
            spent += float(r.get("spent_usd", 0.0) or 0.0)
            ratio = r.get("prompt_ratio") or ratio  # the next shard starts from what this one learned
            exhausted = exhausted or bool(r.get("budget_exhausted"))
            shard_results[split].append(r)
            failpoint("annotate:shard")  # the fault tests: killed between two shards
    all_results = shard_results["pool"] + shard_results["gold"]
    cache = ResponseCache(cfg.client.cache_path)
    try:
        ledger = cache.ledger_usage(run_id)
    finally:
        cache.close()
    prev_path = run_dir / "annotation_summary.json"
    previous = json.loads(prev_path.read_text()) if prev_path.exists() else None
    if exhausted:
        costs = teacher_costs(cfg, loaded.prices, all_results, ledger, teacher_energy, 0, None, previous,
                              choices_per_request(cfg))
        not_started = sum(len(loaded.shards(sp)) - len(shard_results[sp]) for sp in ("gold", "pool"))
        partial = budget_stop_summary(cfg, plan.figures["usd"], all_results, costs, not_started)
        (run_dir / "budget_stop.json").write_text(json.dumps(partial, indent=2, default=str))
        logger.error(partial["message"])
        with contextlib.suppress(Exception):
            create_markdown_artifact(markdown="# distill stopped at its budget\n\n" + partial["message"],
                                     key="distill-budget-stop", description="the run reached budget.max_usd")
        raise BudgetExhausted(partial["message"], partial)
    commit_selection(run_dir)  # tonight's items are annotated: they join the run's ledger
    figures = annotation_figures(cfg, loaded.prices, shard_results, ledger, teacher_energy, previous)
    return Annotation(shard_results, figures)


def aggregate_answers(cfg: DistillConfig, ann: Annotation) -> Aggregation:
    """The task type's aggregation (vote or medoid) of the pool and of the gold subset, and the teacher on gold."""
    run_dir = cfg.run_dir
    kind = task_kind(cfg.task)
    voted = {split: aggregate_task(ann.paths(split), str(run_dir / "votes" / split), cfg, name=split)
             for split in ("pool", "gold")}
    k = cfg.teacher.samples
    gold: dict[str, Any] = {}
    if voted["gold"]:
        gold.update(kind.teacher_gold_scores(voted["gold"], load_prompt(cfg.prompt)))
        g = kind.aggregate_summary(voted["gold"], k)
        gold["gold_invalid_votes"] = g["invalid_votes"]
        gold["gold_abstained"] = g["abstained"]
    return Aggregation(voted["pool"], voted["gold"], str(run_dir / "votes" / "pool"),
                       kind.aggregate_summary(voted["pool"], k), gold)
