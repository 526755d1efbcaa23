"""MLflow tracking set-up, model logging and registration behind a quality gate.

Why a gate: a nightly run must never replace a good model with a worse one. A new student
is registered as a version with alias ``challenger``; it becomes ``champion`` only if its
gold macro-F1 clears the floor and beats the current champion's, re-measured on the same
gold set now (not read from an old tag), by more than zero and at least the margin.
The decision and its reason are tags on the version.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

from prefect import task

from distill.faults import failpoint

REPO = Path(__file__).resolve().parents[2]


def tracking_uri(configured: Optional[str]) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def setup_tracking(configured_uri: Optional[str], experiment: str) -> str:
    """Point MLflow at the store and make sure the experiment exists (artifacts beside a sqlite store)."""
    import mlflow

    uri = tracking_uri(configured_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        loc = None
        if uri.startswith("sqlite:///"):
            loc = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=loc)
    mlflow.set_experiment(experiment)
    return uri


@dataclass
class GateDecision:
    promote: bool
    reason: str
    champion_version: Optional[str] = None
    champion_macro_f1: Optional[float] = None


def decide(challenger_f1: float, champion_f1: Optional[float], floor: float, margin: float,
           metric: str = "macro-F1") -> tuple[bool, str]:
    """The gate rule as a pure function (see the module docstring); ``metric`` names the figure in the reason."""
    if challenger_f1 < floor:
        return False, f"{metric} {challenger_f1:.4f} is below the floor {floor:.4f}"
    if champion_f1 is None:
        return True, f"first model: {metric} {challenger_f1:.4f} clears the floor {floor:.4f}"
    diff = challenger_f1 - champion_f1
    if diff > 0 and diff >= margin:
        return True, f"{metric} {challenger_f1:.4f} beats the champion's {champion_f1:.4f} by {diff:+.4f} (margin {margin:.4f})"
    return False, (f"{metric} {challenger_f1:.4f} does not beat the champion's {champion_f1:.4f} by more than zero "
                   f"and at least the margin {margin:.4f} ({diff:+.4f})")


def log_student_model(model_dir: str, precision: str, max_length: int, example_texts: list[str]) -> Any:
    """Log the student as a pyfunc model (signature, input example, explicit pip requirements)."""
    import mlflow
    import pandas as pd
    import torch
    import transformers
    from mlflow.models import infer_signature

    from tasks.classify.pyfunc import StudentPyfunc
    from tasks.registry.model_code import CLASSIFIER_CODE, model_code

    example = pd.DataFrame({"text": example_texts[:3] or ["an example"]})
    out_example = pd.DataFrame({"label": ["x"] * len(example), "score": [0.5] * len(example)})
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
            f"pandas=={pd.__version__}", f"mlflow=={mlflow.__version__}"]
    with model_code(CLASSIFIER_CODE) as code:  # the model loads without distill installed
        return mlflow.pyfunc.log_model(
            name="student", python_model=StudentPyfunc(precision=precision, max_length=max_length),
            artifacts={"model_dir": model_dir}, signature=infer_signature(example, out_example),
            input_example=example, pip_requirements=reqs, code_paths=[code])


def champion_macro_f1(model_name: str, gold_texts: list[str], gold_labels: list[str], labels: list[str]) -> tuple[Optional[str], Optional[float]]:
    """Re-measure the current champion (if any) on this gold set."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from sklearn.metrics import f1_score

    client = mlflow.MlflowClient()
    try:
        v = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None, None
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    pred = model.predict(__import__("pandas").DataFrame({"text": gold_texts}))["label"].tolist()
    return str(v.version), float(f1_score(gold_labels, pred, labels=labels, average="macro", zero_division=0))


CANDIDATE_TAG = "distill.candidate"  # the trained student's identity (Trained.uid): a rerun finds its version by it
ModelSource = Union[str, Callable[[], str]]  # a model URI, or how to log the model and get one


