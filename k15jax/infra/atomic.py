"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Everything is built under a temporary name in the same directory (so the final rename stays on
one file system) and renamed into place only when complete; a crash or an exception leaves the
previous version, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator


def _parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return parent


@contextlib.contextmanager
def directory(path: str) -> Iterator[str]:
    """Yields an empty temporary directory that replaces `path` when the block ends normally.

    On an exception the temporary directory is removed and `path` is left as it was.
    """
    path = os.path.abspath(path)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=_parent(path))
    try:
        yield tmp
        if os.path.exists(path):
            # Two renames: a reader sees the old or the new directory, never a mix.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=_parent(path))
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str, text: str) -> str:
    """Writes `text` to `path` atomically; returns `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=_parent(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str, obj, *, indent: int | None = 2) -> str:
    """Writes `obj` as JSON to `path` atomically; returns `path`."""
    return write_text(path, json.dumps(obj, indent=indent))


def json_once(path: str, compute):
    """Returns the JSON at `path`; if absent, computes it and writes it atomically first."""
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    value = compute()
    write_json(path, value)
    return value
