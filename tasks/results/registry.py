"""The gate's typed figures: how sure it is that a challenger beats the champion."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PairedInterval:
    """Challenger minus champion on the same gold items: the point estimate and its bootstrap interval."""

    diff: float
    low: float
    high: float
    confidence: float
    resamples: int

    def describe(self) -> str:
        return f"{self.diff:+.4f} ({100 * self.confidence:g}% CI {self.low:+.4f} .. {self.high:+.4f})"
