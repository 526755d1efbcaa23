"""The provider's Batch API (OpenAI's ``/v1/files`` + ``/v1/batches``) and distill's ledger of its batches.

Why apart from the transport's loop (tasks/teacher/batch.py): these are the two things a
crash must not lose. The ledger lives in the response cache's sqlite file and records a
batch *before* it is uploaded and submitted (its JSONL written to disk, its requests
listed), and each step after; every batch carries distill's ``local_id`` in its
metadata, so a run killed between "submitted" and "recorded" finds its batch at the
provider instead of submitting it again. The HTTP calls retry on 429, 5xx and dropped
connections like a request does; what they send is the body only, never the key.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import aiohttp

from distill.config import ClientConfig
from tasks.teacher.cache import ResponseCache
from tasks.teacher.client import TeacherRequest
from tasks.teacher.responses import RETRYABLE_STATUS, backoff_delay, parse_retry_after, redact, snippet

# the provider's states after which a batch changes no more
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# how far back distill looks for a batch it may have created before it could record the id
FIND_PAGES = 20


class BatchAPIError(RuntimeError):
    """A Batch API call failed for good; the message names the call and the status, never the key."""


@dataclass
class BatchJob:
    """One batch as the ledger knows it (see tasks/teacher/cache.py BATCH_SCHEMA)."""

    local_id: str
    endpoint: str
    url: str
    input_path: str
    n_requests: int
    reserved_usd: float
    file_id: Optional[str]
    batch_id: Optional[str]
    state: str
    round: int


_JOB_COLS = "local_id, endpoint, url, input_path, n_requests, reserved_usd, file_id, batch_id, state, round"


class BatchLedger:
    """The batches of an endpoint, in the response cache's file."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache
        self.db = cache.db

    def open_jobs(self, endpoint: str) -> list[BatchJob]:
        """Batches not yet collected (written, uploaded, submitted or still running at the provider)."""
        rows = self.db.execute(
            f"SELECT {_JOB_COLS} FROM batch_jobs WHERE endpoint=? AND state != 'collected' ORDER BY created",
            (endpoint,),
        ).fetchall()
        return [BatchJob(*r) for r in rows]

    def requests_of(self, local_id: str) -> dict[str, list[str]]:
        """custom_id -> the cache keys that request answers."""
        rows = self.db.execute("SELECT custom_id, keys FROM batch_requests WHERE local_id=?", (local_id,))
        return {cid: json.loads(keys) for cid, keys in rows}

    def record(self, job: BatchJob, requests: list[TeacherRequest], run_id: str) -> None:
        """The batch and its requests, in one transaction, before anything is uploaded."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                f"INSERT INTO batch_jobs({_JOB_COLS}, run_id, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job.local_id,
                    job.endpoint,
                    job.url,
                    job.input_path,
                    job.n_requests,
                    job.reserved_usd,
                    job.file_id,
                    job.batch_id,
                    job.state,
                    job.round,
                    run_id,
                    now,
                    now,
                ),
            )
            self.db.executemany(
                "INSERT INTO batch_requests(custom_id, local_id, keys) VALUES (?,?,?)",
                [(r.keys[0], job.local_id, json.dumps(r.keys)) for r in requests],
            )

    def update(self, job: BatchJob, **fields: Any) -> None:
        for k, v in fields.items():
            setattr(job, k, v)
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.db:
            self.db.execute(
                f"UPDATE batch_jobs SET {sets}, updated=? WHERE local_id=?",
                (*fields.values(), time.time(), job.local_id),
            )

    @staticmethod
    def collected(job: BatchJob) -> tuple[str, tuple]:
        """The statement that marks ``job`` collected, for the transaction that writes its answers."""
        return ("UPDATE batch_jobs SET state='collected', updated=? WHERE local_id=?", (time.time(), job.local_id))


def write_input(path: Path, lines: list[bytes]) -> None:
    """The batch's JSONL input (lines of :func:`input_line`), written atomically: a temp file renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.writelines(lines)
    tmp.replace(path)


def input_line(r: TeacherRequest) -> bytes:
    """One request as a line of the provider's batch input; ``custom_id`` is its first cache key."""
    doc = {"custom_id": r.keys[0], "method": "POST", "url": "/v1" + r.path, "body": r.payload}
    return (json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def read_lines(data: bytes) -> list[dict[str, Any]]:
    """JSONL to dicts; a line that is not JSON is skipped here and counted by the caller as unanswered."""
    out = []
    for line in data.splitlines():
        if line.strip():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
    return out


class BatchAPI:
    """The calls of OpenAI's Batch API, each retried on 429, 5xx and dropped connections."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        settings: ClientConfig,
        *,
        api_key: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self.api_key = api_key
        self._rng = random.Random(seed)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        form: Optional[Callable[[], aiohttp.FormData]] = None,  # built per attempt: a sent FormData is spent
        params: Optional[dict[str, str]] = None,
        raw: bool = False,
    ) -> Any:
        s = self.settings
        last = ""
        for attempt in range(1, s.max_attempts + 1):
            retry_after = None
            try:
                async with self.session.request(
                    method, self.base_url + path, json=json_body, data=form() if form else None, params=params
                ) as resp:
                    status, body = resp.status, await resp.read()
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                if status == 200:
                    return body if raw else json.loads(body)
                last = f"HTTP {status}: {snippet(body, 300)!r}"
                if status == 413:
                    last += " (the batch file is larger than the provider takes: lower teacher.batch.max_bytes)"
                if status not in RETRYABLE_STATUS and status < 500:
                    break
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            if attempt < s.max_attempts:
                await asyncio.sleep(backoff_delay(attempt, s.backoff_base_s, s.backoff_max_s, retry_after, self._rng))
        raise BatchAPIError(redact(f"Batch API {method} {path} failed: {last}", [self.api_key or ""]))

    async def upload(self, path: Path) -> str:
        """Upload a batch input file (purpose ``batch``); its id."""
        data = path.read_bytes()

        def form() -> aiohttp.FormData:
            f = aiohttp.FormData()
            f.add_field("purpose", "batch")
            f.add_field("file", data, filename=path.name, content_type="application/jsonl")
            return f

        return str((await self._call("POST", "/files", form=form))["id"])

    async def find_file(self, filename: str) -> Optional[str]:
        """An uploaded batch file of this name (a run killed between upload and record), or None."""
        listing = await self._call("GET", "/files", params={"purpose": "batch"})
        for f in listing.get("data") or []:
            if isinstance(f, dict) and f.get("filename") == filename:
                return str(f["id"])
        return None

    async def create(self, file_id: str, url: str, window: str, local_id: str) -> dict[str, Any]:
        body = {
            "input_file_id": file_id,
            "endpoint": url,
            "completion_window": window,
            "metadata": {"distill_local_id": local_id},
        }
        return await self._call("POST", "/batches", json_body=body)

    async def find_batch(self, local_id: str) -> Optional[dict[str, Any]]:
        """The batch distill created as ``local_id`` (from its metadata), if the provider has one."""
        after: Optional[str] = None
        for _ in range(FIND_PAGES):
            params = {"limit": "100", **({"after": after} if after else {})}
            page = await self._call("GET", "/batches", params=params)
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for b in data:
                if (b.get("metadata") or {}).get("distill_local_id") == local_id:
                    return b
            if not page.get("has_more") or not data:
                return None
            after = str(data[-1]["id"])
        return None

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/batches/{batch_id}")

    async def content(self, file_id: str) -> bytes:
        return await self._call("GET", f"/files/{file_id}/content", raw=True)
