"""A child process for the batch transport's kill tests: annotate one shard through the fake's Batch API.

``python -m tests.batch_child ARGS.json``; the test sets DISTILL_FAILPOINT so that the
process kills itself (SIGKILL) at one point of the batch's life, then annotates the same
shard again in-process and checks nothing was submitted or paid twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distill.config import config_from_dict
from tasks.accounting.pricing import resolve_prices
from tasks.teacher.shard import annotate_shard
from tasks.templates.load import load_prompt
from tests.conftest import shard_settings


def main() -> None:
    args = json.loads(Path(sys.argv[1]).read_text())
    cfg = config_from_dict(args["config"])
    template = load_prompt(cfg.prompt)
    run = shard_settings(cfg, template, cfg.teacher.base_url or "", prices=resolve_prices(cfg.teacher, cfg.pricing))
    annotate_shard(args["in_path"], args["out_path"], run, show_progress=False)


if __name__ == "__main__":
    main()
