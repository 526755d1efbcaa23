"""Count tokens the way the teacher does, or say plainly that the count is an estimate.

Why: prices are per token, and two numbers need tokens without a server's word for them:
the plan (made before any request) and answers whose response carried no ``usage``. The
counter uses the teacher's own tokenizer where it is on this machine (the local GGUF via
llama.cpp's vocab-only loader, which matches llama.cpp's reported prompt tokens exactly,
a Hugging Face tokenizer folder named by ``teacher.tokenizer``, or tiktoken for an OpenAI
model name), else 4 characters per token. Every count carries its method so reports can
mark it ``counted`` or ``estimated``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, Optional

CHARS_PER_TOKEN = 4.0  # OpenAI's rule of thumb for English text


class TokenCounter:
    """``count(text)`` with a stated method; ``exact`` is True when it is the teacher's tokenizer."""

    def __init__(self, fn: Optional[Callable[[str, bool], int]], method: str) -> None:
        self._fn = fn
        self.method = method
        self.exact = fn is not None

    def count(self, text: str, prompt: bool = False) -> int:
        """Tokens in ``text``; ``prompt=True`` adds what the server adds to a prompt (BOS)."""
        if self._fn is None:
            return max(1, math.ceil(len(text) / CHARS_PER_TOKEN)) if text else 0
        return self._fn(text, prompt)

    def count_prompt(self, payload: dict[str, Any]) -> int:
        """Prompt tokens of a request body: a completion prompt, or chat messages.

        For chat, the chat template's tokens are not known here: 4 per message and 3 for
        the reply are added (OpenAI's published rule), so chat counts are approximate.
        """
        if "messages" in payload:
            return sum(self.count(str(m.get("content", ""))) + 4 for m in payload["messages"]) + 3
        return self.count(str(payload.get("prompt", "")), prompt=True)

    def count_completion(self, text: str, finish_reason: Optional[str]) -> int:
        """Completion tokens of an answer: its text, plus the stop token when it ended on one."""
        return self.count(text) + (1 if finish_reason == "stop" else 0)

    @property
    def usage_source(self) -> str:
        return "counted" if self.exact else "estimated"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # captured stderr (pytest): nothing to silence
        yield
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def heuristic_counter() -> TokenCounter:
    return TokenCounter(None, f"estimated at {CHARS_PER_TOKEN:g} characters per token")


def llama_counter(gguf_path: str) -> TokenCounter:
    """The GGUF's own tokenizer (vocab only: loads in well under a second, no weights)."""
    from llama_cpp import Llama

    with _quiet_stderr():  # llama.cpp prints context warnings straight to fd 2, verbose=False or not
        vocab = Llama(model_path=gguf_path, vocab_only=True, verbose=False)

    def fn(text: str, prompt: bool) -> int:
        return len(vocab.tokenize(text.encode("utf-8", "replace"), add_bos=prompt, special=prompt))

    return TokenCounter(fn, f"counted with the teacher's tokenizer ({gguf_path.rsplit('/', 1)[-1]})")


# where tiktoken downloads an encoding's rank file from; its cache is keyed by the SHA-1 of this address
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"


def _seed_tiktoken_cache(name: str) -> None:
    """Put ``name``'s rank file where tiktoken looks before it downloads, from bpe-openai's package data.

    tiktoken fetches its encodings from the internet on first use; on a machine without it
    (CI, here) the same files ship gzipped inside the bpe-openai wheel. tiktoken checks a
    cached file against the SHA-256 it expects before using it, so a wrong file is never used.
    """
    import gzip
    import hashlib
    import tempfile
    from importlib.resources import files

    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folder = cache or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    target = os.path.join(folder, hashlib.sha1(_TIKTOKEN_URL.format(name).encode()).hexdigest())
    if os.path.exists(target):
        return
    try:
        packed = files("bpe_openai").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    except (ImportError, FileNotFoundError, OSError):
        return
    os.makedirs(folder, exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.decompress(packed))
    os.replace(tmp, target)


def openai_counter(model: str) -> Optional[TokenCounter]:
    """tiktoken's count for an OpenAI model name (gpt-4o-mini: o200k_base), or None if it is not one tiktoken knows."""
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None
    _seed_tiktoken_cache(name)
    try:
        enc = tiktoken.get_encoding(name)
    except Exception:  # noqa: BLE001  (no rank file and no internet: the estimate, which says so)
        return None

    def fn(text: str, prompt: bool) -> int:
        del prompt  # OpenAI adds no BOS; chat framing is count_prompt's per-message rule
        return len(enc.encode(text, disallowed_special=()))

    return TokenCounter(fn, f"counted with tiktoken {name} ({model})")


def hf_counter(path: str) -> TokenCounter:
    """A Hugging Face tokenizer folder (or a hub id already in the local cache)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def fn(text: str, prompt: bool) -> int:
        return len(tok(text, add_special_tokens=prompt)["input_ids"])

    return TokenCounter(fn, f"counted with the tokenizer at {path}")
