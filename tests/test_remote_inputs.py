"""Inputs in object storage: a real S3-compatible server (moto's, on loopback) behind s3fs, as a team's bucket.

A run reads its pool and gold from ``s3://`` as it reads local files; a missing bucket, a
missing object, a denied read and a download cut off mid-file each give one error naming
the URL (never a credential) before anything is sent to the teacher.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pandas as pd
import pytest
import yaml

from distill.cli import main as cli_main
from tasks.data.readers import DataError, iter_items
from tasks.data.remote import public
from tests.test_distill_flow import cfg_dict, write_data

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture
def s3(monkeypatch, tmp_path) -> Iterator[str]:
    """A loopback S3 server with a bucket holding the fake teacher's pool and gold; yields its endpoint."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-canary")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.makedirs("team-data", exist_ok=True)  # moto keeps its buckets across servers of one process
    write_data(tmp_path, 48, 24)
    fs.put(str(tmp_path / "pool.parquet"), "team-data/tickets/pool.parquet")
    fs.put(str(tmp_path / "gold.parquet"), "team-data/tickets/gold.parquet")
    try:
        yield endpoint
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_a_run_reads_pool_and_gold_from_s3(s3, tmp_path, binary_prompt, fake_teacher, prefect_api, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": fake_teacher.base_url, "samples": 1})
    raw["data"].update(
        {"pool_path": "s3://team-data/tickets/pool.parquet", "gold_path": "s3://team-data/tickets/gold.parquet"}
    )
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    out = tmp_path / "s.json"
    assert cli_main(["annotate", str(p), "--no-progress", "--summary-json", str(out)]) == 0, capsys.readouterr().err
    s = json.loads(out.read_text())
    assert s["items"] == 48 and s["data_gold"]["items"] == 24  # every pool and gold item, read from the bucket
    assert s["data_pool"]["path"] == "s3://team-data/tickets/pool.parquet"
    assert "testing-secret-canary" not in out.read_text()


@pytest.mark.parametrize(
    "url,expect",
    [
        ("s3://no-such-bucket/pool.parquet", "input not found: s3://no-such-bucket/pool.parquet"),
        ("s3://team-data/tickets/missing.parquet", "input not found: s3://team-data/tickets/missing.parquet"),
        ("s3://team-data/tickets/", "a folder; a remote input is one .csv, .jsonl or .parquet file"),
    ],
)
def test_missing_bucket_object_or_a_folder_is_one_line_naming_the_url(s3, url, expect):
    with pytest.raises(DataError) as e:
        list(iter_items(url, "text", "id", 100))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_a_denied_read_names_the_url_and_no_credential(s3, monkeypatch):
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks credentials from now on
    with pytest.raises(DataError) as e:
        list(iter_items("s3://team-data/tickets/pool.parquet", "text", "id", 100))
    msg = str(e.value)
    assert "s3://team-data/tickets/pool.parquet" in msg and ("Forbidden" in msg or "denied" in msg.lower()), msg
    assert "testing-secret-canary" not in msg


class _CuttingProxy:
    """A loopback TCP proxy in front of the S3 server that cuts every object download after ``cut`` bytes."""

    def __init__(self, upstream: str, cut: int = 700) -> None:
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.up = (host, int(port))
        self.cut = cut
        self.port = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            server = await asyncio.start_server(self._client, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.up)
        head = await reader.readuntil(b"\r\n\r\n")  # one request per connection is enough for the reads cut here
        first = head.split(b"\r\n", 1)[0].decode()
        up_w.write(head.replace(b"Connection: keep-alive", b"Connection: close"))
        await up_w.drain()
        object_get = first.startswith("GET ") and ".parquet" in first and "list-type" not in first
        sent = 0
        while True:
            chunk = await up_r.read(4096)
            if not chunk:
                break
            if object_get and sent + len(chunk) > self.cut:
                writer.write(chunk[: self.cut - sent])
                await writer.drain()
                break  # the connection drops mid-body
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
        writer.close()
        up_w.close()


def test_a_download_cut_mid_file_is_one_error_not_a_short_pool(s3, monkeypatch):
    proxy = _CuttingProxy(s3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(DataError) as e:
        list(iter_items("s3://team-data/tickets/pool.parquet", "text", "id", 100))
    msg = str(e.value)
    assert msg.startswith("s3://team-data/tickets/pool.parquet") or "s3://team-data/tickets/pool.parquet" in msg, msg
    assert "\n" not in msg


def test_urls_are_shown_without_credentials():
    assert public("s3://AKIA:secret@bucket/key.parquet?X-Amz-Signature=abc") == "s3://bucket/key.parquet"
    assert public("hf://datasets/org/name/data/train.parquet") == "hf://datasets/org/name/data/train.parquet"
    assert public("/local/path.csv") == "/local/path.csv"


def test_credentials_in_storage_options_are_refused(tmp_path, binary_prompt):
    from distill.config import ConfigError, config_from_dict

    raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": "http://x/v1"})
    raw["data"]["storage_options"] = {"client_kwargs": {"endpoint_url": "http://minio:9000"}, "secret": "s3cr3t"}
    with pytest.raises(ConfigError, match=r"data\.storage_options\.secret: credentials do not belong"):
        config_from_dict(raw)
    raw["data"]["storage_options"] = {"client_kwargs": {"endpoint_url": "http://minio:9000"}, "anon": True}
    assert config_from_dict(raw).data.storage_options["anon"] is True


def test_a_file_on_the_hub_reads_through_hf_urls_from_a_local_stand_in(tmp_path, monkeypatch):
    """hf:// cannot reach the hub from here: fsspec's memory filesystem stands in for the transport."""
    import fsspec

    mem = fsspec.filesystem("memory")
    df = pd.DataFrame({"id": ["a", "b"], "text": ["good", "bad"]})
    with mem.open("/hub/tickets.parquet", "wb") as f:
        df.to_parquet(f)
    got = pd.concat(list(iter_items("memory://hub/tickets.parquet", "text", "id", 10)))
    assert got["id"].tolist() == ["a", "b"]


def test_frames_from_python_run_as_files_in_the_run_folder(tmp_path, binary_prompt, fake_teacher, prefect_api):
    """A DataFrame pool and a datasets.Dataset gold: written once as Parquet, the flow gets their paths."""
    import datasets
    from prefect.client.orchestration import get_client

    from distill import api

    write_data(tmp_path, 24, 12)
    pool = pd.read_parquet(tmp_path / "pool.parquet")
    gold = datasets.Dataset.from_pandas(pd.read_parquet(tmp_path / "gold.parquet"), preserve_index=False)
    raw = cfg_dict(tmp_path, binary_prompt, {"local": False, "base_url": fake_teacher.base_url, "samples": 1})
    del raw["data"]["pool_path"], raw["data"]["gold_path"]
    first = api.annotate(raw, pool=pool, gold=gold, show_progress=False)
    inputs = sorted(p.name for p in (tmp_path / "runs" / "dag" / "inputs").iterdir())
    assert len(inputs) == 2 and inputs[0].startswith("gold-") and inputs[1].startswith("pool-")
    assert first["items"] == 24 and first["data_pool"]["path"].endswith(inputs[1])
    sent = len(fake_teacher.received)
    again = api.annotate(raw, pool=pool.copy(), gold=gold, show_progress=False)  # the same data: the same files
    assert sorted(p.name for p in (tmp_path / "runs" / "dag" / "inputs").iterdir()) == inputs
    assert len(fake_teacher.received) == sent and again["items"] == 24  # nothing asked twice

    async def params() -> list[dict]:
        async with get_client() as c:
            runs = await c.read_flow_runs(limit=200)
            return [r.parameters for r in runs]

    ours = [json.dumps(p, default=str) for p in asyncio.run(params())]
    ours = [b for b in ours if str(tmp_path) in b]  # the session's Prefect server holds other tests' runs too
    assert len(ours) == 2
    for blob in ours:  # what Prefect stored: the files' paths, never the rows
        assert len(blob) < 20_000 and "inputs/gold-" in blob and pool["text"].iloc[3] not in blob
