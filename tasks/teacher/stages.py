"""The teacher's stages: plan what to ask, probe the endpoint, annotate every shard within the budget.

Each stage is a plain function given the config sections it reads (the pipeline layer,
tasks/pipeline/stages.py, hands them over from the run's config); the Prefect tasks here
are thin wrappers that resolve what must not travel as a parameter (API keys) or cannot
(the template's compiled jinja, the tokenizer) where the shard runs, which on Dask is
another process. Stages hand each other Parquet paths and typed results, never big lists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from prefect import task, unmapped

from distill.config import ClientConfig, PricingConfig, RuntimeConfig, TeacherConfig, Transport
from distill.faults import failpoint
from distill.runtime import resolve_api_key, run_logger, task_runner_for, workers
from tasks.accounting.budget import BudgetExhausted
from tasks.results.accounting import TeacherPrice
from tasks.results.stages import Loaded, Plan
from tasks.results.teacher import ClientStats, PlanFigures, Probe, ShardResult, ShardTotals, Spend
from tasks.teacher.batch import BatchesPending
from tasks.teacher.client import Endpoint
from tasks.teacher.local_server import TeacherServerError, local_teacher
from tasks.teacher.plan import budget_shares, make_plan, plan_text
from tasks.teacher.requests import choices_per_request, transport_of
from tasks.teacher.shard import ShardSettings, SubmitStats, annotate_shard, submit_shard
from tasks.teacher.tokenizer import counter_for
from tasks.templates.load import Template


class ProbeError(TeacherServerError):
    """The teacher did not answer the preflight probe; nothing else was sent."""


@dataclass
class AnnotatedShards:
    """The teacher's answers, per split, and the probe: the annotation before its figures are worked out."""

    pool: list[ShardResult] = field(default_factory=list)
    gold: list[ShardResult] = field(default_factory=list)
    probe: Optional[Probe] = None
    run_id: str = ""  # the run's id in the attempt ledger (the Prefect flow run's, else a fresh one)
    shards_not_started: int = 0  # when the budget stopped the run
    submitted: ClientStats = field(default_factory=ClientStats)  # a batch run's first pass (tasks/teacher/batch.py)

    def split(self, name: str) -> list[ShardResult]:
        return {"pool": self.pool, "gold": self.gold}[name]

    def totals(self, splits: tuple[str, ...] = ("gold", "pool")) -> ShardTotals:
        """The run's figures: the shards of ``splits``, with the probe and the submit pass when both splits count."""
        whole = set(splits) == {"gold", "pool"}
        shards = [r for s in splits for r in self.split(s)]
        return ShardTotals.of(shards, self.probe if whole else None, self.submitted if whole else None)


def endpoints_for(teacher: TeacherConfig, base_url: str) -> list[Endpoint]:
    """The run's endpoints (the main teacher, then each member) with their API keys, read here and now."""
    key = resolve_api_key(teacher.api_key_env, teacher.api_key_secret_block)
    out = [Endpoint(base_url, key, 0, teacher.check_model)]
    for i, m in enumerate(teacher.members, start=1):
        own_key = m.api_key_env or m.api_key_secret_block
        out.append(
            Endpoint(
                m.base_url or base_url,
                resolve_api_key(m.api_key_env, m.api_key_secret_block) if own_key else key,
                i,
                teacher.check_model,
            )
        )
    return out


@dataclass(frozen=True)
class ShardAsk:
    """What every shard task of a run is given (the same for all): picklable, secret-free; the API keys, the
    tokenizer and the template's compiled jinja are made again where the shard runs (on Dask, another process)."""

    template: Template
    teacher: TeacherConfig
    client: ClientConfig
    base_url: str
    run_id: str
    prices: list[TeacherPrice]
    batch_deadline: Optional[float] = None  # epoch seconds: when the run stops waiting for its batches

    def settings(self) -> ShardSettings:
        """What the shard asks with, made where it runs: the endpoints with their keys, the tokenizer."""
        t = self.teacher
        return ShardSettings(
            self.template,
            t,
            self.client,
            endpoints_for(t, self.base_url),
            self.run_id,
            self.prices,
            counter_for(t),
            batch_deadline=self.batch_deadline,
        )


