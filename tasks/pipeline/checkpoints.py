"""Finished stages of a run, kept in the run folder so a rerun after a crash resumes after the last one.

Why distill's own manifest and not Prefect's cache policies with persisted results: what a
stage hands on is files in the run folder (Parquet parts, the student's folder) plus a small
typed result; the manifest sits beside those files and is checked against them (each file a
result names is recorded with its size and modification time, so a deleted or rewritten
output is recomputed rather than trusted). Prefect's results live in its own storage,
apart from the files, and its cache keys hash the task's parameters, which here are a
config object and typed results holding paths, not the contents. A run launched from the
Prefect UI, a schedule or Python uses the same manifest, with or without a Prefect server.

The key of a stage is a hash of the config sections the stage reads (STAGE_SECTIONS) and
the keys of the results it is given, so changing the student's settings retrains but does
not re-aggregate, and changing the data or the prompt invalidates everything after loading
(the response cache still answers the teacher's part without paying again).

Writes are atomic (a temporary file, fsync, rename): a kill -9 leaves either the previous
record or the new one, never half of one. The lock (``run_lock``) keeps a second run of the
same run name out of the folder while one is running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pickle
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

# which config sections each stage's result depends on (beside the results it is handed)
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "annotate": ("task", "teacher", "data", "selection", "prompt"),
    "aggregate": ("task", "vote", "prompt"),
    "train": ("task", "student", "vote", "energy", "pricing", "prompt"),
    "evaluate": ("task", "student", "data", "teacher", "energy", "pricing", "reference", "prompt"),
}
FORMAT = 1


class RunBusy(RuntimeError):
    """Another run holds the run folder."""


def _section(cfg: Any, name: str) -> Any:
    value = getattr(cfg, name)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if name == "prompt":  # the file's content, not its name
        from tasks.templates.load import load_prompt

        return load_prompt(value).template_hash()
    return value.value if hasattr(value, "value") else value


def _files(obj: Any, out: dict[str, list[int]]) -> None:
    """Every existing file or folder a result names, with its size and modification time."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _files(getattr(obj, f.name), out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _files(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _files(v, out)
    elif isinstance(obj, str) and 0 < len(obj) < 4096 and os.sep in obj:
        p = Path(obj)
        with contextlib.suppress(OSError):
            if p.is_file():
                st = p.stat()
                out[obj] = [st.st_size, st.st_mtime_ns]
            elif p.is_dir():
                out[obj] = [-1, sum(1 for _ in p.rglob("*"))]


class StageCheckpoints:
    """``run_dir/stages/<stage>.pkl``: the stage's key, the files it wrote and its typed result."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.dir = Path(run_dir) / "stages"
        self.enabled = enabled
        self._keys: dict[int, str] = {}  # id(result) -> its key, so the next stage's key includes it
        self.reused: list[str] = []
        self.why_not: dict[str, str] = {}
        if not enabled and self.dir.exists():
            for p in self.dir.glob("*.pkl"):
                p.unlink()

    def key(self, stage: str, cfg: Any, inputs: tuple[Any, ...]) -> str:
        parts: dict[str, Any] = {
            "stage": stage,
            "format": FORMAT,
            "config": {s: _section(cfg, s) for s in STAGE_SECTIONS.get(stage, ())},
        }
        upstream = []
        for a in inputs:
            if id(a) in self._keys:
                upstream.append(self._keys[id(a)])
            elif getattr(a, "fingerprint", None):
                upstream.append(str(a.fingerprint))
        parts["upstream"] = upstream
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def remember(self, result: Any, key: str, files: dict[str, list[int]]) -> None:
        """What the next stage's key includes: this key and the files as written (a redo changes them)."""
        blob = json.dumps([key, sorted(files.items())])
        self._keys[id(result)] = hashlib.sha256(blob.encode()).hexdigest()[:20]

    def load(self, stage: str, key: str) -> Optional[Any]:
        """The stage's result if it finished with this key and its files are as it left them; else None."""
        path = self.dir / f"{stage}.pkl"
        if not self.enabled or not path.exists():
            return None
        try:
            rec = pickle.loads(path.read_bytes())
        except Exception as e:  # an unreadable record is recomputed, never trusted
            self.why_not[stage] = f"record unreadable ({type(e).__name__})"
            return None
        if rec.get("key") != key:
            self.why_not[stage] = "its inputs or settings changed"
            return None
        now: dict[str, list[int]] = {}
        _files(rec["result"], now)
        changed = [f for f, sig in rec["files"].items() if now.get(f) != sig]
        if changed:
            self.why_not[stage] = f"{len(changed)} of its files changed or are gone (e.g. {changed[0]})"
            return None
        self.reused.append(stage)
        self.remember(rec["result"], key, now)
        return rec["result"]

    def save(self, stage: str, key: str, result: Any, seconds: float) -> None:
        files: dict[str, list[int]] = {}
        _files(result, files)
        self.remember(result, key, files)
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        blob = pickle.dumps(
            {"key": key, "stage": stage, "files": files, "result": result, "seconds": seconds, "finished": time.time()}
        )
        atomic_write(self.dir / f"{stage}.pkl", blob)

    def seconds(self, stage: str) -> Optional[float]:
        """How long the stage took when it ran (for a reused stage)."""
        with contextlib.suppress(Exception):
            return float(pickle.loads((self.dir / f"{stage}.pkl").read_bytes())["seconds"])
        return None


def atomic_write(path: Path, blob: bytes) -> None:
    """Write a file so that a crash leaves the old content or the new, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def run_lock(run_dir: Path, what: str = "distill") -> Iterator[None]:
    """Hold ``run_dir/.lock`` for the run; a second run of the same run name is refused with who holds it.

    Why refuse and not wait: a second run of the same name would rewrite the same Parquet
    parts and the same student folder; waiting hours behind a nightly run is rarely what
    the person who clicked "run" wants. The operating system drops the lock when its process
    dies (even by kill -9), so a crashed run never leaves the folder locked.
    """
    from tasks.pipeline.preflight import PreflightError

    run_dir = Path(run_dir)
    path = run_dir / ".lock"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PreflightError(f"run folder {run_dir} is not writable: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            raise RunBusy(
                f"run folder {run_dir} is in use by another {what} run ({holder}); wait for it to finish, "
                f"or give this run another run_name"
            ) from None
        info = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)
