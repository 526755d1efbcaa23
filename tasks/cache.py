"""Persistent response cache and attempt ledger (sqlite in WAL mode).

Why: a run killed at any point and started again must re-send nothing that had already
succeeded, and no spend may go uncounted. Each successful answer is committed the moment
it arrives (WAL + synchronous=NORMAL survives a killed process), keyed by a hash of what
changes the answer: the endpoint, model, rendered prompt and sampling parameters (and,
for an ``n``-choice request, the choice's index). Nothing else is in the key: two samples
or two items that make the very same request share one answer, and the parser, the label
set and the aggregation are not in it, so re-parsing and re-aggregating cached answers
(their raw log-probabilities are stored with them) is free. Errors are never cached. Every attempt, failed ones included, is written to the ledger with its status,
latency and the token usage it returned, so the bill can be reconciled.
API keys never reach this file: only request bodies are stored, never headers.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

try:  # orjson ships with prefect; it is several times faster than json for the request column
    import orjson

    def _dumps(obj: Any) -> str:
        return orjson.dumps(obj).decode()

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    def _dumps(obj: Any) -> str:
        return json.dumps(obj, ensure_ascii=False)

    _loads = json.loads

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
  key TEXT PRIMARY KEY,
  request TEXT NOT NULL,
  text TEXT NOT NULL,
  finish_reason TEXT,
  prompt_tokens INTEGER,
  completion_tokens INTEGER,
  created REAL NOT NULL,
  usage_source TEXT,
  logprobs TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  run_id TEXT,
  key TEXT NOT NULL,
  attempt INTEGER NOT NULL,
  status TEXT NOT NULL,
  http_status INTEGER,
  latency_s REAL,
  prompt_tokens INTEGER,
  completion_tokens INTEGER,
  error TEXT,
  created REAL NOT NULL,
  model TEXT,
  usage_source TEXT
);
CREATE INDEX IF NOT EXISTS attempts_run ON attempts(run_id);
"""
# columns added after the first release; older cache files get them on open
MIGRATIONS = {"responses": [("usage_source", "TEXT"), ("logprobs", "TEXT")], "attempts": [("model", "TEXT"), ("usage_source", "TEXT")]}


def request_key(model: str, prompt: Any, sampling: dict[str, Any], choice: Optional[int] = None,
                endpoint: str = "") -> str:
    """Hash of everything that changes the teacher's answer (never the parser, never secrets).

    ``choice`` is the index of one of the ``n`` choices of a single request; a request for
    one answer has none, so identical requests have identical keys and are sent once.
    ``endpoint`` names the server behind the model (see ``annotate.endpoint_identity``).
    """
    doc: dict[str, Any] = {"model": model, "prompt": prompt, "sampling": sampling}
    if choice is not None:
        doc["choice"] = choice
    if endpoint:
        doc["endpoint"] = endpoint
    blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class CachedAnswer:
    text: str
    finish_reason: Optional[str]
    prompt_tokens: Optional[int]
    completion_tokens: Optional[int]
    usage_source: Optional[str] = None  # "reported" by the server, "counted" or "estimated" by distill
    logprobs: Any = None  # the choice's raw ``logprobs`` object, as the server sent it


