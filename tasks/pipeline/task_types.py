"""The task-type seam: what differs between labelling (``classify``) and writing (``generate``).

Why a seam: the pipeline (load, plan, annotate, aggregate, train, evaluate, register) is
the same for both; what a teacher answer means, how k samples become one, what the
student is and how it is judged differ. As distilabel's ``TextClassification`` and
``TextGeneration`` share one ``Task``, both task types here answer the same questions, and
the flows ask them instead of testing ``cfg.task`` in every module:

- ``aggregate``: k samples per item -> one answer and its agreement (vote or medoid), and
  the teacher scored on human gold;
- ``train`` / ``evaluate`` / ``register``: the student's stages, each a typed result;
- ``summary`` / ``table`` / ``table_keys``: the run report's part that is the task type's own.

Each method is where the run's config is split into the sections the task type's stages
read (tasks/classify/stages.py, tasks/generate/stages.py); below them nothing sees the
whole config. Rendering and parsing live with the template (``PromptTemplate`` /
``GenerationTemplate``, chosen by the template file's ``task:``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Optional, Protocol

from distill.config import DistillConfig, GeneratorStudentConfig, StudentConfig, TaskType
from tasks.data.human_labels import gold_with_reviews
from tasks.pipeline.summary import task_summary
from tasks.results.stages import Aggregation, Annotation, Evaluation, Registration, Trained
from tasks.templates.generation import GenerationTemplate
from tasks.templates.label import PromptTemplate
from tasks.templates.load import Template, load_prompt


class TaskKind(Protocol):
    name: str

    def aggregate(self, cfg: DistillConfig, ann: Annotation) -> Aggregation: ...

    def train(self, cfg: DistillConfig, agg: Aggregation, show_progress: bool) -> Trained: ...

    def evaluate(
        self, cfg: DistillConfig, agg: Aggregation, model: Trained, teacher_items_per_s: Optional[float]
    ) -> Evaluation: ...

    def register(
        self, cfg: DistillConfig, agg: Aggregation, model: Trained, ev: Evaluation, run_id: str
    ) -> Registration: ...

    def summary(
        self, annotation: dict[str, Any], model: Trained, ev: Evaluation, reg: Registration, costs: dict[str, Any]
    ) -> dict[str, Any]: ...

    def table(self, summary: dict[str, Any]) -> str: ...

    @property
    def table_keys(self) -> list[str]: ...


def _classify() -> ModuleType:
    """The classify stages, imported when a run needs them: the annotate flow (and a Dask worker unpickling its
    shards) never does, and they bring torch, transformers and MLflow's model flavours along."""
    from tasks.classify import stages

    return stages


def _generate() -> ModuleType:
    """The generate stages, imported when a run needs them (see :func:`_classify`)."""
    from tasks.generate import stages

    return stages


def _labels(cfg: DistillConfig) -> list[str]:
    template = load_prompt(cfg.prompt)
    assert isinstance(template, PromptTemplate)
    return template.labels


def _writing(cfg: DistillConfig) -> GenerationTemplate:
    template = load_prompt(cfg.prompt)
    assert isinstance(template, GenerationTemplate)
    return template


class Classify:
    """Labels from a closed set: majority vote or mean probability; macro-F1 decides."""

    name = "classify"

    @property
    def table_keys(self) -> list[str]:
        return list(_classify().TABLE_KEYS)

    def aggregate(self, cfg: DistillConfig, ann: Annotation) -> Aggregation:
        return _classify().aggregate_stage(
            ann.paths("pool"),
            ann.paths("gold"),
            vote=cfg.vote,
            labels=_labels(cfg),
            samples=cfg.teacher.samples,
            votes_dir=cfg.run_dir / "votes",
        )

    def train(self, cfg: DistillConfig, agg: Aggregation, show_progress: bool) -> Trained:
        assert isinstance(cfg.student, StudentConfig)
        return _classify().train_stage(
            agg,
            student=cfg.student,
            labels=_labels(cfg),
            min_agreement=cfg.vote.min_agreement,
            energy=cfg.energy,
            pricing=cfg.pricing,
            out_dir=cfg.run_dir / "student",
            show_progress=show_progress,
            review=cfg.review,
        )

    def evaluate(
        self, cfg: DistillConfig, agg: Aggregation, model: Trained, teacher_items_per_s: Optional[float]
    ) -> Evaluation:
        assert isinstance(cfg.student, StudentConfig)
        return _classify().evaluate_stage(
            agg,
            model,
            data=gold_with_reviews(cfg.data, cfg.review, labels=_labels(cfg), out_dir=cfg.run_dir / "input"),
            student=cfg.student,
            labels=_labels(cfg),
            samples=cfg.teacher.samples,
            aggregation=cfg.vote.aggregation.value,
            energy=cfg.energy,
            out_dir=cfg.run_dir / "evaluation",
            teacher_items_per_s=teacher_items_per_s,
        )

    def register(
        self, cfg: DistillConfig, agg: Aggregation, model: Trained, ev: Evaluation, run_id: str
    ) -> Registration:
        assert isinstance(cfg.student, StudentConfig)
        return _classify().register_stage(
            agg,
            model,
            ev,
            data=gold_with_reviews(cfg.data, cfg.review, labels=_labels(cfg), out_dir=cfg.run_dir / "input"),
            student=cfg.student,
            labels=_labels(cfg),
            model_name=cfg.tracking.model_name,
            gate=cfg.gate,
            run_id=run_id,
        )

    def summary(
        self, annotation: dict[str, Any], model: Trained, ev: Evaluation, reg: Registration, costs: dict[str, Any]
    ) -> dict[str, Any]:
        return task_summary(
            self.name,
            annotation,
            model,
            ev,
            reg,
            costs=costs,
            annotation_keys=_classify().ANNOTATION_KEYS,
            train_keys=_classify().TRAIN_KEYS,
        )

    def table(self, summary: dict[str, Any]) -> str:
        return _classify().table(summary)


