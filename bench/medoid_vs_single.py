"""Does the medoid beat a single teacher sample? ROUGE-L vs embedding similarity, on every item with a reference.

The generate demo's teacher is scored on 40 gold items, too few to tell a medoid from a
single sample (0.004 of BERTScore F1 apart there). The demo's pool items have human
references too (`data/xsum/pool_references.parquet`, kept out of training), so this bench
re-aggregates a finished run's cached teacher samples, pool and gold together, with each
similarity, and scores every single sample and each medoid against the references. No
teacher request is sent: the samples are the run's annotation Parquet.

    .venv/bin/python bench/medoid_vs_single.py [--run-dir runs/summaries]

Needs a generate run: `make demo CONFIG=configs/summaries.yaml` first. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.runtime import set_offline_env  # noqa: E402

set_offline_env()

import pandas as pd  # noqa: E402

from tasks.generate.aggregate import medoid_shards  # noqa: E402
from tasks.generate.evaluate import texts_of  # noqa: E402
from tasks.generate.metrics import bertscore, rouge  # noqa: E402
from tasks.templates.generation import load_generation_prompt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/summaries")
    ap.add_argument("--prompt", default="prompts/summary_xsum.yaml")
    ap.add_argument("--references", nargs="+", default=["data/xsum/pool_references.parquet", "data/xsum/gold.parquet"])
    args = ap.parse_args()

    template = load_generation_prompt(args.prompt)
    refs = pd.concat([pd.read_parquet(p)[["id", "reference"]] for p in args.references]).drop_duplicates("id")
    refs = refs.set_index("id")["reference"]
    shards = sorted(str(p) for p in Path(args.run_dir, "annotations").glob("*/*.parquet"))
    if not shards:
        sys.exit(f"no annotation shards under {args.run_dir}/annotations: run the generate demo first")
    k = len(pd.read_parquet(shards[0])["votes"].iloc[0])
    result: dict[str, object] = {"run_dir": args.run_dir, "k": k}
    with tempfile.TemporaryDirectory() as tmp:
        for sim in ("rougeL", "embedding"):
            outs = [medoid_shards([s], f"{tmp}/{sim}/{i}", k, sim, template.max_words)[0] for i, s in enumerate(shards)]
            df = pd.concat([pd.read_parquet(p) for p in outs], ignore_index=True)
            df = df[df["id"].isin(refs.index)]
            r = [refs[i] for i in df["id"]]
            if sim == "rougeL":  # the single samples do not depend on the similarity
                singles = []
                for j in range(k):
                    p = texts_of(v[j] if ok[j] else None for v, ok in zip(df["votes"], df["sample_valid"]))
                    singles.append((bertscore(p, r).f1, rouge(p, r).rougeL))
                result["items"] = len(df)
                result["single_bertscore_f1_by_sample"] = [round(b, 4) for b, _ in singles]
                result["single_bertscore_f1_mean"] = round(sum(b for b, _ in singles) / k, 4)
                result["single_rougeL_mean"] = round(sum(x for _, x in singles) / k, 4)
            m = texts_of(df["label"])
            result[f"medoid_{sim}_bertscore_f1"] = round(bertscore(m, r).f1, 4)
            result[f"medoid_{sim}_rougeL"] = round(rouge(m, r).rougeL, 4)
    print(f"{result['items']} items with a human reference, k={k}")
    print("| teacher text | BERTScore F1 | ROUGE-L |\n|---|---|---|")
    print(
        f"| single sample (mean of the k) | {result['single_bertscore_f1_mean']:.4f} | "
        f"{result['single_rougeL_mean']:.4f} |"
    )
    for sim in ("rougeL", "embedding"):
        print(
            f"| medoid by {sim} | {result[f'medoid_{sim}_bertscore_f1']:.4f} | {result[f'medoid_{sim}_rougeL']:.4f} |"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
