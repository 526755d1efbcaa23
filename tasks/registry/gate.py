"""Registration behind a quality gate: a new version becomes ``champion`` only if it earned it.

Why a gate: a nightly run must never replace a good model with a worse one. A new student
is registered as a version with alias ``challenger``; it becomes ``champion`` only if its
gold figure (macro-F1 for a classifier, BERTScore F1 or ROUGE-L for a generator) clears
the floor and beats the current champion's, re-measured on the same gold set now (not read
from an old tag), by more than zero and at least the margin. The decision and its reason
are tags on the version. What "re-measure the champion" means is the task type's
(tasks/classify/register.py, tasks/generate/register.py); the order of the steps, the
idempotent rerun and the lock are here, the same for both.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from distill.faults import failpoint
from tasks.results.registry import PairedInterval
from tasks.results.stages import Registration


def decide(
    challenger_f1: float,
    champion_f1: Optional[float],
    floor: float,
    margin: float,
    *,
    metric: str = "macro-F1",
    interval: Optional[PairedInterval] = None,
) -> tuple[bool, str]:
    """The gate rule as a pure function (see the module docstring); ``metric`` names the figure in the reason.

    With ``interval`` (the paired bootstrap of challenger minus champion on the same gold
    items, tasks/registry/paired.py) the challenger must beat the champion beyond noise:
    the interval's lower end must be above zero and at least the margin.
    """
    if challenger_f1 < floor:
        return False, f"{metric} {challenger_f1:.4f} is below the floor {floor:.4f}"
    if champion_f1 is None:
        return True, f"first model: {metric} {challenger_f1:.4f} clears the floor {floor:.4f}"
    if interval is not None:
        if interval.low > 0 and interval.low >= margin:
            return True, (
                f"{metric} {challenger_f1:.4f} beats the champion's {champion_f1:.4f} on the same gold items by "
                f"{interval.describe()}: the interval clears the margin {margin:.4f}"
            )
        return False, (
            f"{metric} {challenger_f1:.4f} vs the champion's {champion_f1:.4f} on the same gold items: "
            f"{interval.describe()}; its lower end does not clear zero and the margin {margin:.4f} (within noise)"
        )
    diff = challenger_f1 - champion_f1
    if diff > 0 and diff >= margin:
        return (
            True,
            f"{metric} {challenger_f1:.4f} beats the champion's {champion_f1:.4f} by {diff:+.4f} (margin {margin:.4f})",
        )
    return False, (
        f"{metric} {challenger_f1:.4f} does not beat the champion's {champion_f1:.4f} by more than zero "
        f"and at least the margin {margin:.4f} ({diff:+.4f})"
    )


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


def _set_aliases(
    model_name: str, version: str, promote: bool, compared_with: Optional[str], probe: Any
) -> tuple[bool, str]:
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
    folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else Path(".distill")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f".gate-{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits: registration takes seconds
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ChampionNow:
    """The current champion re-measured on this gold set now (all None when there is none)."""

    version: Optional[str] = None
    score: Optional[float] = None
    interval: Optional[PairedInterval] = None  # challenger minus this champion on the same gold items, if paired


ChampionScore = Callable[[], ChampionNow]


def gated_registration(
    model: ModelSource,
    model_name: str,
    *,
    candidate: Optional[str],
    champion: ChampionScore,
    floor: float,
    margin: float,
    metric: str,
    tags: dict[str, str],
    probe: Any,
) -> Registration:
    """Register once per trained student, born with its gate decision; move aliases last.

    Order: re-measure the champion, decide, log the model, create the version with every
    tag in the same call (so no version exists without its decision), then ``challenger``,
    then ``champion`` after a load check. A kill anywhere leaves either no version, or a
    complete version whose aliases a rerun finishes; the champion alias only ever points
    at a version that loaded.
    """
    with gate_lock(model_name):
        return _gated_registration(
            model,
            model_name,
            candidate=candidate,
            champion=champion,
            floor=floor,
            margin=margin,
            metric=metric,
            tags=tags,
            probe=probe,
        )


def _gated_registration(
    model: ModelSource,
    model_name: str,
    *,
    candidate: Optional[str],
    champion: ChampionScore,
    floor: float,
    margin: float,
    metric: str,
    tags: dict[str, str],
    probe: Any,
) -> Registration:
    import mlflow

    done = find_candidate(model_name, candidate)
    if done is not None:
        t = done.tags or {}
        promote = t.get("gate_decision") == "promoted"
        champ_v = t.get("compared_with_version") or None
        champ_s = float(t["distill.champion_score_now"]) if t.get("distill.champion_score_now") else None
        promoted, note = _set_aliases(model_name, str(done.version), promote, champ_v, probe)
        return Registration(
            model_name,
            str(done.version),
            promoted,
            t.get("gate_reason", "") + (f" ({note})" if note else ""),
            metric,
            champ_v,
            champ_s,
            interval_from_tags(t),
        )
    now = champion()
    champ_v, champ_s, ci = now.version, now.score, now.interval
    promote, reason = decide(float(tags["distill.score"]), champ_s, floor, margin, metric=metric, interval=ci)
    uri = model() if callable(model) else model
    failpoint("register:logged")
    born = {
        **tags,
        CANDIDATE_TAG: candidate or "",
        "gate_decision": "promoted" if promote else "rejected",
        "gate_reason": reason,
        "compared_with_version": champ_v or "",
        "distill.champion_score_now": "" if champ_s is None else f"{champ_s:.6f}",
        **(interval_tags(ci) if ci is not None else {}),
    }
    mv = mlflow.register_model(uri, model_name, tags=born)
    failpoint("register:created")
    promoted, note = _set_aliases(model_name, str(mv.version), promote, champ_v, probe)
    return Registration(
        model_name, str(mv.version), promoted, reason + (f" ({note})" if note else ""), metric, champ_v, champ_s, ci
    )


def interval_tags(ci: PairedInterval) -> dict[str, str]:
    """The interval as the model version's tags (a rerun that finds the version reads them back)."""
    return {
        "gate_improvement": f"{ci.diff:.6f}",
        "gate_improvement_ci_low": f"{ci.low:.6f}",
        "gate_improvement_ci_high": f"{ci.high:.6f}",
        "gate_confidence": f"{ci.confidence:g}",
        "gate_bootstrap_resamples": str(ci.resamples),
    }


def interval_from_tags(t: dict[str, str]) -> Optional[PairedInterval]:
    if not t.get("gate_improvement_ci_low"):
        return None
    return PairedInterval(
        float(t["gate_improvement"]),
        float(t["gate_improvement_ci_low"]),
        float(t["gate_improvement_ci_high"]),
        float(t["gate_confidence"]),
        int(t["gate_bootstrap_resamples"]),
    )