@task(name="annotate-shard", task_run_name="annotate-{name}")
def annotate_shard_task(
    in_path: str,
    out_path: str,
    name: str,  # noqa: ARG001  (names the task run)
    *,
    ask: ShardAsk,
    budget_left_usd: Optional[float] = None,
    prompt_ratio: Optional[float] = None,
    show_progress: bool = True,
) -> ShardResult:
    """Thin Prefect task over :func:`annotate_shard`."""
    return annotate_shard(
        in_path,
        out_path,
        ask.settings(),
        budget_left_usd=budget_left_usd,
        prompt_ratio=prompt_ratio,
        logger=run_logger(),
        show_progress=show_progress,
    )


@task(name="submit-batches", task_run_name="submit-{name}")
def submit_batches_task(
    in_path: str,
    out_path: str,
    name: str,  # noqa: ARG001  (names the task run)
    *,
    ask: ShardAsk,
    budget_left_usd: Optional[float] = None,
) -> SubmitStats:
    """Thin Prefect task over :func:`submit_shard`."""
    return submit_shard(in_path, out_path, ask.settings(), budget_left_usd=budget_left_usd, logger=run_logger())


@task(name="plan")
def plan_task(
    shard_paths: list[str],
    *,
    template: Template,
    teacher: TeacherConfig,
    client: ClientConfig,
    pricing: PricingConfig,
    max_usd: Optional[float],
    prices: list[TeacherPrice],
) -> PlanFigures:
    """The priced plan (no request sent); the counter is built here, where the tokenizer lives."""
    return make_plan(
        shard_paths,
        template=template,
        teacher=teacher,
        client=client,
        pricing=pricing,
        max_usd=max_usd,
        prices=prices,
        counter=counter_for(teacher),
    )


def plan_annotation(
    loaded: Loaded,
    *,
    teacher: TeacherConfig,
    client: ClientConfig,
    pricing: PricingConfig,
    max_usd: Optional[float],
    run_dir: Path,
) -> Plan:
    """The priced plan of what annotation will send (tokens, requests, time, dollars), written and logged."""
    figures = plan_task(
        loaded.gold_shards + loaded.pool_shards,
        template=loaded.template,
        teacher=teacher,
        client=client,
        pricing=pricing,
        max_usd=max_usd,
        prices=loaded.prices,
    )
    text = plan_text(figures)
    (run_dir / "plan.json").write_text(json.dumps(figures.as_dict(), indent=2, default=str))
    run_logger().info("plan before any request:\n%s", text)
    return Plan(figures, text)


@contextlib.contextmanager
def teacher_endpoint(teacher: TeacherConfig) -> Iterator[str]:
    """The teacher's base URL: distill's own local server for the run's duration, or the configured one."""
    if teacher.local:
        with local_teacher(teacher) as url:
            yield url
    else:
        assert teacher.base_url
        yield teacher.base_url


def current_run_id() -> str:
    """The Prefect flow run's id (the attempt ledger groups a run's attempts by it), or a fresh one outside Prefect."""
    from prefect.context import get_run_context

    try:
        return str(get_run_context().flow_run.id)  # type: ignore[union-attr]
    except Exception:
        return uuid.uuid4().hex