class Generate:
    """Free text: the medoid of the k samples; BERTScore F1 against human references decides."""

    name = "generate"

    @property
    def table_keys(self) -> list[str]:
        return list(_generate().TABLE_KEYS)

    def aggregate(self, cfg: DistillConfig, ann: Annotation) -> Aggregation:
        return _generate().aggregate_stage(
            ann.paths("pool"),
            ann.paths("gold"),
            vote=cfg.vote,
            template=_writing(cfg),
            samples=cfg.teacher.samples,
            votes_dir=cfg.run_dir / "votes",
        )

    def train(self, cfg: DistillConfig, agg: Aggregation, show_progress: bool) -> Trained:
        assert isinstance(cfg.student, GeneratorStudentConfig)
        return _generate().train_stage(
            agg,
            student=cfg.student,
            template=_writing(cfg),
            energy=cfg.energy,
            pricing=cfg.pricing,
            out_dir=cfg.run_dir / "student",
            show_progress=show_progress,
        )

    def evaluate(
        self, cfg: DistillConfig, agg: Aggregation, model: Trained, teacher_items_per_s: Optional[float]
    ) -> Evaluation:
        assert isinstance(cfg.student, GeneratorStudentConfig)
        return _generate().evaluate_stage(
            agg,
            model,
            student=cfg.student,
            template=_writing(cfg),
            gate_metric=cfg.gate.metric,
            energy=cfg.energy,
            out_dir=cfg.run_dir / "evaluation",
            teacher_items_per_s=teacher_items_per_s,
        )

    def register(
        self, cfg: DistillConfig, agg: Aggregation, model: Trained, ev: Evaluation, run_id: str
    ) -> Registration:
        assert isinstance(cfg.student, GeneratorStudentConfig)
        return _generate().register_stage(
            agg,
            model,
            ev,
            student=cfg.student,
            template=_writing(cfg),
            model_name=cfg.tracking.model_name,
            gate=cfg.gate,
            run_id=run_id,
        )

    def summary(
        self, annotation: dict[str, Any], model: Trained, ev: Evaluation, reg: Registration, costs: dict[str, Any]
    ) -> dict[str, Any]:
        return task_summary(
            self.name,
            annotation,
            model,
            ev,
            reg,
            costs=costs,
            annotation_keys=_generate().ANNOTATION_KEYS,
            train_keys=_generate().TRAIN_KEYS,
        )

    def table(self, summary: dict[str, Any]) -> str:
        return _generate().table(summary)


def task_kind(task_type: TaskType | str) -> TaskKind:
    """The task type's implementation."""
    return Generate() if TaskType(task_type) == TaskType.generate else Classify()


def check_template_suits(task_type: TaskType, template: Template, source: str) -> None:
    """A classify config with a writing prompt (or the reverse) is refused before anything is loaded or sent."""
    is_gen = isinstance(template, GenerationTemplate)
    if is_gen != (task_type == TaskType.generate):
        raise ValueError(
            f"prompt {source}: a {'generation' if is_gen else 'labelling'} template does not suit "
            f"task '{task_type.value}' (set task: {'generate' if is_gen else 'classify'} or pick another "
            "prompt)"
        )
