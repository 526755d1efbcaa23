"""Persistent response cache and attempt ledger (sqlite in WAL mode).

Why: a run killed at any point and started again must re-send nothing that had already
succeeded, and no spend may go uncounted. Each successful answer is committed the moment
it arrives (WAL + synchronous=NORMAL survives a killed process), keyed by a hash of what
changes the answer: the endpoint, model, rendered prompt and sampling parameters (and,
for an ``n``-choice request, the choice's index). Nothing else is in the key: two samples
or two items that make the very same request share one answer, and the parser, the label
set and the aggregation are not in it, so re-parsing and re-aggregating cached answers
(their raw log-probabilities are stored with them) is free. Errors are never cached.
Every attempt, failed ones included, is written to the ledger with its status, latency
and the token usage it returned, so the bill can be reconciled.
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
  logprobs TEXT,
  model TEXT,
  max_tokens INTEGER,
  prompt_chars INTEGER,
  transport TEXT
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
  usage_source TEXT,
  max_tokens INTEGER,
  transport TEXT
);
CREATE INDEX IF NOT EXISTS attempts_run ON attempts(run_id);
"""
# The Batch API transport's own ledger (tasks/teacher/batch.py): every batch is written here before it is uploaded
# and submitted, so a run killed at any point finds what it had submitted and collects it instead of paying twice.
# In the same file as the answers: a batch's answers and its "collected" mark commit in one transaction.
BATCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_jobs (
  local_id TEXT PRIMARY KEY,     -- distill's name for the batch, also in its metadata at the provider
  endpoint TEXT NOT NULL,        -- the server's base URL
  url TEXT NOT NULL,             -- /v1/completions or /v1/chat/completions
  input_path TEXT NOT NULL,      -- the JSONL written before anything was uploaded
  n_requests INTEGER NOT NULL,
  reserved_usd REAL NOT NULL DEFAULT 0,  -- its worst-case cost, held against budget.max_usd until collected
  file_id TEXT,
  batch_id TEXT,
  state TEXT NOT NULL,           -- written, uploaded, submitted, the provider's status, then collected
  round INTEGER NOT NULL DEFAULT 1,
  run_id TEXT,
  created REAL NOT NULL,
  updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_requests (
  custom_id TEXT NOT NULL,       -- the request's first cache key
  local_id TEXT NOT NULL,
  keys TEXT NOT NULL,            -- every cache key the request answers (k with n)
  PRIMARY KEY (custom_id, local_id)
);
CREATE INDEX IF NOT EXISTS batch_requests_local ON batch_requests(local_id);
"""
# columns added after the first release; older cache files get them on open
MIGRATIONS = {
    "responses": [
        ("usage_source", "TEXT"),
        ("logprobs", "TEXT"),
        ("model", "TEXT"),
        ("max_tokens", "INTEGER"),
        ("prompt_chars", "INTEGER"),
        ("transport", "TEXT"),
    ],
    "attempts": [("model", "TEXT"), ("usage_source", "TEXT"), ("max_tokens", "INTEGER"), ("transport", "TEXT")],
}
# What ``model_history`` reads, kept up to date at insert: one row per (model, max_tokens) with
# the sums the plan's calibration needs. Without it the plan parsed every cached request's JSON
# (json_extract) to find one model's answers: seconds per 100,000 answers, on every plan.
# ``model``, ``max_tokens`` and ``prompt_chars`` are also stored on each answer, so an answer
# replaced by a newer one (INSERT OR REPLACE) can be taken out of the sums exactly.
# Version 3 of the file (``PRAGMA user_version``): the columns filled for rows written before
# and the table built from them, once, at the first open by this version. Version 4: the transport
# an answer or attempt went through (NULL, written before: online).
SCHEMA_VERSION = 4
HISTORY = """
CREATE TABLE IF NOT EXISTS history (
  model TEXT NOT NULL,           -- the request's model ('' + NUL when it had none)
  max_tokens INTEGER NOT NULL,   -- the request's max_tokens (-1 when it had none)
  ok_attempts INTEGER NOT NULL DEFAULT 0,
  latency_n INTEGER NOT NULL DEFAULT 0,
  latency_sum REAL NOT NULL DEFAULT 0,
  answers INTEGER NOT NULL DEFAULT 0,        -- answers whose usage was not estimated
  usage_n INTEGER NOT NULL DEFAULT 0,        -- of which with prompt tokens
  prompt_tokens INTEGER NOT NULL DEFAULT 0,
  prompt_chars INTEGER NOT NULL DEFAULT 0,   -- of the answers with prompt tokens
  completion_n INTEGER NOT NULL DEFAULT 0,   -- answers with completion tokens
  completion_tokens INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (model, max_tokens)
);
"""
NO_MODEL, NO_CAP = "\x00", -1
# one pass over the rows written by an older distill (once per file, at the first open by this version)
BACKFILL = """
UPDATE responses SET model = json_extract(request, '$.model'), max_tokens = json_extract(request, '$.max_tokens'),
  prompt_chars = COALESCE(LENGTH(json_extract(request, '$.prompt')),
    (SELECT SUM(LENGTH(json_extract(m.value, '$.content'))) FROM json_each(request, '$.messages') AS m))
  WHERE model IS NULL;
UPDATE attempts SET max_tokens = (SELECT r.max_tokens FROM responses r WHERE r.key = attempts.key)
  WHERE status = 'ok' AND max_tokens IS NULL;
DELETE FROM history;
INSERT INTO history(model, max_tokens, answers, usage_n, prompt_tokens, prompt_chars, completion_n, completion_tokens)
  SELECT COALESCE(model, char(0)), COALESCE(max_tokens, -1), COUNT(*), COUNT(prompt_tokens),
         COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(CASE WHEN prompt_tokens IS NOT NULL THEN prompt_chars END), 0),
         COUNT(completion_tokens),
         COALESCE(SUM(completion_tokens), 0)
  FROM responses WHERE COALESCE(usage_source, 'reported') != 'estimated' GROUP BY 1, 2;