def probe_teacher(
    loaded: Loaded,
    *,
    teacher: TeacherConfig,
    client: ClientConfig,
    base_url: str,
    run_id: str,
    max_usd: Optional[float],
    run_dir: Path,
) -> Optional[Probe]:
    """One real item's requests through the run's client, cache and price meter, before any other request.

    Its answers stay in the cache (annotation takes them from there and counts the item) and
    its spend is the run's: the result is the paid part of the probe, no item of it. With the
    batch transport the probe still goes online (one item, at the online price): a wrong key,
    model or template then fails in seconds, not after a batch's 24-hour window.
    """
    import pandas as pd

    probe_dir = run_dir / "preflight"
    src = _probe_item(loaded.gold_shards + loaded.pool_shards, probe_dir)
    if src is None:
        return None
    out = probe_dir / "probe.parquet"
    out.unlink(missing_ok=True)
    r = annotate_shard_task(
        str(src),
        str(out),
        "preflight-probe",
        ask=ShardAsk(loaded.template, _online_only(teacher), client, base_url, run_id, loaded.prices),
        budget_left_usd=max_usd,
        show_progress=False,
    )
    row = pd.read_parquet(r.path).iloc[0]
    if not any(s in ("ok", "invalid") for s in row["sample_status"]):  # an answer outside the label set is the model's
        errors = sorted({str(e) for e in row["sample_errors"] if e})
        raise ProbeError(
            f"teacher at {base_url} (model {teacher.model!r}) did not answer a probe request for item "
            f"{row['id']!r}: {'; '.join(errors)[:600] or 'no answer'}; no other request was sent"
        )
    run_logger().info(
        "preflight: the teacher answered a probe (%d requests sent, %d from the cache)",
        r.client.requests_sent,
        r.client.requests_cached,
    )
    paid = ClientStats(**{**vars(r.client), "requests_cached": 0, "status_counts": dict(r.client.status_counts)})
    spend = Spend(
        r.spend.spent_usd, r.spend.token_usd, r.spend.hourly_usd, r.spend.busy_s, 0.0, r.spend.fresh_answers_usd
    )
    return Probe(
        paid, spend, answers=r.client.requests_ok * choices_per_request(teacher), wall_s=r.times.wall_s, path=r.path
    )


def _online_only(teacher: TeacherConfig) -> TeacherConfig:
    if not uses_batches(teacher):
        return teacher
    members = [m.model_copy(update={"transport": None}) for m in teacher.members]
    return teacher.model_copy(update={"transport": Transport.online, "members": members})


def _probe_item(shards: list[str], out_dir: Path) -> Optional[Path]:
    """One real item (the first of the first non-empty shard) as a one-row Parquet file."""
    import pyarrow.parquet as pq

    for p in shards:
        f = pq.ParquetFile(p)
        if f.metadata.num_rows:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / "probe-input.parquet"
            pq.write_table(f.read_row_group(0).slice(0, 1), path)
            return path
    return None


def annotate_items(
    loaded: Loaded,
    plan: Plan,
    *,
    teacher: TeacherConfig,
    client: ClientConfig,
    max_usd: Optional[float],
    runtime: RuntimeConfig,
    run_dir: Path,
    show_progress: bool = True,
) -> AnnotatedShards:
    """Ask the teacher k samples per item, shard by shard (or all shards at once on Dask), within the budget.

    At the cap it raises :class:`BudgetExhausted` carrying the shards so far; what was paid
    for stays in the cache, so a rerun continues without paying again.
    """
    logger = run_logger()
    if plan.over_budget:
        logger.warning(
            "the plan (about $%.4f) is over budget.max_usd=$%g: the run will stop at the cap", plan.figures.usd, max_usd
        )
    done = AnnotatedShards(run_id=current_run_id())
    with teacher_endpoint(teacher) as base_url:
        logger.info(
            "teacher endpoint %s healthy; model %r, k=%d (%s)",
            base_url,
            teacher.model,
            teacher.samples,
            teacher.variation.value,
        )
        done.probe = probe_teacher(
            loaded,
            teacher=teacher,
            client=client,
            base_url=base_url,
            run_id=done.run_id,
            max_usd=max_usd,
            run_dir=run_dir,
        )
        jobs = [
            _Job(split, p, str(run_dir / "annotations" / split / Path(p).name), f"{split}-{Path(p).stem}")
            for split in ("gold", "pool")
            for p in loaded.shards(split)
        ]
        ask = ShardAsk(loaded.template, teacher, client, base_url, done.run_id, loaded.prices, _deadline(teacher))
        if uses_batches(teacher):  # every shard's batches at the provider before the run waits on the first
            _submit_batches(jobs, ask=ask, max_usd=max_usd, done=done)
        if runtime.task_runner.value == "dask":
            results = _all_at_once(jobs, runtime, budget_shares(max_usd, plan.figures.shard_requests), ask)
            for job, r in zip(jobs, results):
                done.split(job.split).append(r)
        else:
            _one_by_one(jobs, max_usd=max_usd, done=done, ask=ask, show_progress=show_progress)
    if any(r.budget_exhausted for r in done.pool + done.gold):
        done.shards_not_started = sum(len(loaded.shards(s)) - len(done.split(s)) for s in ("gold", "pool"))
        raise BudgetExhausted("budget.max_usd reached", shards=done)
    if any(r.batch_pending for r in done.pool + done.gold):
        raise BatchesPending("batches still at the provider", shards=done)
    return done


