"""Stage timing and the MLflow runs around a flow's stages, so the flow body stays the DAG.

``StageClock.stage(name, fn, ...)`` calls one stage and times it. ``DistillRun`` adds what a
``distill`` run keeps in MLflow: one parent run per flow run, tagged with the Prefect
flow run (and linked back), the config, prompt and parameters; each stage's typed result
logged as metrics (named in tasks/pipeline/summary.py) into a nested run (``annotate`` for
the teacher's stages, ``train``, ``evaluate``); a budget stop recorded before it
propagates; and at the end the costs, the summary and the task type's table logged,
written and published.

Resume: a stage that finished in an earlier run with the same inputs (tasks/pipeline/checkpoints.py)
is not run again; its recorded result is logged into this run as if it had just run, and
the summary lists it under ``stages_reused``. Registration is made idempotent in the
registry itself (tasks/registry/gate.py). The run folder is locked for the run's duration.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar, cast

from distill.config import DistillConfig
from distill.faults import failpoint
from distill.links import mlflow_model_version_url, mlflow_run_url, prefect_flow_run_url, publish_links
from distill.runtime import run_logger
from tasks.accounting.budget import BudgetExhausted
from tasks.accounting.costs import StudentSpeed, projection
from tasks.pipeline.checkpoints import STAGE_SECTIONS, StageCheckpoints, run_lock
from tasks.pipeline.preflight import PreflightError
from tasks.pipeline.summary import (
    annotation_summary,
    distill_summary,
    evaluation_figures,
    numeric,
    run_costs,
    stage_metrics,
    training_params,
)
from tasks.pipeline.task_types import TaskKind
from tasks.registry.tracking import setup_tracking, tracking_uri
from tasks.results.classify import ClassifierEvaluation
from tasks.results.stages import Aggregation, Annotation, Evaluation, Loaded, Plan, Registration, Trained
from tasks.templates.load import Template, load_prompt

T = TypeVar("T")


class StageClock:
    """Calls a flow's stages and keeps how long each took (the summary's ``stage_seconds``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.monotonic()

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self._start

    def stage(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        t0 = time.monotonic()
        result = fn(*args, **kwargs)
        self.seconds[name] = time.monotonic() - t0
        return result


def _flow_run() -> tuple[str, str]:
    from prefect.context import get_run_context

    try:
        ctx = get_run_context()
        return str(ctx.flow_run.id), str(ctx.flow_run.name)  # type: ignore[union-attr]
    except Exception:
        return "", ""


class DistillRun(StageClock):
    """The MLflow side of one ``distill`` flow run: parent run, nested stage runs, the report at the end."""

    def __init__(self, cfg: DistillConfig, fresh: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.fresh = fresh
        self.checkpoints: Optional[StageCheckpoints] = None
        self.run_id = ""
        self.tracking_uri = ""
        self._children: dict[str, str] = {}
        self._logged: dict[str, set[str]] = {}  # metric keys already logged per nested run
        self.annotation: dict[str, Any] = {}  # the annotation summary (teacher_report), which the run's summary shows
        self.digests: dict[str, str] = {}  # MLflow dataset name -> digest, for the model card
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> DistillRun:
        cfg = self.cfg
        template = self.template = load_prompt(cfg.prompt)
        self._stack.enter_context(run_lock(cfg.run_dir))  # before anything is written into the folder
        self.checkpoints = StageCheckpoints(cfg.run_dir, enabled=not self.fresh)
        try:  # preflight of the tracking store: the run, its params and an artifact are written before any spend
            self._open_tracking(template)
        except Exception as e:
            self._stack.close()
            raise PreflightError(
                f"MLflow tracking store {self.tracking_uri or tracking_uri(cfg.tracking.tracking_uri)} "
                f"is not reachable or not writable ({type(e).__name__}: {str(e)[:300]}); "
                "nothing was sent to the teacher"
            ) from e
        return self

    def _open_tracking(self, template: Template) -> None:
        import mlflow

        cfg = self.cfg
        self.tracking_uri = setup_tracking(cfg.tracking.tracking_uri, cfg.tracking.experiment)
        fr_id, fr_name = _flow_run()
        tags = {"prefect.flow_run_id": fr_id, "prefect.flow_run_name": fr_name, "distill.run_name": cfg.run_name}
        link = prefect_flow_run_url(fr_id)
        if link:
            tags["prefect.flow_run_url"] = link
        parent = self._stack.enter_context(mlflow.start_run(run_name=cfg.run_name, tags=tags))
        self.run_id = parent.info.run_id
        publish_links({"mlflow-run": mlflow_run_url(self.tracking_uri, parent.info.experiment_id, self.run_id)})
        mlflow.log_params({k: str(v)[:500] for k, v in cfg.public_params().items()})
        mlflow.log_text(Path(template.source).read_text(), "prompt/template.yaml")
        mlflow.set_tag("prompt_hash", template.template_hash())
        mlflow.log_dict(json.loads(cfg.model_dump_json()), "config.json")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        import mlflow

        if isinstance(exc, BudgetExhausted):
            mlflow.log_metrics(
                numeric(
                    {
                        k: exc.summary.get(k)
                        for k in ("teacher_usd", "requests_sent", "not_sent_budget", "budget_max_usd")
                    }
                )
            )
            mlflow.set_tags({"stopped": "budget", "stop_message": str(exc)[:5000]})
        self._stack.__exit__(exc_type, exc, tb)

    @contextlib.contextmanager
    def child(self, name: str) -> Any:
        """The nested MLflow run ``name`` (created on first use, resumed after), as the active run."""
        import mlflow

        if name in self._children:
            with mlflow.start_run(run_id=self._children[name], nested=True) as r:
                yield r
        else:
            with mlflow.start_run(run_name=name, nested=True) as r:
                self._children[name] = r.info.run_id
                yield r

    @property
    def reused(self) -> list[str]:
        return self.checkpoints.reused if self.checkpoints else []

    def stage(self, name: str, fn: Callable[..., T], *args: Any, child: Optional[str] = None, **kwargs: Any) -> T:
        """Run one stage (or take its result from an earlier run), time it, and log its result's metrics."""
        import mlflow

        ck = self.checkpoints
        key = ck.key(name, self.cfg, args) if ck is not None and name in STAGE_SECTIONS else ""
        result: Any = ck.load(name, key) if key and ck is not None else None
        if result is not None and ck is not None:
            self.seconds[name] = 0.0
            run_logger().info(
                "stage %s: finished in an earlier run with the same inputs (%.1f s then): reused",
                name,
                ck.seconds(name) or 0.0,
            )
        else:
            if key and ck is not None and name in ck.why_not:
                run_logger().info("stage %s: recomputed, %s", name, ck.why_not[name])
            result = super().stage(name, fn, *args, **kwargs)
            failpoint(f"{name}:finished")  # the fault tests: the work is done, not yet recorded
            if key and ck is not None:
                ck.save(name, key, result, self.seconds[name])
        with self.child(child) if child else contextlib.nullcontext():
            m = stage_metrics(result, self.cfg.task.value)
            mlflow.log_metrics(m)
            self._logged.setdefault(child or "", set()).update(m)
            if isinstance(result, Trained):
                mlflow.log_params(training_params(result))
            if isinstance(result, Evaluation):
                self._log_evaluation(result)
        return cast(T, result)

    @staticmethod
    def _log_evaluation(ev: Evaluation) -> None:
        import mlflow
        import pandas as pd

        for p in ev.plots:
            mlflow.log_artifact(p, "plots")
        mlflow.log_dict(evaluation_figures(ev), "evaluation.json")
        for artifact, doc in ev.documents.items():
            mlflow.log_dict(doc, artifact)
        for artifact, path in ev.tables.items():
            mlflow.log_table(pd.read_parquet(path), artifact)

    def teacher_report(self, loaded: Loaded, plan: Plan, ann: Annotation, agg: Aggregation) -> dict[str, Any]:
        """The annotation summary, written to the run folder (the next run reads it), logged with its data sets and
        kept for the run's summary."""
        import mlflow
        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas

        from tasks.pipeline.stages import report_task

        cfg = self.cfg
        summary = report_task(annotation_summary(cfg, loaded, plan, ann, agg, clock=self), str(cfg.run_dir))
        self.annotation = summary
        with self.child("annotate"):
            done = self._logged.get("annotate", set())
            mlflow.log_metrics({k: v for k, v in numeric(summary).items() if k not in done})
            mlflow.log_dict(summary, "annotation_summary.json")
            with contextlib.suppress(Exception):
                if cfg.data.gold_path and cfg.data.gold_path.endswith(".parquet"):
                    gold_ds = from_pandas(pd.read_parquet(cfg.data.gold_path), source=cfg.data.gold_path, name="gold")
                    mlflow.log_input(gold_ds, context="evaluation")
                    self.digests["gold"] = gold_ds.digest
                votes_df = pd.concat(
                    [pd.read_parquet(p, columns=["id", "text", "label", "confidence"]) for p in agg.pool_paths]
                )
                votes_ds = from_pandas(votes_df, source=cfg.data.pool_path, name="pool-votes")
                mlflow.log_input(votes_ds, context="training")
                self.digests["pool-votes"] = votes_ds.digest
                self._log_human_labels()
        return summary

    def _log_human_labels(self) -> None:
        """The human-label file this run learns from, as an MLflow dataset with its digest (docs/review.md)."""
        import mlflow
        from mlflow.data.pandas_dataset import from_pandas

        from tasks.data.human_labels import file_for, for_mlflow

        review = self.cfg.review
        path = file_for(review.labels_dir, review.labels_version) if review.labels_dir else None
        if path is None:
            return
        ds = from_pandas(for_mlflow(path), source=str(path), name="human-labels")
        mlflow.log_input(ds, context="training")
        self.digests["human-labels"] = ds.digest

    def report(
        self, kind: TaskKind, ann: Annotation, model: Trained, ev: Evaluation, reg: Registration
    ) -> dict[str, Any]:
        """Costs per 1M items, the summary and its table: logged to MLflow, written, published and returned."""
        import mlflow

        from tasks.accounting.costs import cost_chart, cost_table

        cfg = self.cfg
        f = ev.figures
        speed = f.speed if isinstance(f, ClassifierEvaluation) else f
        student = StudentSpeed(speed.student_items_per_s, speed.student_kwh_per_item, speed.student_kwh_per_item_method)
        proj = projection(
            bill=ann.bill,
            speed=ann.speed,
            student=student,
            reference=cfg.reference,
            energy=cfg.energy,
            pricing=cfg.pricing,
            concurrency=cfg.client.concurrency,
        )
        costs = run_costs(ann, model, proj)
        with contextlib.suppress(Exception):
            mlflow.log_artifact(cost_chart(costs, cfg.run_dir / "evaluation" / "cost_per_1m.png"), "plots")
        for p in ev.plots:
            mlflow.log_artifact(p, "plots")
        mlflow.log_metrics(numeric(costs))
        mlflow.log_dict(costs, "costs.json")
        summary = distill_summary(
            cfg, kind.summary(self.annotation, model, ev, reg, costs), self.run_id, self.tracking_uri, self
        )
        mlflow.log_metrics(numeric({k: summary.get(k) for k in kind.table_keys}))
        mlflow.set_tags(
            {
                "gate_decision": "promoted" if reg.promoted else "rejected",
                "task": kind.name,
                "model_version": reg.model_version,
            }
        )
        table = kind.table(summary) + "\n\n" + cost_table(summary)
        mlflow.log_text(table, "summary.md")
        (cfg.run_dir / "distill_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        self._model_card(kind, summary)
        self._publish(reg, table)
        summary["table"] = table
        return summary

    def _model_card(self, kind: TaskKind, summary: dict[str, Any]) -> None:
        """The version's model card and its prompt in MLflow's prompt registry (tasks/registry/model_card.py)."""
        from tasks.data.remote import is_url, public
        from tasks.registry.model_card import CardFacts, git_commit, publish_model_card, register_prompt

        cfg, template = self.cfg, self.template
        text = Path(template.source).read_text()
        prompt_uri = register_prompt(
            cfg.tracking.model_name, text, source=str(cfg.prompt), prompt_hash=template.template_hash()
        )
        t = cfg.teacher
        endpoint = "embedded llama-server" if t.local else public(t.base_url or "") or "OpenAI"

        def shown(path: Optional[str]) -> str:
            return "n/a" if not path else public(path) if is_url(path) else path

        student = cfg.student
        facts = CardFacts(
            task=kind.name,
            labels=list(getattr(template, "labels", []) or []),
            teacher_model=t.model,
            endpoint=f"{endpoint}, {cfg.teacher.transport.value}",
            teacher_mode=t.mode.value,
            prompt_path=str(cfg.prompt),
            prompt_hash=template.template_hash(),
            prompt_text=text,
            prompt_uri=prompt_uri,
            pool_source=shown(cfg.data.pool_path),
            gold_source=shown(cfg.data.gold_path),
            digests=dict(self.digests),
            student_base=str(getattr(student, "model_path", None) or getattr(student, "base_model", "")),
            commit=git_commit(Path(__file__).resolve().parents[2]),
            config=json.loads(cfg.model_dump_json()),
        )
        publish_model_card(summary, facts, out_path=cfg.run_dir / "model_card.md")

    def _publish(self, reg: Registration, table: str) -> None:
        from prefect.artifacts import create_markdown_artifact

        with contextlib.suppress(Exception):
            publish_links(
                {"mlflow-model-version": mlflow_model_version_url(self.tracking_uri, reg.model_name, reg.model_version)}
            )
            create_markdown_artifact(
                markdown="# distill run\n\n" + table,
                key="distill-summary",
                description="teacher vs student on human gold, speed and the gate decision",
            )
        run_logger().info("distill run finished:\n%s", table)
