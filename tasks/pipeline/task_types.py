"""The task-type seam: what differs between labelling (``classify``) and writing (``generate``).

Why a seam: the pipeline (load, plan, annotate, aggregate, train, evaluate, register) is
the same for both; what a teacher answer means, how k samples become one, what the
student is and how it is judged differ. As distilabel's ``TextClassification`` and
``TextGeneration`` share one ``Task``, both task types here answer the same questions, and
the flows ask them instead of testing ``cfg.task`` in every module:

- ``aggregate``: k parsed samples per item -> one answer and its agreement (vote or medoid);
- ``aggregate_summary``: the counts the run report shows for that aggregation;
- ``teacher_gold_scores``: the teacher, single sample and aggregated, on human gold;
- ``train`` / ``evaluate`` / ``register``: the student's stages, each a typed result;
- ``primary_metric``: the gold figure the gate decides on;
- ``summary`` / ``table`` / ``table_keys``: the run report's part that is the task type's own.

Rendering and parsing live with the template (``PromptTemplate`` / ``GenerationTemplate``,
chosen by the template file's ``task:``); the stages are tasks/classify/stages.py and
tasks/generate/stages.py, over each task type's own modules (tasks/classify/train.py,
tasks/classify/evaluate.py, tasks/classify/pyfunc.py for ``classify``; tasks/generate/work.py,
tasks/generate/lora.py, tasks/generate/pyfunc.py for ``generate``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Optional, Protocol

from prefect import task

from distill.config import DistillConfig, TaskType
from tasks.results.stages import Aggregation, Evaluation, Registration, Trained


class TaskKind(Protocol):
    name: str
    primary_metric: str

    def aggregate(self, ann_paths: list[str], out_dir: str, cfg: DistillConfig, template: Any) -> list[str]: ...

    def aggregate_summary(self, voted_paths: list[str], k: int) -> dict[str, Any]: ...

    def teacher_gold_scores(self, voted_gold: list[str], template: Any) -> dict[str, Any]: ...

    def train(self, cfg: DistillConfig, agg: Aggregation, show_progress: bool) -> Trained: ...

    def evaluate(self, cfg: DistillConfig, agg: Aggregation, model: Trained,
                 teacher_items_per_s: Optional[float]) -> Evaluation: ...

    def register(self, cfg: DistillConfig, agg: Aggregation, model: Trained, ev: Evaluation,
                 run_id: str) -> Registration: ...

    def summary(self, ann: dict[str, Any], model: Trained, ev: Evaluation, reg: Registration,
                costs: dict[str, Any]) -> dict[str, Any]: ...

    def table(self, summary: dict[str, Any]) -> str: ...

    @property
    def table_keys(self) -> list[str]: ...


class _Stages:
    """The student's stages and report, delegated to the task type's stages module (imported when used)."""

    stages_module = ""

    def _m(self) -> ModuleType:
        import importlib

        return importlib.import_module(self.stages_module)

    def train(self, cfg: DistillConfig, agg: Aggregation, show_progress: bool) -> Trained:
        return self._m().train_stage(cfg, agg, show_progress)

    def evaluate(self, cfg: DistillConfig, agg: Aggregation, model: Trained,
                 teacher_items_per_s: Optional[float]) -> Evaluation:
        return self._m().evaluate_stage(cfg, agg, model, teacher_items_per_s)

    def register(self, cfg: DistillConfig, agg: Aggregation, model: Trained, ev: Evaluation, run_id: str) -> Registration:
        return self._m().register_stage(cfg, agg, model, ev, run_id)

    def summary(self, ann: dict[str, Any], model: Trained, ev: Evaluation, reg: Registration,
                costs: dict[str, Any]) -> dict[str, Any]:
        return self._m().summary(ann, model, ev, reg, costs)

    def table(self, summary: dict[str, Any]) -> str:
        return self._m().table(summary)

    @property
    def table_keys(self) -> list[str]:
        return list(self._m().TABLE_KEYS)

    @property
    def primary_metric(self) -> str:
        return str(self._m().PRIMARY_METRIC)


class Classify(_Stages):
    """Labels from a closed set: majority vote or mean probability; macro-F1 decides."""

    name = "classify"
    stages_module = "tasks.classify.stages"

    def aggregate(self, ann_paths: list[str], out_dir: str, cfg: DistillConfig, template: Any) -> list[str]:
        from tasks.classify.aggregate import vote_shards

        return vote_shards(ann_paths, out_dir, cfg.vote.min_agreement, template.labels, cfg.vote.aggregation.value)

    def aggregate_summary(self, voted_paths: list[str], k: int) -> dict[str, Any]:
        from tasks.pipeline.annotation_report import vote_stats

        return vote_stats(voted_paths, k)

    def teacher_gold_scores(self, voted_gold: list[str], template: Any) -> dict[str, Any]:
        from tasks.pipeline.annotation_report import gold_scores

        return gold_scores(voted_gold, template.labels)


class Generate(_Stages):
    """Free text: the medoid of the k samples; BERTScore F1 against human references decides."""

    name = "generate"
    stages_module = "tasks.generate.stages"

    def aggregate(self, ann_paths: list[str], out_dir: str, cfg: DistillConfig, template: Any) -> list[str]:
        from tasks.generate.work import medoid_shards

        return medoid_shards(ann_paths, out_dir, cfg.teacher.samples, cfg.vote.similarity.value, template.max_words)

    def aggregate_summary(self, voted_paths: list[str], k: int) -> dict[str, Any]:
        from tasks.generate.work import medoid_summary

        return medoid_summary(voted_paths, k)

    def teacher_gold_scores(self, voted_gold: list[str], template: Any) -> dict[str, Any]:
        from tasks.generate.work import teacher_gold_scores

        return teacher_gold_scores(voted_gold, template.max_words)


def task_kind(task_type: TaskType | str) -> TaskKind:
    """The task type's implementation."""
    return Generate() if TaskType(task_type) == TaskType.generate else Classify()


def check_template_suits(task_type: TaskType, template: Any, source: str) -> None:
    """A classify config with a writing prompt (or the reverse) is refused before anything is loaded or sent."""
    is_gen = getattr(template, "task", "classify") == "generate"
    if is_gen != (task_type == TaskType.generate):
        raise ValueError(f"prompt {source}: a {'generation' if is_gen else 'labelling'} template does not suit "
                         f"task '{task_type.value}' (set task: {'generate' if is_gen else 'classify'} or pick another prompt)")


@task(name="aggregate", task_run_name="aggregate-{name}")
def aggregate_task(ann_paths: list[str], out_dir: str, cfg: DistillConfig, name: str = "pool") -> list[str]:
    """Thin Prefect task over the task type's aggregation (vote or medoid); it reads the template itself."""
    from tasks.templates.label import load_prompt

    return task_kind(cfg.task).aggregate(ann_paths, out_dir, cfg, load_prompt(cfg.prompt))
