"""What an OpenAI-compatible server's answer means: choices and usage, the model that answered, errors.

Why apart from the client: these are pure functions of a response (body, headers, status)
that decide whether it is an answer, an unusable 200, a context error that will never
succeed, or a failure worth another attempt; the client's retry loop only acts on them.
"""

from __future__ import annotations

import email.utils
import random
import re
import time
from collections.abc import Iterable
from typing import Any, Optional

from tasks.teacher.cache import CachedAnswer

RETRYABLE_STATUS = {408, 409, 425, 429}


class ServerError(Exception):
    """The body is JSON but not an answer (no choices, another model's answer, a choice without text)."""


# An HTTP 200 whose content is unusable (no choices, another model's answer) is tried at most this many times per
# request: one more attempt rides out a proxy's hiccup; a server that keeps answering that way is not paid again and
# again until max_attempts runs out.
MAX_UNUSABLE_ATTEMPTS = 2

# what servers say when the prompt is longer than their context (OpenAI, vLLM, llama.cpp's servers, TGI, Anthropic);
# such a request fails the same way every time, whatever its status code, so it is never retried
_CONTEXT_ERROR = re.compile(
    r"context[_ ]length[_ ]exceeded|maximum context length|exceeds? (?:the )?(?:model'?s? )?context|"
    r"exceeds? the available context|context window|prompt is too long|too many (?:input |prompt )?tokens|"
    r"input (?:is )?too long|must be <= \d+|longer than the model'?s? (?:maximum )?context",
    re.IGNORECASE,
)


def is_context_error(body: bytes) -> bool:
    """Whether an error body says the prompt does not fit the model's context."""
    return bool(_CONTEXT_ERROR.search(body[:4000].decode("utf-8", "replace")))


# a dated snapshot or version of the model asked for: gpt-4o-mini -> gpt-4o-mini-2024-07-18, gpt-4-0613,
# claude-3-5-sonnet -> claude-3-5-sonnet-20241022 or @20241022, llama3 -> llama3:latest (Ollama's tags)
_VERSION_SUFFIX = re.compile(
    r"(?:-\d{4}-\d{2}-\d{2}|[-@]\d{8}|-\d{4}|:[\w.-]+|-latest|-v\d+(?:[.:]\d+)*)", re.IGNORECASE
)
_MODEL_FILE = re.compile(r"\.(?:gguf|ggml|bin|safetensors)$", re.IGNORECASE)


def model_matches(asked: Optional[str], answered: Any) -> bool:
    """Whether a response's ``model`` names the model that was asked for.

    Lenient where servers are known to differ honestly: no ``model`` in the response (many
    servers send none); the same name in another case; a dated snapshot or tag of the name
    asked (OpenAI answers ``gpt-4o-mini`` as ``gpt-4o-mini-2024-07-18``); the same name
    with or without a ``vendor/`` prefix (routers); and a model *file* (llama.cpp's own
    server without ``--alias`` names the one GGUF it serves; with ``--alias``, as distill
    starts its local teacher, it echoes the alias; llama-cpp-python's server echoes the
    name asked). Anything else is another model's answer.
    """
    if not asked or not isinstance(answered, str) or not answered.strip():
        return True
    a, g = asked.strip().lower(), answered.strip().lower()
    if a == g:
        return True
    if _MODEL_FILE.search(g) or g.startswith(("/", "./", "~")):
        return True
    for x, y in ((a, g), (a.rsplit("/", 1)[-1], g.rsplit("/", 1)[-1])):
        if x == y or (y.startswith(x) and _VERSION_SUFFIX.fullmatch(y[len(x) :])):
            return True
        # "-latest" asked, a dated snapshot answered (claude-3-5-sonnet-latest -> claude-3-5-sonnet-20241022)
        if (
            x.endswith("-latest")
            and y.startswith(x[: -len("latest")])
            and _VERSION_SUFFIX.fullmatch("-" + y[len(x) - 6 :])
        ):
            return True
    return False


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    return max(0.0, dt.timestamp() - (now if now is not None else time.time()))


def backoff_delay(attempt: int, base: float, cap: float, retry_after: Optional[float], rng: random.Random) -> float:
    """Full-jitter exponential backoff; a Retry-After from the server is a floor."""
    delay = rng.uniform(0, min(cap, base * (2 ** (attempt - 1))))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def redact(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def usage_of(data: Any) -> tuple[Optional[int], Optional[int]]:
    """(prompt_tokens, completion_tokens) of an OpenAI-style body, None where absent."""
    usage: dict[str, Any] = data["usage"] if isinstance(data, dict) and isinstance(data.get("usage"), dict) else {}
    pt = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else None
    ct = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else None
    return pt, ct


def reasoning_tokens(data: Any) -> int:
    """A reasoning model's hidden reasoning tokens (``usage.completion_tokens_details.reasoning_tokens``), else 0.

    They are part of ``completion_tokens`` and billed as output; distill counts them apart to show them.
    """
    usage = data.get("usage") if isinstance(data, dict) else None
    details = usage.get("completion_tokens_details") if isinstance(usage, dict) else None
    n = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return n if isinstance(n, int) else 0


def extract_answers(data: Any, n: int) -> tuple[list[CachedAnswer], Optional[int], Optional[int]]:
    """Pull choices and usage out of an OpenAI-style body; raises ServerError if it is not one."""
    if not isinstance(data, dict):
        raise ServerError(f"response JSON is a {type(data).__name__}, not an object")
    pt, ct = usage_of(data)
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) < n:
        raise ServerError(f"response has {len(choices) if isinstance(choices, list) else 'no'} choices, expected {n}")
    out = []
    for i, ch in enumerate(sorted(choices[:n], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)):
        if not isinstance(ch, dict):
            raise ServerError("choice is not an object")
        if "text" in ch and isinstance(ch["text"], str):
            text = ch["text"]
        elif isinstance(ch.get("message"), dict) and isinstance(ch["message"].get("content"), str):
            text = ch["message"]["content"]
        else:
            raise ServerError("choice has neither text nor message.content")
        lp = ch.get("logprobs") if isinstance(ch.get("logprobs"), dict) else None
        out.append(
            CachedAnswer(text, ch.get("finish_reason"), pt if i == 0 else None, ct if i == 0 else None, logprobs=lp)
        )
    return out, pt, ct


def snippet(body: bytes, n: int = 160) -> str:
    """The start of a body on one line, for an error message."""
    return body[:n].decode("utf-8", "replace").replace("\n", " ")
