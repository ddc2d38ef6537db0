"""Per-epoch metrics: one JSON line per epoch in `run_dir/metrics.jsonl`, plus TensorBoard scalars.

    log = MetricsLogger(run_dir, resume_epoch=start_epoch if resumed else None)
    for epoch in range(start_epoch, epochs):
        ...
        log.log_epoch({"epoch": epoch, "test_acc_net1": 0.61, "loss": {"ce": 1.2, "reg": 0.1}})
    log.close()

- metrics.jsonl is rewritten whole through `coreg_dist.io.atomic_write_text` at every epoch (a
  few hundred short lines at most), so a killed run never leaves half a line behind.
- Non-finite floats are written as null; numpy / torch scalars and arrays become plain numbers
  and lists.
- Resuming at epoch E drops every stored line with epoch >= E (the file is rewritten
  atomically) and tells TensorBoard to purge events from step E on, so a resumed run has no
  duplicate epochs in either place.
- TensorBoard is optional: if it cannot be imported or written, one warning is issued and the
  JSON lines carry on. (TensorBoard's own event files are append streams written by its
  writer, not through coreg_dist.io.)
"""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

from coreg_dist.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

_TB_WARNED = False


def _warn_tb_once(msg: str) -> None:
    global _TB_WARNED
    if not _TB_WARNED:
        _TB_WARNED = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: non-finite floats -> None, numpy/torch scalars -> numbers, arrays -> lists."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):            # int, numpy ints (bool handled above)
        return int(obj)
    if isinstance(obj, numbers.Real):                # float, numpy floats
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):                       # numpy arrays / scalars, torch tensors
        try:
            return to_jsonable(obj.tolist())
        except Exception:
            pass
    if hasattr(obj, "item"):
        try:
            return to_jsonable(obj.item())
        except Exception:
            pass
    return str(obj)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def scalar_items(record: Dict[str, Any]) -> Iterator[Tuple[str, float]]:
    """(tag, value) for every finite numeric top-level value and, one level deep, "group/key"."""
    for key, val in record.items():
        if key == "epoch":
            continue
        if isinstance(val, dict):
            for sub, v in val.items():
                if _is_number(v) and math.isfinite(float(v)):
                    yield f"{key}/{sub}", float(v)
        elif _is_number(val) and math.isfinite(float(val)):
            yield str(key), float(val)


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl file (or a run folder holding one), sorted by epoch.

    Lines that do not parse or lack an integer "epoch" are skipped; if an epoch appears more
    than once (a run restarted without resume_epoch), the last line for it wins.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.exists(path):
        return []
    by_epoch: Dict[int, Dict[str, Any]] = {}
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            ep = rec.get("epoch")
            if isinstance(ep, bool) or not isinstance(ep, int):
                continue
            by_epoch[ep] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


class MetricsLogger:
    """Appends one JSON line per epoch to run_dir/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str, resume_epoch: Optional[int] = None, tensorboard: bool = True):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.tb_dir = os.path.join(run_dir, TB_DIR)
        os.makedirs(run_dir, exist_ok=True)
        self._records: List[Dict[str, Any]] = read_metrics(self.path)
        if resume_epoch is not None:
            resume_epoch = int(resume_epoch)
            self._records = [r for r in self._records if r["epoch"] < resume_epoch]
            self._rewrite()
        self._writer = None
        self._closed = False
        if tensorboard:
            self._writer = self._open_writer(resume_epoch)

    def _open_writer(self, resume_epoch: Optional[int]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # ImportError, or a broken tensorboard / protobuf install
            _warn_tb_once(f"TensorBoard unavailable ({type(e).__name__}: {e}); "
                          f"metrics go to {self.path} only")
            return None
        try:
            # purge_step: TensorBoard hides events of earlier sessions at steps >= resume_epoch.
            return SummaryWriter(log_dir=self.tb_dir, purge_step=resume_epoch)
        except Exception as e:
            _warn_tb_once(f"TensorBoard writer failed ({type(e).__name__}: {e}); "
                          f"metrics go to {self.path} only")
            return None

    def _rewrite(self) -> None:
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in self._records)
        atomic_write_text(self.path, text)

    def log_epoch(self, record: Dict[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("MetricsLogger.log_epoch after close()")
        if "epoch" not in record:
            raise ValueError("a metrics record needs an integer 'epoch' key")
        ep = record["epoch"]
        if isinstance(ep, bool) or not isinstance(ep, numbers.Integral):
            raise ValueError(f"'epoch' must be an integer, got {ep!r}")
        rec = to_jsonable(dict(record))
        rec["epoch"] = int(ep)
        # Same epoch logged twice (e.g. a final re-evaluation): the newer record replaces it.
        self._records = [r for r in self._records if r["epoch"] != rec["epoch"]]
        self._records.append(rec)
        self._records.sort(key=lambda r: r["epoch"])
        self._rewrite()
        if self._writer is not None:
            try:
                for tag, val in scalar_items(record):
                    self._writer.add_scalar(tag, val, global_step=int(ep))
                self._writer.flush()
            except Exception as e:
                _warn_tb_once(f"TensorBoard write failed ({type(e).__name__}: {e}); "
                              f"metrics go to {self.path} only")
                self._close_writer()

    def history(self) -> List[Dict[str, Any]]:
        return read_metrics(self.path)

    def _close_writer(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            try:
                w.close()
            except Exception:
                pass

    def close(self) -> None:
        self._close_writer()
        self._closed = True

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort: flush TensorBoard if the trainer forgot close()
        try:
            self._close_writer()
        except Exception:
            pass
