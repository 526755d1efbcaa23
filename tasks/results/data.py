"""What loading and choosing the items found, typed: per input file, and tonight's selection.

Why here: the load stage hands these to the report and to MLflow (counts, and the first
rows named per finding), and the readers fill them while streaming, so nothing grows
with the number of rows except the counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class DataReport:
    """What loading found in one input file."""

    path: str
    rows_read: int = 0
    items: int = 0
    empty_text: int = 0
    duplicate_ids: int = 0
    duplicate_texts: int = 0
    invalid_utf8: int = 0
    truncated_by_limit: bool = False
    rejected_examples: list[str] = field(default_factory=list)
    # rows whose bytes were not UTF-8 (bad bytes became U+FFFD), the first few named
    invalid_utf8_rows: list[str] = field(default_factory=list)
    # texts that look like UTF-8 read as Latin-1/cp1252 once ("cafÃ©", "donâ€™t"): kept as they are, counted, named
    suspect_mojibake: int = 0
    suspect_mojibake_rows: list[str] = field(default_factory=list)
    # gold labels that differ from a label only in case, spacing or Unicode form: normalised to it, counted per
    # spelling ("'Positive' -> 'positive'": n), the first rows named
    label_variants: dict[str, int] = field(default_factory=dict)
    label_variant_rows: list[str] = field(default_factory=list)
    # texts whose prompt would not fit the teacher's context (data.overlong): cut to fit, or set aside
    overlong_truncated: int = 0
    overlong_rejected: int = 0
    overlong_rows: list[str] = field(default_factory=list)
    # texts holding chat/control-token markup ("<|im_end|>", "</s>", "[INST]"): kept as they are here, defused in
    # the prompt (tasks.templates.base.defuse_markup) so they cannot end the item's turn; counted, the first rows named
    control_markup: int = 0
    control_markup_rows: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Selection:
    pool_shards: list[str]  # the items this run annotates: labelled before, plus tonight's choice
    labelled_before: int
    selected: int
    deferred: int
    deferred_file: Optional[str]
    method: str

    def summary(self) -> dict[str, Any]:
        return {
            "items_labelled_before": self.labelled_before,
            "items_selected": self.selected,
            "items_deferred": self.deferred,
            "selection_method": self.method,
            "pool_deferred_file": self.deferred_file,
        }