class ResponseCache:
    """sqlite-backed cache of successful answers plus a ledger of every attempt."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.executescript(SCHEMA)
        for table, cols in MIGRATIONS.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, typ in cols:
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {typ}")
        self.autoflush = True
        self._resp: list[tuple] = []
        self._att: list[tuple] = []

    def get(self, key: str) -> Optional[CachedAnswer]:
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[str]) -> dict[str, CachedAnswer]:
        out: dict[str, CachedAnswer] = {}
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            q = ("SELECT key, text, finish_reason, prompt_tokens, completion_tokens, usage_source, logprobs FROM responses"
                 " WHERE key IN (%s)" % ",".join("?" * len(part)))
            for k, text, fr, pt, ct, src, lp in self.db.execute(q, part):
                out[k] = CachedAnswer(text, fr, pt, ct, src, _loads(lp) if lp else None)
        return out

    def put_success(
        self, entries: list[tuple[str, CachedAnswer]], request: dict[str, Any], run_id: str, attempt: int,
        http_status: int, latency_s: float,
    ) -> None:
        """Queue the answer(s) of one request and its attempt; written at the next :meth:`flush`.

        ``entries`` has one (key, answer) per choice; the usage sits on the first one. With
        ``autoflush`` (the default) the write is committed before this returns; the async
        client instead flushes once per event-loop turn, so a burst of answers costs one
        transaction and none waits longer than the current turn.
        """
        now = time.time()
        req_json = _dumps(request)
        first = entries[0][1]
        self._resp.extend((k, req_json, a.text, a.finish_reason, a.prompt_tokens, a.completion_tokens, now,
                           a.usage_source, _dumps(a.logprobs) if a.logprobs is not None else None) for k, a in entries)
        self._att.append((run_id, entries[0][0], attempt, "ok", http_status, latency_s, first.prompt_tokens,
                          first.completion_tokens, None, now, request.get("model"), first.usage_source))
        if self.autoflush:
            self.flush()

    def put_attempt(
        self, key: str, run_id: str, attempt: int, status: str, http_status: Optional[int], latency_s: float,
        prompt_tokens: Optional[int], completion_tokens: Optional[int], error: Optional[str],
        model: Optional[str] = None,
    ) -> None:
        """Record a failed attempt (never cached as an answer), with any usage it reported."""
        source = "reported" if prompt_tokens is not None or completion_tokens is not None else None
        self._att.append((run_id, key, attempt, status, http_status, latency_s, prompt_tokens, completion_tokens,
                          (error or "")[:500], time.time(), model, source))
        if self.autoflush:
            self.flush()

    def flush(self) -> None:
        """Commit everything queued in one transaction."""
        if not self._resp and not self._att:
            return
        resp, att = self._resp, self._att
        self._resp, self._att = [], []
        with self.db:
            self.db.execute("BEGIN")
            if resp:
                self.db.executemany(
                    "INSERT OR REPLACE INTO responses(key,request,text,finish_reason,prompt_tokens,completion_tokens,"
                    "created,usage_source,logprobs) VALUES (?,?,?,?,?,?,?,?,?)", resp)
            if att:
                self.db.executemany(
                    "INSERT INTO attempts(run_id,key,attempt,status,http_status,latency_s,prompt_tokens,"
                    "completion_tokens,error,created,model,usage_source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", att)

    def ledger_totals(self, run_id: str) -> dict[str, int]:
        self.flush()
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(status='ok'),0), COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0)"
            " FROM attempts WHERE run_id=?", (run_id,),
        ).fetchone()
        return {"attempts": row[0], "ok": row[1], "tokens_in": row[2], "tokens_out": row[3]}

    def ledger_usage(self, run_id: str) -> list[dict[str, Any]]:
        """Attempts of a run grouped by model, outcome and where their usage came from (for pricing)."""
        self.flush()
        rows = self.db.execute(
            "SELECT model, status='ok', usage_source, COUNT(*), COALESCE(SUM(prompt_tokens),0),"
            " COALESCE(SUM(completion_tokens),0), COALESCE(SUM(latency_s),0) FROM attempts WHERE run_id=?"
            " GROUP BY 1,2,3", (run_id,),
        ).fetchall()
        return [{"model": m, "ok": bool(ok), "usage_source": src, "attempts": n, "tokens_in": pt, "tokens_out": ct,
                 "latency_s": lat} for m, ok, src, n, pt, ct, lat in rows]

    def model_history(self, model: str, max_tokens: int | None = None) -> dict[str, Any]:
        """What earlier runs measured for ``model``: mean latency, prompt tokens per character, completion tokens.

        The plan uses it to calibrate its estimates once a model has answered before. With
        ``max_tokens`` only requests sent with that cap count: one-word labels and 60-token
        summaries from the same model differ twentyfold in answer length and latency, and a plan
        for one must not be calibrated on the other.
        """
        self.flush()
        cap = "" if max_tokens is None else " AND json_extract(r.request,'$.max_tokens')=?"
        args: tuple[Any, ...] = (model,) if max_tokens is None else (model, max_tokens)
        if max_tokens is None:
            lat = self.db.execute(
                "SELECT COUNT(*), AVG(latency_s) FROM attempts WHERE model=? AND status='ok'", (model,)).fetchone()
        else:
            lat = self.db.execute(
                "SELECT COUNT(*), AVG(a.latency_s) FROM attempts a JOIN responses r ON r.key=a.key"
                " WHERE a.model=? AND a.status='ok'" + cap, args).fetchone()
        # per answer: with `n`, usage sits on a request's first choice and the others carry none,
        # so completion tokens are summed over all of the model's answers and divided by their number
        tok = self.db.execute(
            "SELECT COUNT(*), SUM(prompt_tokens),"
            " SUM(CASE WHEN prompt_tokens IS NOT NULL THEN COALESCE(LENGTH(json_extract(request,'$.prompt')),"
            "   (SELECT SUM(LENGTH(json_extract(m.value,'$.content'))) FROM json_each(request,'$.messages') AS m)) END),"
            " SUM(completion_tokens) * 1.0 / COUNT(*), SUM(prompt_tokens IS NOT NULL)"
            " FROM responses r WHERE json_extract(request,'$.model')=? AND COALESCE(usage_source,'reported') != 'estimated'"
            + cap, args).fetchone()
        return {"latency_n": lat[0], "latency_s": lat[1], "usage_n": tok[4] or 0,
                "tokens_per_char": (tok[1] / tok[2]) if tok[4] and tok[2] else None,
                "completion_tokens": tok[3] if tok[4] else None}

    def close(self) -> None:
        self.flush()
        self.db.close()
