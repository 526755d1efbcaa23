"""A loopback fake OpenAI-compatible server that injects faults (a test double only).

Faults are chosen by markers in the item text, per attempt of the same request body:
  [429]      first attempt: 429 with Retry-After: 1
  [500]      first two attempts: 500 JSON error
  [502html]  first attempt: 502 with an HTML page
  [html200]  first attempt: 200 with an HTML page (must not be parsed as an answer)
  [slow]     first attempt: answers after ``slow_s`` (past the client timeout)
  [drop]     first attempt: connection dropped without a response
  [badjson]  first attempt: 200 with malformed JSON
  [offlabel] every attempt: answers "banana" (an invalid vote)
  [dead]     every attempt: 500 (the item must end explicitly failed)
  [401]      every attempt: 401 (not retryable: fails at once)
  [nousage]  every attempt: a normal answer without a ``usage`` object
  [billed500] first attempt: 500 whose body reports usage (a failed call the provider bills)
  [billedbad] first attempt: 200 with usage but no choices (an unusable answer the provider bills)
  [nologprobs] every attempt: no ``logprobs`` even when asked for them
  [unsure]   the answer's probability is 0.6 instead of 0.9
Otherwise it answers "positive" if the text contains "good", else "negative" (the model
named "contrarian" answers the opposite, to test votes across teachers). Asked for
``logprobs`` (completions: an int; chat: ``logprobs: true`` + ``top_logprobs``), it returns
them in the OpenAI format of that endpoint: the answer at probability 0.9 (0.6 with
[unsure]), the other label at the rest less 0.02, and a newline at 0.02.

It counts what it received and what it delivered (a response the client hung up on is
not delivered), so tests can check the client's request and token totals against it.
Run standalone for benchmarks: ``python -m tests.fake_openai --port P --latency 0.1``.

It also speaks OpenAI's Batch API (``/v1/files``, ``/v1/batches``): a batch moves
validating -> in_progress -> finalizing -> completed, one state per status poll (or stays
in_progress while ``hold_batches`` is set: a slow batch). Each line is answered as the
online endpoint would answer it, its [429]/[500]/[dead]/[401] faults becoming per-request
errors in the batch's error file. Markers that act on the whole batch, the first time a
line carrying them is in one: [batch_failed] (fails validation, no output), [batch_expired]
(expires; the lines without the marker are answered, the rest are not), [batch_cancelled].
``batch_lines`` counts each line body the fake answered or failed in a batch (a body
counted twice was paid twice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections import Counter
from typing import Any, Optional

from aiohttp import web

# prices for the fake's model names: every flow test prices its teacher like a real run
FAKE_PRICES = {
    "models": {
        "teacher": {"input_per_mtok": 1.0, "output_per_mtok": 2.0, "source": "test"},
        "contrarian": {"input_per_mtok": 3.0, "output_per_mtok": 6.0, "source": "test"},
    }
}


# what a request with reasoning_effort reports as hidden reasoning, per choice
REASONING_TOKENS = 25


def canonical(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, ensure_ascii=False)


def item_text(payload: dict[str, Any]) -> str:
    if "messages" in payload:
        return str(payload["messages"][-1]["content"])
    lines = str(payload.get("prompt", "")).rstrip().splitlines()
    return lines[-2] if len(lines) >= 2 else (lines[-1] if lines else "")


class FakeOpenAI:
    def __init__(
        self,
        latency_s: float = 0.0,
        slow_s: float = 3.0,
        fixed_answer: Optional[str] = None,
        count_tokens: Optional[Any] = None,
        hold_after: Optional[int] = None,
    ) -> None:
        # with hold_after, requests past that many wait until release(): a run held mid-annotation as long as a test
        # needs (not a fixed latency guessed long enough for a slow machine)
        self.hold_after = hold_after
        self.released = threading.Event()
        # the server's tokenizer: a callable on text; default about 4 characters per token
        self.count_tokens = count_tokens or (lambda text: len(text) // 4 + 1)
        self.billed_in = 0  # prompt tokens reported on billed failures (500 with usage)
        self.billed_out = 0
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.fixed_answer = fixed_answer
        self.received: list[str] = []  # canonical request bodies, in arrival order
        self.attempts: Counter = Counter()
        self.delivered_ok: Counter = Counter()  # canonical body -> 200 answers delivered
        self.statuses: Counter = Counter()
        self.tokens_in = 0
        self.tokens_out = 0
        self.auth_headers: list[str] = []
        # the Batch API
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_lines: Counter = Counter()  # line body -> times it was processed in a batch
        self.batch_marks: Counter = Counter()  # (marker, body) -> batches it has been in
        self.batch_tokens_in = 0
        self.batch_tokens_out = 0
        self.batches_created = 0
        self.hold_batches = threading.Event()  # set: batches stay in_progress until cleared
        # a provider's fixed-window request limit, told in OpenAI's x-ratelimit-* headers on every answer
        self.window_requests: Optional[int] = None
        self.window_s = 1.0
        self._window_start = 0.0
        self._window_used = 0
        self.lock = threading.Lock()
        self.port = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None

    def release(self) -> None:
        """Answer the requests held since ``hold_after`` (and every later one)."""
        self.released.set()

    # ------------------------------------------------------------------ app
    def _over_window(self) -> bool:
        """Count a request in the current window; True when it is past the window's limit (a 429)."""
        with self.lock:
            now = time.monotonic()
            if now - self._window_start >= self.window_s:
                self._window_start, self._window_used = now, 0
            self._window_used += 1
            return self._window_used > (self.window_requests or 0)

    async def _limit_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.window_requests is None or not request.path.endswith("completions"):
            return
        with self.lock:
            left = max(0, self.window_requests - self._window_used)
            reset = max(0.0, self.window_s - (time.monotonic() - self._window_start))
        response.headers["x-ratelimit-limit-requests"] = str(self.window_requests)
        response.headers["x-ratelimit-remaining-requests"] = str(left)
        response.headers["x-ratelimit-reset-requests"] = f"{reset * 1000:.0f}ms"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024 * 1024)  # batch input files: OpenAI takes up to 200 MB
        app.on_response_prepare.append(self._limit_headers)
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/files", self.upload_file)
        app.router.add_get("/v1/files", self.list_files)
        app.router.add_get("/v1/files/{fid}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{bid}", self.get_batch)
        app.router.add_get("/_stats", self.stats)
        return app

    async def stats(self, request: web.Request) -> web.Response:
        """What benchmarks read from a fake in another process."""
        with self.lock:
            return web.json_response(
                {
                    "received": len(self.received),
                    "tokens_in": self.tokens_in,
                    "tokens_out": self.tokens_out,
                    "batch_tokens_in": self.batch_tokens_in,
                    "batch_tokens_out": self.batch_tokens_out,
                    "batches_created": self.batches_created,
                    "batch_lines": sum(self.batch_lines.values()),
                    "batch_lines_distinct": len(self.batch_lines),
                    "batch_lines_twice": sum(1 for n in self.batch_lines.values() if n > 1),
                }
            )

    # ------------------------------------------------------------------ the Batch API
    def _new_file(self, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        fid = f"file-{len(self.files) + 1:06d}"
        f = {"id": fid, "object": "file", "bytes": len(data), "filename": filename, "purpose": purpose, "data": data}
        self.files[fid] = f
        return f

    @staticmethod
    def _public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in obj.items() if k not in ("data", "_polls")}

    async def upload_file(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        purpose = str(form.get("purpose", ""))
        if purpose != "batch" or upload is None or isinstance(upload, (str, bytes, bytearray)):
            return web.json_response({"error": {"message": "purpose=batch and a file are required"}}, status=400)
        data = upload.file.read()
        with self.lock:
            f = self._new_file(upload.filename or "upload.jsonl", purpose, data)
        return web.json_response(self._public(f))

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        with self.lock:
            data = [self._public(f) for f in self.files.values() if purpose in (None, f["purpose"])]
        return web.json_response({"object": "list", "data": data})

    async def file_content(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["fid"])
        if f is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=f["data"], content_type="application/jsonl")

    async def create_batch(self, request: web.Request) -> web.Response:
        body = await request.json()
        fid = body.get("input_file_id")
        if fid not in self.files:
            return web.json_response({"error": {"message": f"no file {fid}"}}, status=400)
        with self.lock:
            self.batches_created += 1
            bid = f"batch_{len(self.batches) + 1:06d}"
            n = sum(1 for line in self.files[fid]["data"].splitlines() if line.strip())
            b = {
                "id": bid,
                "object": "batch",
                "endpoint": body.get("endpoint"),
                "input_file_id": fid,
                "completion_window": body.get("completion_window"),
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "metadata": body.get("metadata") or {},
                "request_counts": {"total": n, "completed": 0, "failed": 0},
                "errors": None,
                "_polls": 0,
            }
            self.batches[bid] = b
        return web.json_response(self._public(b))

    async def list_batches(self, request: web.Request) -> web.Response:
        with self.lock:
            data = [self._public(b) for b in reversed(list(self.batches.values()))]  # newest first, as OpenAI
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in data]
            data = data[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", 20))
        return web.json_response({"object": "list", "data": data[:limit], "has_more": len(data) > limit})

    async def get_batch(self, request: web.Request) -> web.Response:
        b = self.batches.get(request.match_info["bid"])
        if b is None:
            return web.json_response({"error": {"message": "no such batch"}}, status=404)
        with self.lock:
            self._advance(b)
            return web.json_response(self._public(b))

    def _advance(self, b: dict[str, Any]) -> None:
        """One state further per poll; the lines are processed on the way into ``finalizing``."""
        st = b["status"]
        if st == "validating":
            lines = self._lines(b)
            for marker, status in (("[batch_failed]", "failed"), ("[batch_cancelled]", "cancelled")):
                marked = [ln for ln in lines if marker in item_text(ln["body"])]
                if marked and self._first_time(marker, marked):
                    b["status"] = status
                    if status == "failed":
                        b["errors"] = {"data": [{"code": "invalid_request", "message": "fake validation failure"}]}
                    return
            b["status"] = "in_progress"
        elif st == "in_progress" and not self.hold_batches.is_set():
            lines = self._lines(b)
            marked = [ln for ln in lines if "[batch_expired]" in item_text(ln["body"])]
            expire = bool(marked) and self._first_time("[batch_expired]", marked)
            todo = [ln for ln in lines if "[batch_expired]" not in item_text(ln["body"])] if expire else lines
            self._process(b, todo)
            b["status"] = "expired" if expire else "finalizing"
        elif st == "finalizing":
            b["status"] = "completed"

    def _lines(self, b: dict[str, Any]) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.files[b["input_file_id"]]["data"].splitlines() if x.strip()]

    def _first_time(self, marker: str, lines: list[dict[str, Any]]) -> bool:
        first = False
        for ln in lines:
            key = (marker, canonical(ln["body"]))
            self.batch_marks[key] += 1
            first = first or self.batch_marks[key] == 1
        return first

    def _process(self, b: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        out, err = [], []
        for ln in lines:
            payload = ln["body"]
            body = canonical(payload)
            self.batch_lines[body] += 1
            text = item_text(payload)
            fault = self._fault(text, self.batch_lines[body])
            rid = f"batch_req_{len(out) + len(err)}"
            if fault in ("429", "500", "dead", "401"):
                code = {"dead": 500}.get(fault, int(fault) if fault.isdigit() else 500)
                err.append(
                    {
                        "id": rid,
                        "custom_id": ln["custom_id"],
                        "response": {"status_code": code, "body": {"error": {"message": f"fake {fault}"}}},
                        "error": None,
                    }
                )
                continue
            resp = self._completion(payload, text)
            self.batch_tokens_in += resp["usage"]["prompt_tokens"]
            self.batch_tokens_out += resp["usage"]["completion_tokens"]
            self.tokens_in += resp["usage"]["prompt_tokens"]
            self.tokens_out += resp["usage"]["completion_tokens"]
            out.append(
                {"id": rid, "custom_id": ln["custom_id"], "response": {"status_code": 200, "body": resp}, "error": None}
            )
        b["request_counts"] = {"total": b["request_counts"]["total"], "completed": len(out), "failed": len(err)}
        if out:
            b["output_file_id"] = self._new_file("out.jsonl", "batch_output", _jsonl(out))["id"]
        if err:
            b["error_file_id"] = self._new_file("err.jsonl", "batch_output", _jsonl(err))["id"]

    def _choices(self, payload: dict[str, Any], text: str, n: int) -> list[dict[str, Any]]:
        """The n choices of an answer in the endpoint's format, with log-probabilities when asked (no faults)."""
        ans = self._answer(text, str(payload.get("model", "")))
        chat = "messages" in payload
        want_lp = bool(payload.get("logprobs")) and "[nologprobs]" not in text
        lp = fake_logprobs(ans, chat, 0.6 if "[unsure]" in text else 0.9) if want_lp else None
        if chat:
            message = {"role": "assistant", "content": ans.strip()}
            return [{"index": i, "message": message, "finish_reason": "stop", "logprobs": lp} for i in range(n)]
        return [{"index": i, "text": ans, "finish_reason": "stop", "logprobs": lp} for i in range(n)]

    def _completion(self, payload: dict[str, Any], text: str) -> dict[str, Any]:
        """The answer the online endpoint gives (no faults), with usage."""
        n = int(payload.get("n", 1) or 1)
        prompt = payload.get("prompt") or json.dumps(payload.get("messages"))
        pt, ct = self.count_tokens(prompt), 1 * n
        choices = self._choices(payload, text, n)
        chat = "messages" in payload
        return {
            "id": "x",
            "object": "chat.completion" if chat else "text_completion",
            "model": payload.get("model"),
            "choices": choices,
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def _answer(self, text: str, model: str = "") -> str:
        if self.fixed_answer is not None:
            return self.fixed_answer
        if "[offlabel]" in text:
            return " banana"
        good = "good" in text
        if model == "contrarian":
            good = not good
        return " positive" if good else " negative"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        payload = json.loads(raw)
        body = canonical(payload)
        with self.lock:
            self.received.append(body)
            self.attempts[body] += 1
            attempt = self.attempts[body]
            self.auth_headers.append(request.headers.get("Authorization", ""))
        text = item_text(payload)
        if self.hold_after is not None and len(self.received) > self.hold_after:
            while not self.released.is_set():
                await asyncio.sleep(0.05)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.window_requests is not None and self._over_window():
            return self._status(
                web.json_response(
                    {"error": {"message": "rate limit reached"}}, status=429, headers={"Retry-After": "1"}
                )
            )
        fault = self._fault(text, attempt)
        if fault == "429":
            return self._status(
                web.json_response({"error": {"message": "rate limited"}}, status=429, headers={"Retry-After": "1"})
            )
        if fault == "401":
            return self._status(web.json_response({"error": {"message": "bad key"}}, status=401))
        if fault in ("500", "dead"):
            return self._status(web.json_response({"error": {"message": "boom"}}, status=500))
        n = int(payload.get("n", 1) or 1)
        prompt = payload.get("prompt") or json.dumps(payload.get("messages"))
        pt, ct = self.count_tokens(prompt), 1 * n
        if fault == "billed500":
            with self.lock:
                self.billed_in += pt
                self.billed_out += ct
            return self._status(
                web.json_response(
                    {
                        "error": {"message": "overloaded after generating"},
                        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
                    },
                    status=500,
                )
            )
        if fault == "billedbad":
            with self.lock:
                self.billed_in += pt
                self.billed_out += ct
            return self._status(
                web.json_response(
                    {
                        "id": "x",
                        "choices": [],
                        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
                    }
                )
            )
        if fault == "502html":
            return self._status(
                web.Response(
                    status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>", content_type="text/html"
                )
            )
        if fault == "html200":
            return self._status(
                web.Response(status=200, text="<html><body>maintenance</body></html>", content_type="text/html")
            )
        if fault == "badjson":
            return self._status(
                web.Response(status=200, text='{"choices": [{"text": "posi', content_type="application/json")
            )
        if fault == "drop":
            assert request.transport is not None
            request.transport.abort()
            with self.lock:
                self.statuses["dropped"] += 1
            return web.Response(status=200)
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        choices = self._choices(payload, text, n)
        body_json: dict[str, Any] = {"id": "x", "object": "text_completion", "choices": choices}
        if "[nousage]" not in text:
            body_json["usage"] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
            if payload.get("reasoning_effort"):  # a reasoning model: hidden reasoning billed inside completion_tokens
                body_json["usage"]["completion_tokens"] = ct = ct + REASONING_TOKENS * n
                body_json["usage"]["total_tokens"] = pt + ct
                body_json["usage"]["completion_tokens_details"] = {"reasoning_tokens": REASONING_TOKENS * n}
        resp = web.json_response(body_json)
        if request.transport is None or request.transport.is_closing():
            with self.lock:
                self.statuses["client_gone"] += 1
            return resp
        with self.lock:
            self.delivered_ok[body] += 1
            if "usage" in body_json:
                self.tokens_in += pt
                self.tokens_out += ct
            self.statuses["200"] += 1
        return resp

    def _status(self, resp: web.Response) -> web.Response:
        with self.lock:
            self.statuses[str(resp.status) + ("html" if resp.content_type == "text/html" else "")] += 1
        return resp

    @staticmethod
    def _fault(text: str, attempt: int) -> Optional[str]:
        if "[dead]" in text:
            return "dead"
        if "[401]" in text:
            return "401"
        if "[500]" in text and attempt <= 2:
            return "500"
        for marker in ("429", "502html", "html200", "slow", "drop", "badjson", "billed500", "billedbad"):
            if f"[{marker}]" in text and attempt == 1:
                return marker
        return None

    # ------------------------------------------------------------- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)

            async def up() -> None:
                self._runner = web.AppRunner(self.app(), access_log=None)
                await self._runner.setup()
                site = web.TCPSite(self._runner, "127.0.0.1", 0)
                await site.start()
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                ready.set()

            self._loop.run_until_complete(up())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def down() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop = None

    def reset_counts(self) -> None:
        with self.lock:
            self.received.clear()
            self.delivered_ok.clear()
            self.statuses.clear()
            self.tokens_in = self.tokens_out = 0


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def fake_logprobs(answer: str, chat: bool, p: float) -> dict[str, Any]:
    """Log-probabilities of a one-token answer in the endpoint's OpenAI format (see the module docstring)."""
    import math

    other = {" positive": " negative", " negative": " positive"}.get(answer, " positive")
    if chat:
        answer, other = answer.strip(), other.strip()
    top = {answer: math.log(p), other: math.log(1 - p - 0.02), "\n": math.log(0.02)}
    if chat:
        return {
            "content": [
                {
                    "token": answer,
                    "logprob": top[answer],
                    "bytes": list(answer.encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top.items()],
                }
            ]
        }
    return {"tokens": [answer], "token_logprobs": [top[answer]], "top_logprobs": [top], "text_offset": [0]}


def lean_app(latency_s: float, answer: str) -> web.Application:
    """A fixed-latency server with no bookkeeping, for client benchmarks."""
    body = json.dumps(
        {
            "id": "x",
            "object": "text_completion",
            "created": 0,
            "model": "fake",
            "choices": [{"index": 0, "text": answer, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41},
        }
    ).encode()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(latency_s)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    app.router.add_post("/v1/chat/completions", handle)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--answer", default=" positive")
    ap.add_argument("--full", action="store_true", help="the whole fake (faults, bookkeeping, the Batch API)")
    a = ap.parse_args()
    if a.full:
        web.run_app(FakeOpenAI(latency_s=a.latency).app(), host="127.0.0.1", port=a.port, access_log=None, print=None)
        return
    web.run_app(lean_app(a.latency, a.answer), host="127.0.0.1", port=a.port, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