def uses_batches(teacher: TeacherConfig) -> bool:
    return any(transport_of(teacher, e) == Transport.batch for e in range(1 + len(teacher.members)))


def _deadline(teacher: TeacherConfig) -> Optional[float]:
    """When the run stops waiting for its batches (epoch seconds; one for every shard of the run)."""
    w = teacher.batch.max_wait_s
    return time.time() + w if w and uses_batches(teacher) else None


def _submit_batches(jobs: list[_Job], *, ask: ShardAsk, max_usd: Optional[float], done: AnnotatedShards) -> None:
    """The first pass of a batch run: submit every shard's batches (as many as ``max_in_flight`` allows)."""
    spent = done.probe.spend.spent_usd if done.probe else 0.0
    held = 0.0
    for job in jobs:
        left = None if max_usd is None else max(0.0, max_usd - spent - held)
        sub = submit_batches_task(job.in_path, job.out_path, job.name, ask=ask, budget_left_usd=left)
        held += sub.reserved_usd
        done.submitted.add(sub.client)


@dataclass(frozen=True)
class _Job:
    split: str
    in_path: str
    out_path: str
    name: str


def _one_by_one(
    jobs: list[_Job],
    *,
    max_usd: Optional[float],
    done: AnnotatedShards,
    ask: ShardAsk,
    show_progress: bool,
) -> None:
    """Shards in this process, each starting with what is left of the budget and the prompt-token ratio learned."""
    spent = done.probe.spend.spent_usd if done.probe else 0.0
    ratio: Optional[float] = None
    for job in jobs:
        left = None if max_usd is None else max(0.0, max_usd - spent)
        r = annotate_shard_task(
            job.in_path,
            job.out_path,
            job.name,
            ask=ask,
            budget_left_usd=left,
            prompt_ratio=ratio,
            show_progress=show_progress,
        )
        spent += r.spend.spent_usd
        ratio = r.prompt_ratio or ratio  # the next shard starts from what this one learned
        done.split(job.split).append(r)
        failpoint("annotate:shard")  # the fault tests: killed between two shards
        if r.budget_exhausted:
            return


def _all_at_once(
    jobs: list[_Job],
    runtime: RuntimeConfig,
    shares: dict[str, Optional[float]],
    ask: ShardAsk,
) -> list[ShardResult]:
    """All shards at once on the configured task runner (Dask), keeping one process's guarantees.

    The budget cap is split across the shards from the plan (``shares``: they sum to the
    cap, so together they cannot cross it); each worker's rate limits are the configured
    ones divided by the workers, so together they keep to them; all workers share the
    response cache file (sqlite in WAL mode, on storage they all reach), so nothing is
    paid twice and a rerun after a crash resumes as in-process. The shards are task runs
    of the flow run itself, submitted to the runner directly (no subflow in between).
    """
    w, client = workers(runtime), ask.client
    per_worker = client.model_copy(
        update={
            "requests_per_minute": client.requests_per_minute / w if client.requests_per_minute else None,
            "tokens_per_minute": client.tokens_per_minute / w if client.tokens_per_minute else None,
        }
    )
    with task_runner_for(runtime) as runner:
        futures = runner.map(
            annotate_shard_task,
            {
                "in_path": [j.in_path for j in jobs],
                "out_path": [j.out_path for j in jobs],
                "name": [j.name for j in jobs],
                "ask": unmapped(dataclasses.replace(ask, client=per_worker)),
                "show_progress": unmapped(False),
                "budget_left_usd": [shares.get(j.in_path) for j in jobs],
                "prompt_ratio": unmapped(None),
            },
        )
        return [f.result() for f in futures]
