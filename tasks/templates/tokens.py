"""Count tokens the way the teacher does, or say plainly that the count is an estimate.

Why: prices are per token, and two numbers need tokens without a server's word for them:
the plan (made before any request) and answers whose response carried no ``usage``. The
counter uses the teacher's own tokenizer where it is on this machine (the local GGUF's,
read from its metadata once, which matches llama.cpp's own tokenisation, a Hugging Face
tokenizer folder named by ``teacher.tokenizer``, or tiktoken for an OpenAI model name),
else 4 characters per token. Every count carries its method so reports can
mark it ``counted`` or ``estimated``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
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


def gguf_tokenizer_dir(gguf_path: str, cache_root: str = ".distill/models") -> Path:
    """The GGUF's tokenizer as a Hugging Face ``tokenizer.json`` folder: converted once, then reused.

    Why: the embedded teacher is llama.cpp's C++ server, so nothing in Python loads the GGUF;
    transformers reads the tokenizer out of the GGUF's metadata (about 10 s here), and the
    saved folder loads in a fraction of a second. The folder is keyed by the file's name and
    size, written to a temporary folder and renamed into place (a killed conversion leaves no
    half-written tokenizer), under a file lock (two runs convert once).
    """
    from filelock import FileLock

    gguf = Path(gguf_path)
    root = Path(cache_root).absolute() / "tokenizers"
    final = root / f"{gguf.stem}-{gguf.stat().st_size}"
    if (final / "tokenizer.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{final.name}.lock")):
        if (final / "tokenizer.json").is_file():
            return final
        from transformers import AutoTokenizer

        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with _quiet_stderr():
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    return final


def gguf_counter(gguf_path: str) -> TokenCounter:
    """The local GGUF's own tokenizer, as llama.cpp applies it.

    A prompt is tokenised as llama-server tokenises one (special tokens such as
    ``<|im_end|>`` parsed, the model's BOS added if it has one); an answer's text without
    parsing special tokens. Checked against llama.cpp's own tokenizer on the bundled data
    (tests/test_costs.py).
    """
    from tokenizers import Tokenizer

    path = str(gguf_tokenizer_dir(gguf_path) / "tokenizer.json")
    as_prompt = Tokenizer.from_file(path)
    as_text = Tokenizer.from_file(path)
    as_text.encode_special_tokens = True  # an answer's "<|im_end|>" is text, not a control token

    def fn(text: str, prompt: bool) -> int:
        return len((as_prompt if prompt else as_text).encode(text, add_special_tokens=prompt).ids)

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
