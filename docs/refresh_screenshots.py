"""Refresh the README's screenshots: the Prefect run form of distill/on-demand and the champion's MLflow page.

Against real servers, as a user sees them: ``distill up`` in a scratch folder (its own
ports), a small real distill run on the local teacher (so MLflow has a champion),
``distill serve`` (so Prefect has the deployments), then headless Chromium (Debian's
``chromium``: ``apt-get install chromium``) photographs both pages. The PNGs are reduced
to a palette so they stay small in git. Everything started is stopped again.

    .venv/bin/python docs/refresh_screenshots.py        (or: make screenshots)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "docs" / "screenshots"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise SystemExit("no Chromium found: apt-get install chromium")


def shoot(url: str, path: Path, width: int = 1400, height: int = 1100, keep_width: int | None = None) -> None:
    """Screenshot ``url``; ``keep_width`` crops a side panel off the right (MLflow's assistant)."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            "--virtual-time-budget=25000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if keep_width:
        img = img.crop((0, 0, keep_width, img.height))
    img.quantize(colors=128).save(path, optimize=True)
    print(f"{path.relative_to(REPO)}: {url} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    from distill import servers

    work = Path(tempfile.mkdtemp(prefix="distill-shots-"))
    up = servers.up(work, 4288, 5088)
    env = {**os.environ, "PREFECT_API_URL": up["prefect"].url, "MLFLOW_TRACKING_URI": up["mlflow"].url}
    os.environ.update({k: env[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")})
    serve = None
    try:
        from distill.config import load_config
        from flows.distillation import distill_flow

        # the demo at k=1 on 800 items: enough for a student that clears the gate (answers cached after the demo)
        cfg = load_config(
            REPO / "configs/demo.yaml",
            [
                "data.pool_limit=800",
                "teacher.samples=1",
                "run_name=screenshots",
                f"workdir={work / 'runs'}",
                "energy.measure=false",
            ],
        )
        summary = distill_flow(cfg, show_progress=False)
        serve = subprocess.Popen(
            [sys.executable, "-m", "distill.cli", "serve", "configs/demo.yaml"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            for _ in range(120):
                try:
                    dep = client.read_deployment_by_name("distill/on-demand")
                    break
                except Exception:
                    time.sleep(1)
        OUT.mkdir(parents=True, exist_ok=True)
        shoot(f"{up['prefect'].ui}/deployments/deployment/{dep.id}/run", OUT / "prefect-run-form.png")
        assert summary["promoted"], f"the run's student was not promoted: {summary['gate_reason']}"
        shoot(
            f"{up['mlflow'].ui}/#/models/{summary['model_name']}/versions/{summary['model_version']}",
            OUT / "mlflow-champion.png",
            keep_width=1040,
        )
        shoot(
            f"{up['mlflow'].ui}/#/experiments/{client_experiment(up['mlflow'].url)}/runs/{summary['mlflow_run_id']}",
            OUT / "mlflow-run.png",
            keep_width=1040,
        )
    finally:
        if serve is not None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(30)
        servers.down(work)


def client_experiment(tracking: str) -> str:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking).get_experiment_by_name("distill").experiment_id


if __name__ == "__main__":
    main()
