"""A measured figure as data: bench/figures/NAME.json, stamped with when, where and how it was measured.

docs/gen_figures.py renders the tables and plots of docs/measurements.md from these files; every file carries
``date``, ``commit``, ``command`` and ``machine`` (tests/test_docs.py checks), so each rendered table says
"Measured DATE at COMMIT: `COMMAND`". A bench that writes its final JSON with ``--out`` goes through ``write``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PROVENANCE = ("date", "commit", "command", "machine")


def commit() -> str:
    """The short commit of the checkout, with ``+changes`` when tracked files differ from it."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True)
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def command() -> str:
    """This process's command line as one would type it in the repo (the venv's python named by its path)."""
    python = Path(sys.executable)
    try:
        python = python.relative_to(REPO)
    except ValueError:
        python = Path("python")
    return shlex.join([str(python), *sys.argv])


def machine() -> str:
    """CPU model and core count (and nothing that names the host)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or 'CPU'}, {os.cpu_count()} cores"


def stamp(record: dict[str, Any], cmd: str | None = None) -> dict[str, Any]:
    """``record`` with today's date, this checkout's commit, the command and the machine set."""
    record.update(date=date.today().isoformat(), commit=commit(), command=cmd or command(), machine=machine())
    return record


def write(path: str | Path, figures: dict[str, Any], cmd: str | None = None) -> dict[str, Any]:
    """Merge ``figures`` into the JSON at ``path`` (relative to the repo), stamp it and write it atomically."""
    out = REPO / path
    record: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    record.update(figures)
    stamp(record, cmd)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(out)
    return record
