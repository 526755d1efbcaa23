"""Calibration on human gold: does a confidence of 0.8 mean right 80% of the time?

Why: the teacher's confidence (vote share or mean label probability) decides which items
the student trusts, and the student's score is what users threshold on in production.
Both are only useful if they are calibrated, so each run measures it on gold: a
reliability table (per equal-width confidence bin: items, mean confidence, accuracy) and
the expected calibration error, ECE = sum over bins of (items in bin / all items) x
|accuracy - mean confidence| (Guo et al., 2017). Items without a prediction (the teacher
abstained) have no confidence to judge and are left out, and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Reliability:
    """Reliability of one model's confidences on gold."""

    name: str
    ece: Optional[float]
    items: int
    left_out: int  # items without a prediction
    bins: list[dict[str, float]] = field(default_factory=list)  # lo, hi, n, confidence, accuracy

    def as_dict(self) -> dict:
        return {"name": self.name, "ece": self.ece, "items": self.items, "left_out": self.left_out, "bins": self.bins}


def reliability(
    name: str, confidence: Sequence[Optional[float]], correct: Sequence[Optional[bool]], n_bins: int = 10
) -> Reliability:
    """Bin (confidence, correct) pairs into ``n_bins`` equal-width bins and compute the ECE.

    A pair with ``correct`` None (no prediction) is left out. Confidence 1.0 falls in the
    last bin; bins with no items are omitted from ``bins``.
    """
    pairs = [(float(c), bool(ok)) for c, ok in zip(confidence, correct) if ok is not None and c is not None]
    left_out = len(list(confidence)) - len(pairs)
    if not pairs:
        return Reliability(name, None, 0, left_out)
    rows, err = [], 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = [(c, ok) for c, ok in pairs if lo <= c < hi or (b == n_bins - 1 and c == hi)]
        if not inside:
            continue
        conf = sum(c for c, _ in inside) / len(inside)
        acc = sum(ok for _, ok in inside) / len(inside)
        err += len(inside) / len(pairs) * abs(acc - conf)
        rows.append({"lo": lo, "hi": hi, "n": len(inside), "confidence": conf, "accuracy": acc})
    return Reliability(name, err, len(pairs), left_out, rows)


def plot_reliability(curves: list[Reliability], path: str | Path, title: str = "Reliability on human gold") -> str:
    """Reliability diagram: accuracy against mean confidence per bin, one line per model, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for r in curves:
        if not r.bins:
            continue
        xs = [b["confidence"] for b in r.bins]
        ys = [b["accuracy"] for b in r.bins]
        ax.plot(xs, ys, marker="o", label=f"{r.name} (ECE {r.ece:.3f}, n={r.items})")
        for x, y, b in zip(xs, ys, r.bins):
            ax.annotate(str(b["n"]), (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy on gold in bin")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
