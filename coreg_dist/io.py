"""Atomic file writes: everything goes to a temporary name in the same folder, then os.replace.

A reader therefore sees either the old file or the whole new one, never half of it, and a
killed writer leaves only a `*.tmp-*` file behind that the next run overwrites or ignores.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o644)   # mkstemp makes 0600; shards and reports are meant to be shared
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path: str):
    with open(path, "r", encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing) for the duration of the block: array
    tasks that derive one shared file (column.json, manifest.json) from per-shard markers take
    it, so the last one to write has seen every committed marker. Where the filesystem has no
    locks the block still runs: the shared file is derived, so a later task or rerun corrects it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield
    finally:
        os.close(fd)   # releases the lock
