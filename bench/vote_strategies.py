"""Which way of drawing the k samples helps this teacher? Single answer vs voted, on dev.

Runs distill's real annotate flow on the human-labelled dev split (never gold) with the
local teacher, once per strategy, and prints single-answer and voted accuracy for each.
The pool is the dev split itself, so its requests are answered from the cache for free.

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
    "temperature_0.5_k3": ["teacher.variation=temperature", "teacher.temperature=0.5", "teacher.samples=3"],
    "temperature_1.0_k3": ["teacher.variation=temperature", "teacher.temperature=1.0", "teacher.samples=3"],
}


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
        cfg = load_config(a.config, sets + [f"run_name=bench-{name}", f"data.pool_path={dev}", f"data.gold_path={dev}",
                                            f"data.pool_limit={a.limit}", f"data.gold_teacher_limit={a.limit}"])
        s = annotate_flow(cfg, show_progress=False)
        results[name] = {k: s.get(k) for k in ("teacher_accuracy_single", "teacher_accuracy_voted",
                                               "teacher_macro_f1_single", "teacher_macro_f1_voted",
                                               "teacher_coverage_voted", "invalid_votes", "gold_items_scored")}
        r = results[name]
        print(f"{name:<24} single {r['teacher_accuracy_single']:.3f}  voted {r['teacher_accuracy_voted']:.3f}  "
              f"(macro-F1 {r['teacher_macro_f1_single']:.3f} -> {r['teacher_macro_f1_voted']:.3f}, "
              f"coverage {r['teacher_coverage_voted']:.3f}, n={r['gold_items_scored']})", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