INSERT INTO history(model, max_tokens, ok_attempts, latency_n, latency_sum)
  SELECT COALESCE(a.model, char(0)), COALESCE(r.max_tokens, -1), COUNT(*), COUNT(a.latency_s),
         COALESCE(SUM(a.latency_s), 0)
  FROM attempts a LEFT JOIN responses r ON r.key = a.key WHERE a.status = 'ok' GROUP BY 1, 2
  ON CONFLICT(model, max_tokens) DO UPDATE SET ok_attempts = excluded.ok_attempts, latency_n = excluded.latency_n,
    latency_sum = excluded.latency_sum;
"""
# indexes of a development version of this migration, replaced by the table
DROP_V2 = "DROP INDEX IF EXISTS responses_model; DROP INDEX IF EXISTS attempts_model;"
HISTORY_UPSERT = """
INSERT INTO history(model, max_tokens, ok_attempts, latency_n, latency_sum, answers, usage_n, prompt_tokens,
                    prompt_chars, completion_n, completion_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT(model, max_tokens) DO UPDATE SET ok_attempts = ok_attempts + excluded.ok_attempts,
  latency_n = latency_n + excluded.latency_n, latency_sum = latency_sum + excluded.latency_sum,
  answers = answers + excluded.answers, usage_n = usage_n + excluded.usage_n,
  prompt_tokens = prompt_tokens + excluded.prompt_tokens, prompt_chars = prompt_chars + excluded.prompt_chars,
  completion_n = completion_n + excluded.completion_n,
  completion_tokens = completion_tokens + excluded.completion_tokens
"""


def _group(model: Any, max_tokens: Any) -> tuple[Any, Any]:
    return (NO_MODEL if model is None else model, NO_CAP if max_tokens is None else max_tokens)


def _add_answer(
    sums: dict[tuple, list], model: Any, cap: Any, usage_source: Any, pt: Any, *, ct: Any, chars: Any, sign: int
) -> None:
    """Add (sign 1) or take out (sign -1) one answer's figures in ``sums`` (history's columns from ``answers`` on)."""
    if usage_source == "estimated":
        return
    s = sums.setdefault(_group(model, cap), [0, 0, 0.0, 0, 0, 0, 0, 0, 0])
    s[3] += sign
    if pt is not None:
        s[4] += sign
        s[5] += sign * pt
        s[6] += sign * (chars or 0)
    if ct is not None:
        s[7] += sign
        s[8] += sign * ct


def prompt_chars(request: dict[str, Any]) -> Optional[int]:
    """Characters of a request's prompt, as sqlite's LENGTH counts them (what the plan calibrates tokens on)."""

    def length(v: Any) -> Optional[int]:
        if v is None:
            return None
        return len(v) if isinstance(v, str) else len(_dumps(v))

    if request.get("prompt") is not None:
        return length(request["prompt"])
    msgs = request.get("messages")
    if not isinstance(msgs, list):
        return None
    parts = [length(m.get("content")) if isinstance(m, dict) else None for m in msgs]
    parts = [x for x in parts if x is not None]
    return sum(parts) if parts else None


def request_key(
    model: str, prompt: Any, sampling: dict[str, Any], choice: Optional[int] = None, endpoint: str = ""
) -> str:
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


_ENC = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


class KeyMaker:
    """:func:`request_key` for many prompts sent with the same model, sampling, choice and endpoint.

    The same hashes, several times faster: the document's constant members are serialised
    once, and only the prompt per call (``json.dumps`` with sorted keys writes the members in
    the order choice, endpoint, model, prompt, sampling; each member's text does not depend on
    the others). A plan over a million items computes a million keys.
    """

    def __init__(self, model: str, sampling: dict[str, Any], choice: Optional[int] = None, endpoint: str = "") -> None:
        head = "{"
        if choice is not None:
            head += '"choice":' + _ENC(choice) + ","
        if endpoint:
            head += '"endpoint":' + _ENC(endpoint) + ","
        self._head = head + '"model":' + _ENC(model) + ',"prompt":'
        self._tail = ',"sampling":' + _ENC(sampling) + "}"

    def __call__(self, prompt: Any) -> str:
        blob = self._head + _ENC(prompt) + self._tail
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class CachedAnswer:
    text: str
    finish_reason: Optional[str]
    prompt_tokens: Optional[int]
    completion_tokens: Optional[int]
    usage_source: Optional[str] = None  # "reported" by the server, "counted" or "estimated" by distill
    logprobs: Any = None  # the choice's raw ``logprobs`` object, as the server sent it
    transport: str = "online"  # how it was fetched: "batch" answers were billed at the provider's batch rate


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
        self.db.executescript(SCHEMA + HISTORY + BATCH_SCHEMA)
        if self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            self._migrate()
        self.autoflush = True
        self._resp: list[tuple] = []
        self._att: list[tuple] = []

    def _migrate(self) -> None:
        """Bring a file written by an older distill up to :data:`SCHEMA_VERSION` (columns, their values, indexes).

        In one write transaction, so two processes opening the same old file migrate it once;
        the answers themselves are never touched.
        """
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if self.db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                for table, cols in MIGRATIONS.items():
                    have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                    for name, typ in cols:
                        if name not in have:
                            self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {typ}")
                for stmt in (HISTORY + BACKFILL + DROP_V2).split(";"):  # executescript would commit
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def get(self, key: str) -> Optional[CachedAnswer]:
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[str]) -> dict[str, CachedAnswer]:
        out: dict[str, CachedAnswer] = {}
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            q = (
                "SELECT key, text, finish_reason, prompt_tokens, completion_tokens, usage_source, logprobs, transport"
                f" FROM responses WHERE key IN ({','.join('?' * len(part))})"
            )
            for k, text, fr, pt, ct, src, lp, tr in self.db.execute(q, part):
                out[k] = CachedAnswer(text, fr, pt, ct, src, _loads(lp) if lp else None, tr or "online")
        return out

    def has_many(self, keys: list[str]) -> set[str]:
        """Which of ``keys`` have an answer (the key index only: nothing parsed, for the plan)."""
        out: set[str] = set()
        for i in range(0, len(keys), 900):
            part = keys[i : i + 900]
            q = f"SELECT key FROM responses WHERE key IN ({','.join('?' * len(part))})"
            out.update(k for (k,) in self.db.execute(q, part))
        return out

    def put_success(
        self,
        entries: list[tuple[str, CachedAnswer]],
        request: dict[str, Any],
        run_id: str,
        *,
        attempt: int,
        http_status: int,
        latency_s: Optional[float],
        transport: str = "online",
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
        model, chars = request.get("model"), prompt_chars(request)
        cap = request.get("max_tokens", request.get("max_completion_tokens"))  # a reasoning model's cap
        self._resp.extend(
            (
                k,
                req_json,
                a.text,
                a.finish_reason,
                a.prompt_tokens,
                a.completion_tokens,
                now,
                a.usage_source,
                _dumps(a.logprobs) if a.logprobs is not None else None,
                model,
                cap,
                chars,
                transport,
            )
            for k, a in entries
        )
        self._att.append(
            (
                run_id,
                entries[0][0],
                attempt,
                "ok",
                http_status,
                latency_s,
                first.prompt_tokens,
                first.completion_tokens,
                None,
                now,
                model,
                first.usage_source,
                cap,
                transport,
            )
        )
        if self.autoflush:
            self.flush()

    def put_attempt(  # noqa: PLR0913  (one ledger row: each argument is a column)
        self,
        key: str,
        run_id: str,
        attempt: int,
        *,
        status: str,
        http_status: Optional[int],
        latency_s: float,
        prompt_tokens: Optional[int],
        completion_tokens: Optional[int],
        error: Optional[str],
        model: Optional[str] = None,
        transport: str = "online",
    ) -> None:
        """Record a failed attempt (never cached as an answer), with any usage it reported."""
        source = "reported" if prompt_tokens is not None or completion_tokens is not None else None
        self._att.append(
            (
                run_id,
                key,
                attempt,
                status,
                http_status,
                latency_s,
                prompt_tokens,
                completion_tokens,
                (error or "")[:500],
                time.time(),
                model,
                source,
                None,
                transport,
            )
        )
        if self.autoflush:
            self.flush()

    def flush(self, also: tuple[tuple[str, tuple], ...] = ()) -> None:
        """Commit everything queued in one transaction, the history's sums with it.

        ``also``: statements committed in the same transaction (a batch's "collected" mark
        with its answers, so a kill between the two cannot happen).
        """
        if not self._resp and not self._att and not also:
            return
        resp, att = self._resp, self._att
        self._resp, self._att = [], []
        with self.db:
            # IMMEDIATE: the write lock first, so an answer found below is the one this transaction replaces
            self.db.execute("BEGIN IMMEDIATE")
            sums: dict[tuple, list] = {}
            if resp:
                self._put_answers(resp, sums)
            if att:
                self.db.executemany(
                    "INSERT INTO attempts(run_id,key,attempt,status,http_status,latency_s,prompt_tokens,"
                    "completion_tokens,error,created,model,usage_source,max_tokens,transport)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    att,
                )
                for a in att:
                    if a[3] == "ok":
                        g = sums.setdefault(_group(a[10], a[12]), [0, 0, 0.0, 0, 0, 0, 0, 0, 0])
                        g[0] += 1
                        if a[5] is not None:
                            g[1] += 1
                            g[2] += a[5]
            if sums:
                self.db.executemany(HISTORY_UPSERT, [(*g, *v) for g, v in sums.items()])
            for sql, args in also:
                self.db.execute(sql, args)

    def _put_answers(self, resp: list[tuple], sums: dict[tuple, list]) -> None:
        """Insert answers, replacing any of the same key (the newest wins), and add them to the history's sums.

        Each is inserted unless its key exists (the usual case: no extra lookup); the few whose
        key had an answer are taken out of the sums with their old figures and replaced.
        """
        cols = (
            "INTO responses(key,request,text,finish_reason,prompt_tokens,completion_tokens,created,usage_source,"
            "logprobs,model,max_tokens,prompt_chars,transport) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
        )
        last = {r[0]: r for r in resp}  # a key queued twice: the later row is the one that stays
        clash = []
        for r in last.values():
            if self.db.execute("INSERT OR IGNORE " + cols, r).rowcount == 0:
                clash.append(r)
            _add_answer(sums, r[9], r[10], r[7], r[4], ct=r[5], chars=r[11], sign=1)
        for r in clash:
            old = self.db.execute(
                "SELECT model, max_tokens, usage_source, prompt_tokens, completion_tokens, prompt_chars"
                " FROM responses WHERE key=?",
                (r[0],),
            ).fetchone()
            if old is not None:
                _add_answer(sums, *old[:4], ct=old[4], chars=old[5], sign=-1)
            self.db.execute("INSERT OR REPLACE " + cols, r)

    def ledger_totals(self, run_id: str) -> dict[str, int]:
        self.flush()
        row = self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(status='ok'),0), COALESCE(SUM(prompt_tokens),0), "
            "COALESCE(SUM(completion_tokens),0)"
            " FROM attempts WHERE run_id=?",
            (run_id,),
        ).fetchone()
        return {"attempts": row[0], "ok": row[1], "tokens_in": row[2], "tokens_out": row[3]}

    def ledger_usage(self, run_id: str) -> list[dict[str, Any]]:
        """Attempts of a run grouped by model, outcome and where their usage came from (for pricing)."""
        self.flush()
        rows = self.db.execute(
            "SELECT model, status='ok', usage_source, COUNT(*), COALESCE(SUM(prompt_tokens),0),"
            " COALESCE(SUM(completion_tokens),0), COALESCE(SUM(latency_s),0) FROM attempts WHERE run_id=?"
            " GROUP BY 1,2,3",
            (run_id,),
        ).fetchall()
        return [
            {
                "model": m,
                "ok": bool(ok),
                "usage_source": src,
                "attempts": n,
                "tokens_in": pt,
                "tokens_out": ct,
                "latency_s": lat,
            }
            for m, ok, src, n, pt, ct, lat in rows
        ]

    def model_history(self, model: str, max_tokens: int | None = None) -> dict[str, Any]:
        """What earlier runs measured for ``model``: mean latency, prompt tokens per character, completion tokens.

        The plan uses it to calibrate its estimates once a model has answered before. With
        ``max_tokens`` only requests sent with that cap count: one-word labels and 60-token
        summaries from the same model differ twentyfold in answer length and latency, and a plan
        for one must not be calibrated on the other.

        Read from the ``history`` table kept at insert (a few rows, whatever the cache's size),
        where :func:`model_history_scan` (the same figures) parses every cached request's JSON.
        """
        self.flush()
        cap = "" if max_tokens is None else " AND max_tokens=?"
        args: tuple[Any, ...] = (model,) if max_tokens is None else (model, max_tokens)
        (ok, lat_n, lat_sum, answers, usage_n, pt, chars, ct_n, ct) = self.db.execute(
            "SELECT COALESCE(SUM(ok_attempts),0), COALESCE(SUM(latency_n),0), SUM(latency_sum), "
            "COALESCE(SUM(answers),0),"
            " COALESCE(SUM(usage_n),0), SUM(prompt_tokens), SUM(prompt_chars), COALESCE(SUM(completion_n),0),"
            " SUM(completion_tokens) FROM history WHERE model=?" + cap,
            args,
        ).fetchone()
        lat = (ok, lat_sum / lat_n if lat_n else None)
        tok = (
            answers,
            pt if usage_n else None,
            chars if usage_n else None,
            ct * 1.0 / answers if ct_n and answers else None,
            usage_n,
        )
        return _history(lat, tok)

    def close(self) -> None:
        self.flush()
        self.db.close()


def _history(lat: tuple, tok: tuple) -> dict[str, Any]:
    return {
        "latency_n": lat[0],
        "latency_s": lat[1],
        "usage_n": tok[4] or 0,
        "tokens_per_char": (tok[1] / tok[2]) if tok[4] and tok[2] else None,
        "completion_tokens": tok[3] if tok[4] else None,
    }


def model_history_scan(db: sqlite3.Connection, model: str, max_tokens: int | None = None) -> dict[str, Any]:
    """:meth:`ResponseCache.model_history` computed the way it was before the indexed columns.

    It parses every cached request's JSON (json_extract), so it takes time in proportion to
    the whole cache; kept as the reference the indexed figures are checked against (tests,
    bench/million.py).
    """
    cap = "" if max_tokens is None else " AND json_extract(r.request,'$.max_tokens')=?"
    args: tuple[Any, ...] = (model,) if max_tokens is None else (model, max_tokens)
    if max_tokens is None:
        lat = db.execute(
            "SELECT COUNT(*), AVG(latency_s) FROM attempts WHERE model=? AND status='ok'", (model,)
        ).fetchone()
    else:
        lat = db.execute(
            "SELECT COUNT(*), AVG(a.latency_s) FROM attempts a JOIN responses r ON r.key=a.key"
            " WHERE a.model=? AND a.status='ok'" + cap,
            args,
        ).fetchone()
    tok = db.execute(
        "SELECT COUNT(*), SUM(prompt_tokens),"
        " SUM(CASE WHEN prompt_tokens IS NOT NULL THEN COALESCE(LENGTH(json_extract(request,'$.prompt')),"
        "   (SELECT SUM(LENGTH(json_extract(m.value,'$.content'))) FROM json_each(request,'$.messages') AS m)) END),"
        " SUM(completion_tokens) * 1.0 / COUNT(*), SUM(prompt_tokens IS NOT NULL)"
        " FROM responses r WHERE json_extract(request,'$.model')=? AND COALESCE(usage_source,'reported') != 'estimated'"
        + cap,
        args,
    ).fetchone()
    return _history(lat, tok)
