"""Which way of drawing and aggregating the k samples helps this teacher? Single answer vs aggregated, on dev.

Runs distill's real annotate flow on the human-labelled dev split (never gold) with the
local teacher, once per way of drawing the samples, and aggregates each twice: by
majority vote and by mean label probability (from the teacher's log-probabilities).
Aggregation is not part of the cache key, so the second aggregation sends nothing. The
pool is the dev split itself, so its requests are answered from the cache for free.
Before scoring, it checks that the k samples of every item were k different requests
(distinct prompts, or distinct seeds): the figure this bench once reported for prompt
variants measured two of three samples being the same prompt.

    .venv/bin/python bench/vote_strategies.py [--config configs/demo.yaml] [--limit 300]

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.config import load_config  # noqa: E402
from distill.runtime import set_offline_env  # noqa: E402

STRATEGIES = {
    "prompt_variants_t0_k3": ["teacher.variation=prompt_variants", "teacher.temperature=0.0", "teacher.samples=3"],
    "prompt_variants_t0_k5": ["teacher.variation=prompt_variants", "teacher.temperature=0.0", "teacher.samples=5"],
    "temperature_0.5_k3": ["teacher.variation=temperature", "teacher.temperature=0.5", "teacher.samples=3"],
    "temperature_1.0_k3": ["teacher.variation=temperature", "teacher.temperature=1.0", "teacher.samples=3"],
}
KEEP = (
    "teacher_accuracy_single",
    "teacher_accuracy_voted",
    "teacher_macro_f1_single",
    "teacher_macro_f1_voted",
    "teacher_coverage_voted",
    "invalid_votes",
    "gold_items_scored",
    "probability_source",
    "requests_sent",
    "requests_deduplicated",
)


def distinct_requests_per_item(run_dir: Path, split: str = "gold") -> float:
    """Mean number of distinct rendered prompts (plus seed) among an item's k samples."""
    import pandas as pd

    df = pd.concat(pd.read_parquet(p) for p in sorted((run_dir / "annotations" / split).glob("*.parquet")))
    return float(df["prompt_hashes"].map(lambda h: len(set(h))).mean())


def main() -> None:
    set_offline_env()
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--only", nargs="*", help="strategy names to run")
    a = ap.parse_args()
    from flows.annotate import annotate_flow

    base = load_config(a.config)
    dev = str(Path(base.data.pool_path).with_name("dev.parquet"))
    results = {}
    for name, sets in STRATEGIES.items():
        if a.only and name not in a.only:
            continue
        for agg in ("majority", "mean_probability"):
            cfg = load_config(
                a.config,
                sets
                + [
                    f"run_name=bench-{name}",
                    f"data.pool_path={dev}",
                    f"data.gold_path={dev}",
                    f"data.pool_limit={a.limit}",
                    f"data.gold_teacher_limit={a.limit}",
                    f"vote.aggregation={agg}",
                ],
            )
            s = annotate_flow(cfg, show_progress=False)
            r = results[f"{name}_{agg}"] = {k: s.get(k) for k in KEEP}
            k = cfg.teacher.samples
            prompts = distinct_requests_per_item(cfg.run_dir)
            r["distinct_prompts_per_item"] = prompts
            if cfg.teacher.variation.value == "prompt_variants":
                assert prompts == k, f"{name}: {prompts:.2f} distinct prompts per item, expected {k}"
            print(
                f"{name:<24} {agg:<17} single {r['teacher_accuracy_single']:.3f}  aggregated "
                f"{r['teacher_accuracy_voted']:.3f}  (macro-F1 {r['teacher_macro_f1_single']:.3f} -> "
                f"{r['teacher_macro_f1_voted']:.3f}, coverage {r['teacher_coverage_voted']:.3f}, "
                f"n={r['gold_items_scored']}, distinct prompts per item {prompts:.2f})",
                flush=True,
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
