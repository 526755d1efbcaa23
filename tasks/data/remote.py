"""Inputs where teams keep them: any fsspec URL (``s3://``, ``gs://``, ``az://``, ``hf://datasets/...``, ``memory://``).

Why fsspec and not a download step: a million-row Parquet file in a bucket is read as a
local one is, a row group at a time through a file-like object, never whole into memory.
Credentials come from where each filesystem looks for them (``AWS_*``, Google's default
credentials, ``HF_TOKEN``...), never from the config: the config is logged to MLflow and is
a Prefect parameter, so ``data.storage_options`` takes the other options (an endpoint, a
region, anonymous access) and refuses anything that looks like a secret (distill/config.py). URLs in errors
and reports are shown without any user, password or query string.
"""

from __future__ import annotations

import re
from typing import IO, Any, Optional
from urllib.parse import urlsplit, urlunsplit

class RemoteError(ValueError):
    """A remote input that cannot be read; the message names the URL (without credentials)."""


def is_url(path: str) -> bool:
    """A path with a scheme (``s3://...``); plain paths and Windows drives are not."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", path))


def public(url: str) -> str:
    """``url`` as it may be shown: no user or password, no query string (signed URLs carry keys there)."""
    if not is_url(url):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def filesystem(url: str, options: Optional[dict[str, Any]] = None) -> tuple[Any, str]:
    """(fsspec filesystem, path in it) for ``url``; a missing filesystem package is named with what to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(options or {}))
    except ImportError as e:
        raise RemoteError(
            f"{public(url)}: reading {urlsplit(url).scheme}:// needs a package that is not installed ({e}); "
            "for s3:// `pip install s3fs`, gs:// gcsfs, az:// adlfs (hf:// comes with huggingface_hub)"
        ) from None
    except ValueError as e:
        raise RemoteError(f"{public(url)}: {e}") from None


def describe(exc: BaseException) -> str:
    """An exception from a remote filesystem, on one line, without what might carry a credential."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return re.sub(r"(?i)(signature|credential|x-amz-[a-z-]+|token)=[^&\s]+", r"\1=***", msg)[:300]


def exists(url: str, options: Optional[dict[str, Any]] = None) -> bool:
    fs, path = filesystem(url, options)
    try:
        return bool(fs.exists(path))
    except Exception as e:  # noqa: BLE001  (a denied bucket, a dead endpoint: the filesystem's own errors)
        raise RemoteError(f"{public(url)}: cannot be read ({type(e).__name__}: {describe(e)})") from None


def is_dir(url: str, options: Optional[dict[str, Any]] = None) -> bool:
    fs, path = filesystem(url, options)
    return bool(fs.isdir(path))


def open_binary(url: str, options: Optional[dict[str, Any]] = None) -> IO[bytes]:
    fs, path = filesystem(url, options)
    try:
        return fs.open(path, "rb")
    except FileNotFoundError:
        raise RemoteError(f"input not found: {public(url)}") from None
    except Exception as e:  # noqa: BLE001
        raise RemoteError(f"{public(url)}: cannot be read ({type(e).__name__}: {describe(e)})") from None


def stat(url: str, options: Optional[dict[str, Any]] = None) -> Optional[list[Any]]:
    """Size and version (ETag or modification time) of a remote file, for the stage keys; None if unknown."""
    fs, path = filesystem(url, options)
    try:
        info = fs.info(path)
    except Exception:  # noqa: BLE001
        return None
    version = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or info.get("oid")
    return [info.get("size"), str(version)]
