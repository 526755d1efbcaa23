"""A fast loopback fake teacher for load benchmarks (bench/million.py): raw asyncio HTTP/1.1, keep-alive.

aiohttp's server costs more CPU per request than distill's client does; on a 2-core machine
the fake would then be what is measured. This one parses just enough HTTP (request line,
Content-Length, keep-alive) to answer ``POST /v1/completions`` and ``/v1/chat/completions``
with a canned OpenAI body (usage and log-probabilities included, as the real fake sends),
" positive" when the item text says "good item", else " negative".

It counts what it receives, per *phase* (``GET /phase?name=X`` starts one and returns the
previous phase's figures; ``GET /stats`` returns the current ones, ``GET /received`` only the
count, cheap enough to poll), and how many request bodies of the current phase it had already
received in an earlier phase (``resent``):
a restarted run must re-send nothing that had been answered and committed. Bodies are
remembered as 8-byte hashes (numpy arrays), so a million requests cost 8 MB here.
``/phase?name=X&forget=1`` also forgets the earlier phases (a new comparison starts).

    python bench/fast_teacher.py --port P [--latency 0]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import importlib.util
import json
import math
import os
import signal
import time
from typing import Any, Optional

import numpy as np


def _lp(answer: str, chat: bool) -> dict[str, Any]:
    other = " negative" if answer == " positive" else " positive"
    if chat:
        answer, other = answer.strip(), other.strip()
    top = {answer: math.log(0.9), other: math.log(0.08), "\n": math.log(0.02)}
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


def _body(answer: str, chat: bool) -> bytes:
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": answer.strip()},
            "finish_reason": "stop",
            "logprobs": _lp(answer, True),
        }
    else:
        choice = {"index": 0, "text": answer, "finish_reason": "stop", "logprobs": _lp(answer, False)}
    return json.dumps(
        {
            "id": "x",
            "object": "text_completion",
            "created": 0,
            "model": "teacher",
            "choices": [choice],
            "usage": {"prompt_tokens": 60, "completion_tokens": 1, "total_tokens": 61},
        }
    ).encode()


def _response(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode() + body


CANNED = {
    (chat, good): _response(_body(" positive" if good else " negative", chat))
    for chat in (False, True)
    for good in (False, True)
}


class Counts:
    def __init__(self) -> None:
        self.phase = "start"
        self.received = 0
        self.resent = 0
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self.earlier = np.empty(0, dtype=np.uint64)  # sorted hashes of bodies of earlier phases
        self.current: list[int] = []

    def add(self, body: bytes) -> None:
        now = time.monotonic()
        self.received += 1
        self.t_first = self.t_first or now
        self.t_last = now
        h = int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "little")
        self.current.append(h)

    def figures(self) -> dict[str, Any]:
        cur = np.array(self.current, dtype=np.uint64)
        resent = int(np.isin(cur, self.earlier).sum()) if len(self.earlier) and len(cur) else 0
        span = (self.t_last - self.t_first) if self.t_first and self.t_last else 0.0
        return {
            "phase": self.phase,
            "received": self.received,
            "distinct": int(len(np.unique(cur))),
            "resent_from_earlier_phases": resent,
            "seconds": span,
            "rps": self.received / span if span > 0 else None,
        }

    def new_phase(self, name: str, forget: bool = False) -> dict[str, Any]:
        out = self.figures()
        if forget:
            self.earlier = np.empty(0, dtype=np.uint64)
        elif self.current:
            self.earlier = np.union1d(self.earlier, np.array(self.current, dtype=np.uint64))
        self.phase, self.received, self.current = name, 0, []
        self.t_first = self.t_last = None
        return out


class Proto(asyncio.Protocol):
    def __init__(self, counts: Counts, latency: float) -> None:
        self.counts = counts
        self.latency = latency
        self.buf = b""
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self.handle(head.split(" ", 2), body)

    def handle(self, line: list[str], body: bytes) -> None:
        method, target = line[0], line[1] if len(line) > 1 else "/"
        assert self.transport is not None
        if method == "POST" and target.endswith("/completions"):
            self.counts.add(body)
            reply = CANNED[(target.endswith("/chat/completions"), b"good item" in body)]
            if self.latency:
                asyncio.get_running_loop().call_later(self.latency, self._write, reply)
            else:
                self.transport.write(reply)
            return
        if target.startswith("/phase"):
            from urllib.parse import parse_qs, urlsplit

            q = parse_qs(urlsplit(target).query)
            name, forget = q.get("name", ["unnamed"])[0], q.get("forget", ["0"])[0] == "1"
            self.transport.write(_response(json.dumps(self.counts.new_phase(name, forget)).encode()))
        elif target.startswith("/received"):  # cheap, for polling: /stats sorts every hash of the phase
            self.transport.write(_response(json.dumps({"received": self.counts.received}).encode()))
        elif target.startswith("/stats"):
            self.transport.write(_response(json.dumps(self.counts.figures()).encode()))
        elif target.startswith("/v1/models"):
            self.transport.write(_response(b'{"object":"list","data":[{"id":"teacher","object":"model"}]}'))
        else:
            self.transport.write(_response(b'{"error":{"message":"not found"}}', "404 Not Found"))

    def _write(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(reply)


async def serve(port: int, latency: float) -> None:
    counts = Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Proto(counts, latency), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.0)
    a = ap.parse_args()
    if importlib.util.find_spec("uvloop") is not None:  # faster when present; not required (nor pinned)
        importlib.import_module("uvloop").install()
    print(f"fast teacher on 127.0.0.1:{a.port} pid {os.getpid()}", flush=True)
    asyncio.run(serve(a.port, a.latency))


if __name__ == "__main__":
    main()
