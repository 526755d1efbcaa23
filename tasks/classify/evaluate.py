"""Evaluate teacher (single, aggregated) and student on human gold, and measure student speed.

Why both on the same items: "the student is as good as the teacher" is only a claim when
both are scored on the same human labels. The teacher was asked about a seeded gold
subset during annotation; the student is scored on the full gold split and on that same
subset, so the comparison in the final table is like for like. Metrics come from
sklearn (``evaluate.load`` needs the hub, which is not reachable offline).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

from tasks.classify.aggregate import NO_LABEL, agreement_bin, or_no_label
from tasks.classify.calibration import Reliability, plot_reliability, reliability
from tasks.results.classify import ClassifierEvaluation, TeacherGoldScores, TeacherSubset

_clean = or_no_label


ZERO: dict[str, Any] = {"zero_division": 0}  # a class never predicted scores 0 (sklearn's stubs type the value as str)


def scores(gold: list[str], pred: list[str], labels: list[str]) -> dict[str, Any]:
    rep: dict[str, Any] = classification_report(gold, pred, labels=labels, output_dict=True, **ZERO)  # type: ignore[assignment]
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, labels=labels, average="macro", **ZERO)),
        "per_class": {
            lab: {k: float(rep[lab][k]) for k in ("precision", "recall", "f1-score", "support")} for lab in labels
        },
    }


def plot_confusion(gold: list[str], pred: list[str], labels: list[str], title: str, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = labels + ([NO_LABEL] if NO_LABEL in pred else [])
    cm = confusion_matrix(gold, pred, labels=cols)[: len(labels)]
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("human gold")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="black")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def coverage_curve(
    gold: list[str], voted: list[str], conf: list[float], k: int, by_vote_share: bool = True
) -> list[dict[str, float]]:
    """Teacher accuracy when only items with confidence >= t are kept, for each threshold t.

    Vote shares can only be j/k, so those are the thresholds; mean probabilities get
    0.5, 0.6, ..., 0.9, 0.95 and 0.99.
    """
    thresholds = [c / k for c in range(1, k + 1)] if by_vote_share else [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    out = []
    for t in thresholds:
        keep = [i for i, x in enumerate(conf) if x >= t - 1e-9]
        acc = sum(voted[i] == gold[i] for i in keep) / len(keep) if keep else float("nan")
        out.append({"threshold": t, "coverage": len(keep) / len(gold) if gold else 0.0, "accuracy": acc})
    return out


def plot_coverage(curve: list[dict[str, float]], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([c["coverage"] for c in curve], [c["accuracy"] for c in curve], marker="o")
    for c in curve:
        ax.annotate(f">={c['threshold']:.2f}", (c["coverage"], c["accuracy"]), fontsize=8)
    ax.set_xlabel("coverage (share of gold items kept)")
    ax.set_ylabel("teacher accuracy on kept items")
    ax.set_title("Teacher accuracy vs coverage by confidence")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def evaluate(
    gold: pd.DataFrame,
    teacher_gold_votes: list[str],
    predictor: Any,
    *,
    labels: list[str],
    out_dir: str,
    batch_size: int,
    k: int,
    energy: Any = None,
    aggregation: str = "majority",
    majority_label: Optional[str] = None,
) -> ClassifierEvaluation:
    """All gold metrics, plots and speed figures.

    ``majority_label`` is the teacher's most frequent label in the student's training
    data: a student that answers it for everything (the collapse class balancing
    prevents) scores ``majority_baseline_macro_f1``, the floor any useful student beats.
    The teacher's speed, and so the speed ratio, are the stage's to add.
    """
    from tasks.classify.inference import measure_speed

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = gold["text"].tolist()
    g = gold["label"].tolist()
    s_pred, s_conf = predictor.predict(texts, batch_size)
    student = scores(g, s_pred, labels)
    # each gold item's prediction: the gate pairs them with the champion's on the same items (tasks/registry/paired.py)
    predictions = out / "student_gold_predictions.parquet"
    pd.DataFrame({"id": gold["id"].tolist(), "label": g, "pred": s_pred, "confidence": s_conf}).to_parquet(predictions)
    s_rel = reliability("student", s_conf, [p == t for p, t in zip(s_pred, g)])
    plots = [plot_confusion(g, s_pred, labels, "student on gold", out / "confusion_student.png")]
    curves = [s_rel]
    subset = None
    tv = (
        pd.concat([pq.read_table(p).to_pandas() for p in teacher_gold_votes], ignore_index=True)
        if teacher_gold_votes
        else None
    )
    if tv is not None and len(tv):
        subset, sub_curves, sub_plots = _on_teacher_subset(
            tv,
            dict(zip(gold["id"], zip(s_pred, s_conf))),
            predictor,
            labels=labels,
            out=out,
            batch_size=batch_size,
            k=k,
            aggregation=aggregation,
            majority_label=majority_label,
        )
        curves = [*sub_curves, s_rel]
        plots += sub_plots
    plots.append(plot_reliability(curves, out / "reliability.png"))
    speed = measure_speed(predictor, texts, batch_size, energy=energy)
    return ClassifierEvaluation(
        gold_items=len(g),
        student_accuracy=student["accuracy"],
        student_macro_f1=student["macro_f1"],
        student_per_class=student["per_class"],
        student_ece=s_rel.ece,
        majority_baseline_label=majority_label,
        majority_baseline_macro_f1=(
            scores(g, [majority_label] * len(g), labels)["macro_f1"] if majority_label is not None else None
        ),
        subset=subset,
        reliability=[c.as_dict() for c in curves],
        speed=speed,
        student_precision=predictor.precision,
        teacher_items_per_s=None,
        speed_ratio=None,
        plots=plots,
        gold_predictions_path=str(predictions),
    )


def _on_teacher_subset(
    tv: pd.DataFrame,
    by_id: dict[str, tuple[str, float]],
    predictor: Any,
    *,
    labels: list[str],
    out: Path,
    batch_size: int,
    k: int,
    aggregation: str,
    majority_label: Optional[str],
) -> tuple[TeacherSubset, list[Reliability], list[str]]:
    """Teacher (single answer, aggregated) and student on the teacher's gold subset: scores, calibration, plots.

    ``by_id``: the student's label and confidence per gold id (the subset is drawn from gold).
    """
    tg = tv["label_gold"].tolist()
    voted = _clean(tv["label"].tolist())
    single = _clean([v[0] for v in tv["votes"]])
    missing = [t for i, t in zip(tv["id"], tv["text"]) if i not in by_id]  # the subset is drawn from gold
    by_text = dict(zip(missing, zip(*predictor.predict(missing, batch_size)))) if missing else {}
    sub = [by_id[i] if i in by_id else by_text[t] for i, t in zip(tv["id"], tv["text"])]
    s_sub = [p for p, _ in sub]
    t_conf = tv["confidence"].astype(float).tolist()
    t_rel = reliability(
        f"teacher ({aggregation})", t_conf, [None if v == NO_LABEL else v == y for v, y in zip(voted, tg)]
    )
    s_rel_sub = reliability("student, same subset", [c for _, c in sub], [p == y for p, y in zip(s_sub, tg)])
    t_single, t_voted, s_on_sub = scores(tg, single, labels), scores(tg, voted, labels), scores(tg, s_sub, labels)
    curve = coverage_curve(tg, voted, t_conf, k, by_vote_share=aggregation == "majority")
    subset = TeacherSubset(
        teacher_subset_items=len(tg),
        teacher_accuracy_single=t_single["accuracy"],
        teacher_macro_f1_single=t_single["macro_f1"],
        teacher_accuracy_voted=t_voted["accuracy"],
        teacher_macro_f1_voted=t_voted["macro_f1"],
        student_accuracy_on_teacher_subset=s_on_sub["accuracy"],
        student_macro_f1_on_teacher_subset=s_on_sub["macro_f1"],
        student_teacher_agreement=float(np.mean([a == b for a, b in zip(s_sub, voted)])),
        teacher_per_class_voted=t_voted["per_class"],
        teacher_ece=t_rel.ece,
        teacher_ece_items=t_rel.items,
        teacher_ece_left_out=t_rel.left_out,
        student_ece_on_teacher_subset=s_rel_sub.ece,
        majority_baseline_macro_f1_on_teacher_subset=(
            scores(tg, [majority_label] * len(tg), labels)["macro_f1"] if majority_label is not None else None
        ),
        coverage_curve=curve,
        blind_spots=blind_spots(tg, voted, s_sub, labels),
    )
    plots = [
        plot_confusion(
            tg, single, labels, "teacher (single answer) on gold subset", out / "confusion_teacher_single.png"
        ),
        plot_confusion(
            tg, voted, labels, f"teacher ({aggregation}) on gold subset", out / "confusion_teacher_voted.png"
        ),
        plot_coverage(curve, out / "teacher_coverage.png"),
    ]
    return subset, [t_rel, s_rel_sub], plots


def blind_spots(gold: list[str], teacher: list[str], student: list[str], labels: list[str]) -> list[dict[str, Any]]:
    """Per class: how often gold, teacher and student use it, and each one's recall.

    A class the teacher rarely predicts (low recall) and the student also misses is a
    blind spot the student inherited from its teacher.
    """
    gc, tc, sc = Counter(gold), Counter(teacher), Counter(student)
    rows = []
    for lab in labels:
        idx = [i for i, x in enumerate(gold) if x == lab]
        t_rec = sum(teacher[i] == lab for i in idx) / len(idx) if idx else float("nan")
        s_rec = sum(student[i] == lab for i in idx) / len(idx) if idx else float("nan")
        rows.append(
            {
                "label": lab,
                "gold": gc[lab],
                "teacher_predicted": tc[lab],
                "student_predicted": sc[lab],
                "teacher_recall": t_rec,
                "student_recall": s_rec,
                "inherited_blind_spot": bool(idx) and t_rec < 0.5 and s_rec < 0.5,
            }
        )
    return rows


def teacher_gold_scores(voted_paths: list[str], labels: list[str]) -> Optional[TeacherGoldScores]:
    """Teacher accuracy and macro-F1 against human gold: voted label and sample 0 alone."""
    gold, voted, single, conf = [], [], [], []
    for df in (
        pq.read_table(p, columns=["label_gold", "label", "votes", "confidence", "n_votes"]).to_pandas()
        for p in voted_paths
    ):
        gold += df["label_gold"].tolist()
        conf += [agreement_bin(c, n) for c, n in zip(df["confidence"], df["n_votes"])]
        voted += or_no_label(df["label"].tolist())
        single += or_no_label([v[0] for v in df["votes"]])
    if not gold:
        return None
    kw: dict[str, Any] = {"labels": labels, "average": "macro", **ZERO}
    by_agree: dict[str, str] = {}
    for share in sorted(set(conf)):
        idx = [i for i, c in enumerate(conf) if c == share]
        acc = sum(voted[i] == gold[i] for i in idx) / len(idx)
        by_agree[share] = f"{acc:.3f} (n={len(idx)})"
    return TeacherGoldScores(
        gold_items_scored=len(gold),
        teacher_accuracy_voted=float(accuracy_score(gold, voted)),
        teacher_macro_f1_voted=float(f1_score(gold, voted, **kw)),
        teacher_coverage_voted=sum(v != NO_LABEL for v in voted) / len(gold),
        teacher_accuracy_single=float(accuracy_score(gold, single)),
        teacher_macro_f1_single=float(f1_score(gold, single, **kw)),
        gold_label_distribution=dict(sorted(Counter(gold).items())),
        teacher_label_distribution_on_gold=dict(sorted(Counter(voted).items())),
        teacher_accuracy_by_agreement=by_agree,
    )
