"""Write one shard atomically: a WebDataset tar under a temporary name, renamed on success,
then the stats JSON (the commit marker) written last.

    with ShardWriter(image_shard_path(root, "train-000000")) as w:
        w.write("train-00000000", {"png": png_bytes, "cls": 3})
    w.commit({"n": w.count})          # after the with-block: tar is in place, marker goes last
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from typing import Dict, List, Optional

import webdataset as wds

from coreg_dist.io import atomic_write_json
from coreg_dist.shards.format import check_key, stats_path


class _HashingFile:
    """A write-only file that also feeds every byte to sha256 (tarfile's stream mode only writes)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class ShardWriter:
    def __init__(self, path: str):
        self.path = path
        self.keys: List[str] = []
        self._tmp: Optional[str] = None
        self._stream = None
        self._tar = None
        self._t0 = time.time()

    def __enter__(self) -> "ShardWriter":
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".tmp-", dir=folder)
        os.chmod(self._tmp, 0o644)
        self._stream = _HashingFile(os.fdopen(fd, "wb"))
        # mtime fixed so that the same input gives byte-identical shards (idempotent reruns).
        self._tar = wds.TarWriter(self._stream, mtime=0)
        return self

    def write(self, key: str, fields: Dict) -> None:
        check_key(key, self.path)
        if self.keys and key == self.keys[-1]:
            raise ValueError(f"{self.path}: key {key!r} written twice in a row")
        sample = {"__key__": key}
        for name, value in fields.items():
            sample[name] = str(value) if isinstance(value, int) else value
        self._tar.write(sample)
        self.keys.append(key)

    @property
    def count(self) -> int:
        return len(self.keys)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                self._tar.close()    # writes the end of the archive; leaves our stream open
            finally:
                self._stream.close()
        finally:
            if exc_type is None:
                os.replace(self._tmp, self.path)
            elif os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def commit(self, stats: Optional[Dict] = None) -> str:
        """Write the commit marker. Call after the with-block has put the tar in place."""
        if not os.path.isfile(self.path):
            raise RuntimeError(f"{self.path}: commit before the shard was written")
        body = {"shard": os.path.basename(self.path), "n": self.count,
                "first_key": self.keys[0] if self.keys else None,
                "last_key": self.keys[-1] if self.keys else None,
                "sha256": self._stream.sha.hexdigest(),
                "seconds": round(time.time() - self._t0, 3)}
        body.update(stats or {})
        marker = stats_path(self.path)
        atomic_write_json(marker, body)
        return marker