def find_candidate(model_name: str, candidate: Optional[str]) -> Any:
    """The version already registered for this trained student, if a rerun got that far before."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not candidate:
        return None
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return None
    return next((v for v in versions if (v.tags or {}).get(CANDIDATE_TAG) == candidate), None)


def _current_champion(client: Any, model_name: str) -> Optional[str]:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, "champion").version)
    except MlflowException:
        return None


def _set_aliases(model_name: str, version: str, promote: bool, compared_with: Optional[str], probe: Any) -> tuple[bool, str]:
    """``challenger`` on the new version; ``champion`` only once that version loads from the registry and predicts.

    Called again by a rerun that finds the version already registered, so every step is
    idempotent; if the champion moved since this version was judged, it is left where it is.
    """
    import mlflow

    client = mlflow.MlflowClient()
    client.set_registered_model_alias(model_name, "challenger", version)
    if not promote:
        return False, ""
    now = _current_champion(client, model_name)
    if now == version:
        return True, ""
    if now != (compared_with or None):
        return False, f"the champion moved to version {now} since version {version} was judged; left there"
    try:
        out = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}").predict(probe)
        if len(out) != len(probe):
            raise RuntimeError(f"{len(out)} predictions for {len(probe)} inputs")
    except Exception as e:
        reason = f"version {version} failed to load from the registry: {type(e).__name__}: {str(e)[:300]}"
        client.set_model_version_tag(model_name, version, "gate_decision", "rejected")
        client.set_model_version_tag(model_name, version, "gate_reason", reason)
        raise RuntimeError(f"registered model {model_name!r}: {reason}; the champion stays version {now}") from e
    failpoint("register:before-champion")
    client.set_registered_model_alias(model_name, "champion", version)
    return True, ""


@contextlib.contextmanager
def gate_lock(model_name: str) -> Iterator[None]:
    """One gate at a time per registered model on this machine, so two runs cannot both take ``champion``.

    Why: the gate reads the champion, decides and moves the alias; two runs doing that at once
    would both see "no champion" and both promote. A sqlite store's lock sits beside its
    database (every run using that store shares it); for a tracking server, beside the
    working directory's ``.distill`` folder. Runs on other machines against one server are
    not covered by a file lock; the alias step then refuses to move a champion that changed
    since the decision, which narrows the window but cannot close it.
    """
    import fcntl

    import mlflow

    uri = mlflow.get_tracking_uri()
    digest = hashlib.sha256(f"{uri}\0{model_name}".encode()).hexdigest()[:16]
    folder = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else Path(".distill")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f".gate-{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits: registration takes seconds
        yield
    finally:
        os.close(fd)


def gated_registration(model: ModelSource, model_name: str, candidate: Optional[str],
                       champion: Callable[[], tuple[Optional[str], Optional[float]]], floor: float, margin: float,
                       metric: str, tags: dict[str, str], probe: Any) -> dict[str, Any]:
    """Register once per trained student, born with its gate decision; move aliases last.

    Order: re-measure the champion, decide, log the model, create the version with every
    tag in the same call (so no version exists without its decision), then ``challenger``,
    then ``champion`` after a load check. A kill anywhere leaves either no version, or a
    complete version whose aliases a rerun finishes; the champion alias only ever points
    at a version that loaded.
    """
    with gate_lock(model_name):
        return _gated_registration(model, model_name, candidate, champion, floor, margin, metric, tags, probe)


def _gated_registration(model: ModelSource, model_name: str, candidate: Optional[str],
                        champion: Callable[[], tuple[Optional[str], Optional[float]]], floor: float, margin: float,
                        metric: str, tags: dict[str, str], probe: Any) -> dict[str, Any]:
    import mlflow

    done = find_candidate(model_name, candidate)
    if done is not None:
        t = done.tags or {}
        promote = t.get("gate_decision") == "promoted"
        champ_v = t.get("compared_with_version") or None
        champ_s = float(t["distill.champion_score_now"]) if t.get("distill.champion_score_now") else None
        promoted, note = _set_aliases(model_name, str(done.version), promote, champ_v, probe)
        return {"model_name": model_name, "model_version": str(done.version), "promoted": promoted,
                "gate_reason": t.get("gate_reason", "") + (f" ({note})" if note else ""),
                "previous_champion_version": champ_v, "previous_champion_score": champ_s}
    champ_v, champ_s = champion()
    promote, reason = decide(float(tags["distill.score"]), champ_s, floor, margin, metric=metric)
    uri = model() if callable(model) else model
    failpoint("register:logged")
    born = {**tags, CANDIDATE_TAG: candidate or "", "gate_decision": "promoted" if promote else "rejected",
            "gate_reason": reason, "compared_with_version": champ_v or "",
            "distill.champion_score_now": "" if champ_s is None else f"{champ_s:.6f}"}
    mv = mlflow.register_model(uri, model_name, tags=born)
    failpoint("register:created")
    promoted, note = _set_aliases(model_name, str(mv.version), promote, champ_v, probe)
    return {"model_name": model_name, "model_version": str(mv.version), "promoted": promoted,
            "gate_reason": reason + (f" ({note})" if note else ""), "previous_champion_version": champ_v,
            "previous_champion_score": champ_s}


def register_and_gate(model_uri: ModelSource, model_name: str, challenger_f1: float, gold_texts: list[str],
                      gold_labels: list[str], labels: list[str], floor: float, margin: float,
                      run_id: str, candidate: Optional[str] = None) -> dict[str, Any]:
    """Register a version (alias challenger), decide, and move ``champion`` only if it earned it."""
    import pandas as pd

    tags = {"distill.score": f"{challenger_f1:.6f}", "gold_macro_f1": f"{challenger_f1:.6f}", "source_run_id": run_id}
    r = gated_registration(model_uri, model_name, candidate,
                           lambda: champion_macro_f1(model_name, gold_texts, gold_labels, labels), floor, margin,
                           "macro-F1", tags, pd.DataFrame({"text": gold_texts[:2] or ["an example"]}))
    champ_f1 = r.pop("previous_champion_score")
    return {**r, "previous_champion_macro_f1": champ_f1}


@task(name="register")
def register_task(model_uri: ModelSource, model_name: str, challenger_f1: float, gold_path: str, text_column: str,
                  id_column: str, label_column: str, labels: list[str], floor: float, margin: float,
                  run_id: str, candidate: Optional[str] = None) -> dict[str, Any]:
    """Reads the gold file itself: big lists never travel as Prefect parameters."""
    from tasks.classify.evaluate import read_gold

    gold = read_gold(gold_path, text_column, id_column, label_column, labels)
    return register_and_gate(model_uri, model_name, challenger_f1, gold["text"].tolist(), gold["label"].tolist(),
                             labels, floor, margin, run_id, candidate)



def register_generator_and_gate(model_uri: ModelSource, model_name: str, score: float, metric: str,
                                documents: list[str], references: list[str], floor: float, margin: float,
                                run_id: str, candidate: Optional[str] = None) -> dict[str, Any]:
    """The generate task's gate: re-measure the champion generator on the same gold items with the same metric.

    A champion of another task type under the same name is not comparable: refused with a
    message that names the model, rather than compared on a metric it does not have.
    """
    import pandas as pd

    def champion() -> tuple[Optional[str], Optional[float]]:
        import mlflow
        from mlflow.exceptions import MlflowException

        from tasks.generate.metrics import bertscore, rouge

        try:
            v = mlflow.MlflowClient().get_model_version_by_alias(model_name, "champion")
        except MlflowException:
            return None, None
        if (v.tags or {}).get("task", "classify") != "generate":
            raise ValueError(f"registered model {model_name!r}: its champion (version {v.version}) is a classifier; "
                             f"give the generator its own tracking.model_name")
        champ = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
        preds = champ.predict(pd.DataFrame({"text": documents}))["text"].tolist()
        s = bertscore(preds, references).f1 if metric == "bertscore_f1" else rouge(preds, references).rougeL
        return str(v.version), s

    tags = {"task": "generate", "distill.score": f"{score:.6f}", f"gold_{metric}": f"{score:.6f}", "source_run_id": run_id}
    r = gated_registration(model_uri, model_name, candidate, champion, floor, margin, metric, tags,
                           pd.DataFrame({"text": documents[:1] or ["an example"]}))
    return {**r, "gate_metric": metric}
