"""Refresh the docs' screenshots: the Prefect run form of distill/on-demand, the champion's MLflow page with its
model card, the prompt registry, and the Label Studio project with distill's pre-annotations.

Against real servers, as a user sees them: ``distill up --labelstudio`` in a scratch folder
(its own ports), a small real distill run on the local teacher (so MLflow has a champion),
``distill serve`` (so Prefect has the deployments), ``distill review export`` into Label
Studio and two answers posted as a reviewer would, then headless Chromium (Debian's
``chromium``: ``apt-get install chromium``) photographs the pages; Label Studio's pages need
a signed-in session, so those are taken over the DevTools protocol with its session cookie.
The PNGs are reduced to a palette so they stay small in git. Everything started is stopped
again.

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
    _palette(path, keep_width)


def _palette(path: Path, keep_width: int | None = None) -> None:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if keep_width:
        img = img.crop((0, 0, keep_width, img.height))
    img.quantize(colors=128).save(path, optimize=True)
    print(f"{path.relative_to(REPO)} ({path.stat().st_size // 1024} KB)")


def signed_in_cookies(base: str, email: str, password: str) -> dict[str, str]:
    """Sign in through Label Studio's own form; its session cookies."""
    import http.cookiejar
    import re
    import urllib.parse
    import urllib.request

    jar = http.cookiejar.CookieJar()
    op = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    html = op.open(base + "/user/login/").read().decode()
    m = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html)
    assert m, "no login form"
    form = urllib.parse.urlencode({"csrfmiddlewaretoken": m.group(1), "email": email, "password": password})
    op.open(
        urllib.request.Request(base + "/user/login/", data=form.encode(), headers={"Referer": base + "/user/login/"})
    )
    cookies = {c.name: c.value for c in jar}
    assert "sessionid" in cookies, "Label Studio sign-in failed"
    return cookies


def shoot_signed_in(url: str, cookies: dict[str, str], path: Path, width: int = 1400, height: int = 900) -> None:
    """Screenshot a page that needs a session: Chromium over the DevTools protocol, the cookies set first."""
    import base64
    import json
    import urllib.parse
    import urllib.request

    from websockets.sync.client import connect

    port = 9377
    profile = tempfile.mkdtemp(prefix="chromium-")
    chrome = subprocess.Popen(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            f"--remote-debugging-port={port}",
            "--remote-allow-origins=*",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        page = None
        for _ in range(100):
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json").read())
                page = next(t for t in targets if t["type"] == "page")
                break
            except Exception:
                time.sleep(0.2)
        assert page, "Chromium's DevTools did not answer"
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            n = [0]

            def send(method: str, **params: object) -> dict:
                n[0] += 1
                ws.send(json.dumps({"id": n[0], "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv())
                    if msg.get("id") == n[0]:
                        return msg.get("result", {})

            send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
            host = urllib.parse.urlparse(url).hostname
            for name, value in cookies.items():
                send("Network.setCookie", name=name, value=value, domain=host, path="/")
            send("Page.navigate", url=url)
            time.sleep(12)  # the single-page app loads its data after the page's load event
            shot = send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        _palette(path)
    finally:
        os.killpg(chrome.pid, signal.SIGTERM)
        chrome.wait(10)


def label_studio_pages(ls_url: str, work: Path, cfg: object) -> None:
    """distill review export into Label Studio, two answers as a reviewer gives them, the project photographed."""
    import json

    from distill.config import ReviewConfig
    from distill.servers import state_dir
    from tasks.review.labelstudio import LabelStudio
    from tasks.review.loop import export_review
    from tasks.templates.load import load_prompt

    cred = json.loads((state_dir(work) / "servers" / "labelstudio" / "credentials.json").read_text())
    os.environ["LABEL_STUDIO_API_KEY"] = cred["token"]
    review = ReviewConfig(labels_dir=str(work / "reviews"), url=ls_url)
    labels = list(load_prompt(cfg.prompt).labels)  # type: ignore[attr-defined]
    export_review(
        run_dir=cfg.run_dir,  # type: ignore[attr-defined]
        review=review,
        tracking=cfg.tracking,  # type: ignore[attr-defined]
        labels=labels,
        how="low_confidence",
        n=20,
    )
    ls = LabelStudio(ls_url, token_env="LABEL_STUDIO_API_KEY")
    pid = json.loads((work / "reviews" / "labelstudio.json").read_text())["project_id"]
    tasks = ls.tasks(pid)
    for t in tasks[:2]:  # a reviewer confirms the first, corrects the second
        lab = t["data"]["teacher_label"]
        other = next(x for x in labels if x != lab)
        ls.annotate(t["id"], lab if t is tasks[0] else other, from_name="label", to_name="text")
    cookies = signed_in_cookies(ls_url, cred["username"], cred["password"])
    shoot_signed_in(f"{ls_url}/projects/{pid}/data", cookies, OUT / "labelstudio-project.png")
    shoot_signed_in(f"{ls_url}/projects/{pid}/data?task={tasks[2]['id']}", cookies, OUT / "labelstudio-task.png")


def main() -> None:
    from distill import servers

    work = Path(tempfile.mkdtemp(prefix="distill-shots-"))
    up = servers.up(work, 4288, 5088, which=("prefect", "mlflow", "labelstudio"), labelstudio_port=8088, timeout_s=300)
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
        # the version's description is its model card (compact); a tall window shows it rendered
        shoot(
            f"{up['mlflow'].ui}/#/models/{summary['model_name']}/versions/{summary['model_version']}",
            OUT / "mlflow-model-card.png",
            height=2400,
            keep_width=1040,
        )
        shoot(f"{up['mlflow'].ui}/#/prompts/{summary['model_name']}-prompt", OUT / "mlflow-prompt.png", keep_width=1040)
        label_studio_pages(up["labelstudio"].url, work, cfg)
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
