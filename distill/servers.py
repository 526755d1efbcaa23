"""Local Prefect and MLflow servers for scheduled and UI-triggered runs: ``distill up|down|status``.

Why: nightly runs, runs triggered from the Prefect UI and the champion's registry need
long-lived servers, and starting them by hand has traps: ``prefect server start --port``
alone leaves the UI calling port 4200, analytics try the network, a default MLflow
file store refuses to start, and a flow that cannot find the servers quietly falls back
to an ephemeral Prefect API and a local ``mlflow.db``. ``distill up`` starts both on
loopback only, persistent under the project's working directory (sqlite databases and
an artifact folder in ``.distill/servers``, or the database URIs given), waits until
both answer their health checks, and writes where they are to ``.distill/servers.json``
and a sourceable ``.distill/servers.env``; every ``distill`` command (and a deployment
served by ``distill serve``) then finds them by itself. ``distill down`` stops them and
``distill status`` says what runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

HOST = "127.0.0.1"  # loopback only: these servers have no authentication


class ServerError(RuntimeError):
    """A server would not start or is not where its state file says."""


@dataclass
class Server:
    name: str  # "prefect", "mlflow" or "labelstudio"
    pid: int
    url: str  # what clients use: the Prefect API URL, the MLflow tracking URI
    ui: str  # what a person opens in a browser
    log: str
    health: str  # the URL that answers when the server is up

    def healthy(self, timeout: float = 2.0) -> bool:
        return _get(self.health, timeout) is not None


def state_dir(workdir: str | Path = ".") -> Path:
    return Path(workdir).resolve() / ".distill"


def _get(url: str, timeout: float = 2.0) -> Optional[bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read() if r.status == 200 else None
    except Exception:
        return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _bin(name: str) -> str:
    """A console script of this environment (prefect, mlflow), next to the running Python."""
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


def prefect_env(home: Path, port: int, database_url: Optional[str] = None) -> dict[str, str]:
    """What a Prefect server on ``port`` needs so that its UI, its API and its clients agree."""
    api = f"http://{HOST}:{port}/api"
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": api,  # the UI's own calls: without it they go to port 4200
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    }
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    return env


def read_state(workdir: str | Path = ".") -> dict[str, Server]:
    p = state_dir(workdir) / "servers.json"
    if not p.exists():
        return {}
    try:
        return {k: Server(**v) for k, v in json.loads(p.read_text()).items()}
    except (ValueError, TypeError):
        return {}


def _write_state(workdir: str | Path, servers: dict[str, Server]) -> None:
    d = state_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "servers.json").write_text(json.dumps({k: asdict(v) for k, v in servers.items()}, indent=2))
    lines = ["# written by `distill up`; `set -a; . .distill/servers.env; set +a` points a shell at the servers"]
    if "prefect" in servers:
        lines.append(f"PREFECT_API_URL={servers['prefect'].url}")
    if "mlflow" in servers:
        lines.append(f"MLFLOW_TRACKING_URI={servers['mlflow'].url}")
    if "labelstudio" in servers:
        lines.append(f"DISTILL_LABEL_STUDIO_URL={servers['labelstudio'].url}")
    (d / "servers.env").write_text("\n".join(lines) + "\n")


def _start(name: str, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            start_new_session=True,
        )


def _wait(server: Server, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"{server.name} server exited with code {proc.returncode}; log {server.log}:\n"
                + _tail(Path(server.log))
            )
        if server.healthy(1.0):
            return
        time.sleep(0.5)
    _stop_pid(proc.pid)
    raise ServerError(
        f"{server.name} server not healthy after {timeout:.0f}s at {server.health}; log {server.log}:\n"
        + _tail(Path(server.log))
    )


def _tail(p: Path, n: int = 15) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def up(
    workdir: str | Path = ".",
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    *,
    prefect_database_url: Optional[str] = None,
    mlflow_backend_uri: Optional[str] = None,
    mlflow_artifacts: Optional[str] = None,
    timeout_s: float = 120.0,
    which: tuple[str, ...] = ("prefect", "mlflow"),
    labelstudio_port: int = 8080,
) -> dict[str, Server]:
    """Start the Prefect server and the MLflow tracking server (with its registry); reuse healthy ones.

    ``prefect_database_url`` (else $DISTILL_PREFECT_DATABASE_URL, else sqlite in
    ``.distill/servers/prefect``) and ``mlflow_backend_uri`` (else
    $DISTILL_MLFLOW_BACKEND_URI, else sqlite in ``.distill/servers/mlflow``) pick each
    server's database; ``mlflow_artifacts`` the folder or URI its artifacts go to;
    ``which`` the servers to start. Both start at once and are then waited for (each takes
    seconds to answer its health check), so ``distill up`` takes the longer of the two.
    """
    base = state_dir(workdir) / "servers"
    servers = {k: v for k, v in read_state(workdir).items() if _alive(v.pid) and v.healthy()}
    started: list[tuple[Server, subprocess.Popen]] = []
    if "prefect" in which and "prefect" not in servers:
        started.append(_start_prefect(base, prefect_port, prefect_database_url))
    if "mlflow" in which and "mlflow" not in servers:
        started.append(_start_mlflow(base, mlflow_port, mlflow_backend_uri, mlflow_artifacts))
    if "labelstudio" in which and "labelstudio" not in servers:
        started.append(_start_labelstudio(base, labelstudio_port, Path(workdir)))
    try:
        for srv, proc in started:
            _wait(srv, proc, timeout_s)
            servers[srv.name] = srv
    except BaseException:
        for srv, proc in started:  # one failed: none of those started now is left running unrecorded
            if srv.name not in servers:
                _stop_pid(proc.pid)
        raise
    finally:
        if servers:
            _write_state(workdir, servers)
    return servers


def _start_prefect(base: Path, port: int, database_url: Optional[str]) -> tuple[Server, subprocess.Popen]:
    if not _port_free(port):
        raise ServerError(f"port {port} on {HOST} is in use: choose another with --prefect-port")
    env = prefect_env(base / "prefect", port, database_url or os.environ.get("DISTILL_PREFECT_DATABASE_URL"))
    log = base / "prefect.log"
    proc = _start("prefect", [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)], env, log)
    api = env["PREFECT_API_URL"]
    return Server("prefect", proc.pid, api, f"http://{HOST}:{port}", str(log), api + "/health"), proc


def _start_mlflow(
    base: Path, port: int, backend_uri: Optional[str], artifacts: Optional[str]
) -> tuple[Server, subprocess.Popen]:
    if not _port_free(port):
        raise ServerError(f"port {port} on {HOST} is in use: choose another with --mlflow-port")
    mdir = base / "mlflow"
    mdir.mkdir(parents=True, exist_ok=True)
    backend = backend_uri or os.environ.get("DISTILL_MLFLOW_BACKEND_URI") or f"sqlite:///{mdir / 'mlflow.db'}"
    log = base / "mlflow.log"
    cmd = [
        _bin("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts or str(mdir / "artifacts"),
    ]
    proc = _start("mlflow", cmd, {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}, log)
    url = f"http://{HOST}:{port}"
    return Server("mlflow", proc.pid, url, url, str(log), url + "/health"), proc


LABEL_STUDIO_VERSION = "1.23.2"


def labelstudio_bin(workdir: Path) -> str:
    """Label Studio's command: $DISTILL_LABEL_STUDIO, else the environment `make labelstudio` builds, else PATH.

    It never lives in distill's own environment: its pins clash with distill's (openai<2,
    pyarrow<25, pytz<2023).
    """
    import shutil

    for cand in (
        os.environ.get("DISTILL_LABEL_STUDIO"),
        str(Path(workdir).resolve() / ".venv-labelstudio" / "bin" / "label-studio"),
        str(Path(__file__).resolve().parents[1] / ".venv-labelstudio" / "bin" / "label-studio"),
        shutil.which("label-studio"),
    ):
        if cand and Path(cand).is_file():
            return cand
    raise ServerError(
        f"Label Studio is not installed: `make labelstudio` installs label-studio=={LABEL_STUDIO_VERSION} into "
        ".venv-labelstudio (its own environment: its pins clash with distill's), or set DISTILL_LABEL_STUDIO"
    )


def labelstudio_credentials(base: Path) -> dict[str, str]:
    """The reviewer account distill creates in its Label Studio (made once, kept 0600 beside its database)."""
    import secrets

    p = base / "labelstudio" / "credentials.json"
    if p.is_file():
        return json.loads(p.read_text())
    p.parent.mkdir(parents=True, exist_ok=True)
    cred = {
        "username": "distill@localhost",
        "password": secrets.token_urlsafe(16),
        "token": secrets.token_hex(20),
    }
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cred, f)
    return cred


def labelstudio_env(data_dir: Path, cred: dict[str, str]) -> dict[str, str]:
    """Label Studio offline and quiet: no version check against PyPI, no Sentry, no analytics; one account whose
    legacy API token distill uses (``Authorization: Token ...``)."""
    return {
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "DO_NOT_TRACK": "true",
        "LABEL_STUDIO_USERNAME": cred["username"],
        "LABEL_STUDIO_PASSWORD": cred["password"],
        "LABEL_STUDIO_USER_TOKEN": cred["token"],
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # reviewers join through the organisation's invite link (Organization -> Add People), not an open sign-up page
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
    }


def _start_labelstudio(base: Path, port: int, workdir: Path) -> tuple[Server, subprocess.Popen]:
    if not _port_free(port):
        raise ServerError(f"port {port} on {HOST} is in use: choose another with --labelstudio-port")
    exe = labelstudio_bin(workdir)
    data = base / "labelstudio"
    env = labelstudio_env(data, labelstudio_credentials(base))
    log = base / "labelstudio.log"
    cmd = [exe, "start", "--no-browser", "--internal-host", HOST, "--port", str(port), "--data-dir", str(data)]
    proc = _start("labelstudio", cmd, env, log)
    url = f"http://{HOST}:{port}"
    return Server("labelstudio", proc.pid, url, url, str(log), url + "/health"), proc


def _stop_pid(pid: int, grace_s: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except OSError:
            try:
                os.kill(pid, sig)
            except OSError:
                return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _alive(pid):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.2)
        if not _alive(pid):
            return


def down(workdir: str | Path = ".") -> list[str]:
    """Stop the servers ``distill up`` started here; returns the names of those that were running."""
    stopped = []
    for name, srv in read_state(workdir).items():
        if _alive(srv.pid):
            _stop_pid(srv.pid)
            stopped.append(name)
    for f in ("servers.json", "servers.env"):
        (state_dir(workdir) / f).unlink(missing_ok=True)
    return stopped


def status(workdir: str | Path = ".") -> dict[str, dict]:
    """Each recorded server: its URLs, pid, and whether it is alive and healthy now."""
    return {
        name: {**asdict(srv), "alive": _alive(srv.pid), "healthy": _alive(srv.pid) and srv.healthy()}
        for name, srv in read_state(workdir).items()
    }


def use_servers(workdir: str | Path = ".") -> dict[str, str]:
    """Point this process at the servers of ``distill up`` when they are healthy; explicit env vars win.

    Sets ``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` (only those not set already) and
    returns what it set. Called by every ``distill`` command before any flow runs.
    """
    done: dict[str, str] = {}
    for name, var in (("prefect", "PREFECT_API_URL"), ("mlflow", "MLFLOW_TRACKING_URI")):
        srv = read_state(workdir).get(name)
        if srv is not None and not os.environ.get(var) and _alive(srv.pid) and srv.healthy(1.0):
            os.environ[var] = done[var] = srv.url
    ls = read_state(workdir).get("labelstudio")
    cred = state_dir(workdir) / "servers" / "labelstudio" / "credentials.json"
    if ls is not None and cred.is_file() and not os.environ.get("LABEL_STUDIO_API_KEY") and _alive(ls.pid):
        # the token of distill's own loopback Label Studio (never printed); review.api_key_env names this variable
        os.environ["LABEL_STUDIO_API_KEY"] = json.loads(cred.read_text())["token"]
        done["LABEL_STUDIO_API_KEY"] = "(token)"
    return done
