"""The champion at work: the batch-predict flow (in-process and on Dask), `distill predict`, MLflow's model server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("mlflow")

from distill.cli import main as cli_main  # noqa: E402
from distill.config import GateConfig, PredictConfig, StudentConfig  # noqa: E402
from tasks.classify.pyfunc import log_student_model  # noqa: E402
from tasks.classify.register import register_classifier  # noqa: E402
from tasks.classify.train import train_student  # noqa: E402
from tasks.registry.tracking import setup_tracking  # noqa: E402

pytestmark = pytest.mark.system  # make test-fast leaves it out (README "Tests")

LABELS = ["positive", "negative"]
POS = ["great fun", "loved it", "wonderful acting", "a joy", "brilliant film", "superb and moving"]
NEG = ["awful mess", "hated it", "terrible acting", "a bore", "dreadful film", "dull and pointless"]


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A tiny trained student registered as champion of 'batch-m' in a sqlite MLflow store."""
    import mlflow

    tmp = tmp_path_factory.mktemp("champ")
    rows = [(t, ["positive"], "positive", 1.0) for t in POS] + [(t, ["negative"], "negative", 1.0) for t in NEG]
    p = tmp / "v.parquet"
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows * 3, columns=["text", "votes", "label", "confidence"])), p)
    cfg = StudentConfig(epochs=6, batch_size=8, learning_rate=3e-4, max_length=16, early_stopping_patience=20)
    model_dir = train_student(
        [str(p)], labels=LABELS, out_dir=str(tmp / "out"), student=cfg, min_agreement=0.6, show_progress=False
    ).model_dir
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    setup_tracking(uri, "batch-test")
    with mlflow.start_run() as run:
        info = log_student_model(model_dir, "fp32", 16, POS[:2])
        r = register_classifier(
            info.model_uri,
            model_name="batch-m",
            score=0.9,
            gold_texts=POS + NEG,
            gold_labels=["positive"] * 6 + ["negative"] * 6,
            labels=LABELS,
            gate=GateConfig(min_macro_f1=0.5),
            run_id=run.info.run_id,
        )
    assert r.promoted
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
    return uri


def items(tmp_path, n=50):
    texts = [(POS + NEG)[i % 12] + f" number {i}" for i in range(n)]
    df = pd.DataFrame({"ticket": [f"t{i}" for i in range(n)], "body": texts})
    df.loc[7, "body"] = ""  # set aside and counted, never labelled with a guess
    df = pd.concat([df, df.iloc[[3]]], ignore_index=True)  # a repeated id
    p = tmp_path / "tickets.csv"
    df.to_csv(p, index=False)
    return p


def predict_cfg(tmp_path, uri, runtime=None, out="labels.parquet") -> PredictConfig:
    src = tmp_path / "tickets.csv"
    return PredictConfig(
        input_path=str(src if src.exists() else items(tmp_path)),
        output_path=str(tmp_path / out),
        text_column="body",
        id_column="ticket",
        model_uri="models:/batch-m@champion",
        tracking_uri=uri,
        shard_rows=16,
        work_dir=str(tmp_path / f"work-{out}"),
        energy={"measure": False},
        runtime=runtime or {"task_runner": "local"},
    )


def test_batch_predict_labels_every_item_in_shards_and_logs_the_job(tmp_path, champion, prefect_api):
    import mlflow

    from flows.batch_predict import batch_predict_flow

    s = batch_predict_flow(predict_cfg(tmp_path, champion))
    assert s["items"] == 49 and s["shards"] == 4 and s["model_version"] == "1"
    assert s["data"]["empty_text"] == 1 and s["data"]["duplicate_ids"] == 1
    out = pd.read_parquet(s["output_path"])
    assert sorted(out["id"]) == sorted(f"t{i}" for i in range(50) if i != 7)
    assert set(out["label"]) <= set(LABELS) and out["score"].between(0, 1).all()
    assert out.set_index("id").loc["t0", "label"] == "positive" and out.set_index("id").loc["t6", "label"] == "negative"
    assert s["items_per_s"] > 0 and s["usd"] > 0 and s["usd_per_1m_items"] > 0
    run = mlflow.MlflowClient(tracking_uri=champion).get_run(s["mlflow_run_id"])
    assert (
        run.data.metrics["items_per_s"] == pytest.approx(s["items_per_s"]) and run.data.params["model_version"] == "1"
    )
    # a rerun finds every shard written and labels nothing again; another input file is another job
    again = batch_predict_flow(predict_cfg(tmp_path, champion))
    assert again["shards_reused"] == 4 and again["items_labelled_now"] == 0 and again["items"] == 49
    other = tmp_path / "other.csv"
    pd.DataFrame({"ticket": ["x1"], "body": ["loved it"]}).to_csv(other, index=False)
    s3 = batch_predict_flow(predict_cfg(tmp_path, champion).model_copy(update={"input_path": str(other)}))
    assert s3["items"] == 1 and s3["shards_reused"] == 0 and pd.read_parquet(s3["output_path"])["id"].tolist() == ["x1"]


def test_dask_cluster_gives_the_same_labels_as_in_process(tmp_path, champion, prefect_api):
    from flows.batch_predict import batch_predict_flow

    local = batch_predict_flow(predict_cfg(tmp_path, champion, out="local.parquet"))
    dask = batch_predict_flow(
        predict_cfg(tmp_path, champion, {"task_runner": "dask", "dask_workers": 2}, "dask.parquet")
    )
    assert dask["task_runner"] == "dask" and dask["shards"] == local["shards"] == 4
    a = pd.read_parquet(local["output_path"]).set_index("id").sort_index()
    b = pd.read_parquet(dask["output_path"]).set_index("id").sort_index()
    assert a["label"].tolist() == b["label"].tolist() and a["score"].round(5).tolist() == b["score"].round(5).tolist()


def test_distill_predict_cli(tmp_path, champion, prefect_api, capsys):
    p = items(tmp_path)
    out = tmp_path / "cli.csv"
    assert (
        cli_main(
            [
                "predict",
                str(p),
                "--model",
                "models:/batch-m@champion",
                "--tracking-uri",
                champion,
                "--text-column",
                "body",
                "--id-column",
                "ticket",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    df = pd.read_csv(out)
    assert len(df) == 49 and "items/s" in capsys.readouterr().out
    assert (
        cli_main(
            [
                "predict",
                str(p),
                "--model",
                "models:/batch-m@champion",
                "--tracking-uri",
                champion,
                "--text-column",
                "nope",
            ]
        )
        == 2
    )  # a wrong column names the file and the columns it has
    assert "'nope'" in capsys.readouterr().err


def test_mlflow_model_server_serves_the_champion(tmp_path, champion):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    venv_bin = os.path.dirname(sys.executable)  # mlflow starts uvicorn from PATH, as in an activated virtualenv
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")}
    mlflow_bin = os.path.join(venv_bin, "mlflow")
    proc = subprocess.Popen(
        [
            mlflow_bin,
            "models",
            "serve",
            "-m",
            "models:/batch-m@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=open(tmp_path / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).read()
                break
            except Exception:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow models serve never answered /ping"
                time.sleep(1)
        body = json.dumps(
            {"dataframe_split": {"columns": ["text"], "data": [["loved it, a joy"], ["a dreadful bore"]]}}
        )
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body.encode(), {"Content-Type": "application/json"}
        )
        pred = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        assert [p["label"] for p in pred] == ["positive", "negative"] and all(0 < p["score"] <= 1 for p in pred)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
