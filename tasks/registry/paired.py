"""How sure the gate is that a challenger beats the champion: a paired bootstrap over the same gold items.

Why: two students trained on the same labels with different seeds differ by several
points of macro-F1 on a few hundred gold items (README "Label budget"), so a gate that
promotes whichever point estimate is higher promotes noise and, night after night,
ratchets the champion up on luck. Both models are scored on the same gold items, so the
question is paired: resample the gold items (the same resample for both), recompute both
figures, and look at the spread of their difference. The gate promotes only when the lower
end of that interval clears ``gate.min_improvement`` (tasks/registry/gate.py).

Vectorised: each resample is a vector of item weights (how often each item was drawn), so
2,000 resamples of 1,000 items are a few matrix products, not 4,000 sklearn calls. The
seed is fixed: the same two models on the same gold get the same interval on every rerun.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.results.registry import PairedInterval

SEED = 20261205


def resample_weights(n: int, resamples: int, seed: int = SEED) -> np.ndarray:
    """(resamples, n) counts: row b says how often each of the n items was drawn in resample b."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    w = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(w, (np.arange(resamples)[:, None], draws), 1.0)
    return w


def weighted_macro_f1(w: np.ndarray, gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Macro-F1 over ``labels`` for each row of item weights (sklearn's, with zero_division=0, per resample)."""
    g, p = np.asarray(gold, dtype=object), np.asarray(pred, dtype=object)
    f1 = np.zeros(w.shape[0])
    for lab in labels:
        is_g, is_p = (g == lab).astype(float), (p == lab).astype(float)
        tp, n_g, n_p = w @ (is_g * is_p), w @ is_g, w @ is_p
        denom = n_g + n_p
        f1 += np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1 / max(1, len(labels))


def paired_macro_f1(
    gold: Sequence[str],
    challenger: Sequence[str],
    champion: Sequence[str],
    labels: Sequence[str],
    *,
    confidence: float,
    resamples: int,
) -> PairedInterval:
    """The challenger's macro-F1 minus the champion's, on the same gold items, with a percentile interval."""
    if not (len(gold) == len(challenger) == len(champion)) or not len(gold):
        raise ValueError(
            f"paired comparison needs one prediction per gold item from each model: gold {len(gold)}, "
            f"challenger {len(challenger)}, champion {len(champion)}"
        )
    ones = np.ones((1, len(gold)))
    diff = float(
        (weighted_macro_f1(ones, gold, challenger, labels) - weighted_macro_f1(ones, gold, champion, labels))[0]
    )
    w = resample_weights(len(gold), resamples)
    d = weighted_macro_f1(w, gold, challenger, labels) - weighted_macro_f1(w, gold, champion, labels)
    return percentile_interval(diff, d, confidence=confidence, resamples=resamples)


def percentile_interval(diff: float, boot: np.ndarray, *, confidence: float, resamples: int) -> PairedInterval:
    """The observed difference with the central ``confidence`` share of its bootstrap replicates."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(boot, [tail, 100 - tail])
    return PairedInterval(diff, float(low), float(high), confidence, resamples)


def paired_mean(
    challenger: Sequence[float], champion: Sequence[float], *, confidence: float, resamples: int
) -> PairedInterval:
    """The challenger's mean per-item score minus the champion's (a generator's BERTScore F1 or ROUGE-L), paired.

    The same resamples of the gold items as for macro-F1: the difference of means under each
    row of item weights.
    """
    if len(challenger) != len(champion) or not len(challenger):
        raise ValueError(
            f"paired comparison needs one score per gold item from each model: challenger {len(challenger)}, "
            f"champion {len(champion)}"
        )
    d = np.asarray(challenger, dtype=np.float64) - np.asarray(champion, dtype=np.float64)
    w = resample_weights(len(d), resamples)
    return percentile_interval(float(d.mean()), (w @ d) / len(d), confidence=confidence, resamples=resamples)
