"""The main job, end to end: ingest -> embedded annotator -> annotate -> train -> report.

    coreg-pipeline --config configs/demo.yaml            # = make demo, writes runs/demo/
    coreg-pipeline --config configs/demo.yaml train.epochs=5 run.out_dir=runs/short

Every stage is idempotent (committed shards and built models are found and kept), so a
killed pipeline is rerun with the same command.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from coreg_dist.config import save_config
from coreg_dist.runtime import parse_args, setup_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    from annotate.cli import annotate_clip, build_embedded
    from coreg_dist.data.ingest import ingest
    from train.trainer import train

    cfg, _ = parse_args(argv, "coreg-pipeline")
    device = setup_process(cfg)
    save_config(cfg, cfg.run.out_dir)
    t0 = time.time()
    stage = lambda name: print(f"\n== {name} ({time.time() - t0:.0f}s) ==", flush=True)
    stage("1/4 ingest")
    ingest(cfg)
    stage("2/4 embedded annotator")
    build_embedded(cfg, device)
    stage("3/4 annotate")
    annotate_clip(cfg, device)
    stage(f"4/4 train {cfg.train.method}")
    train(cfg, device)
    print(f"pipeline done in {time.time() - t0:.0f}s; run directory: {cfg.run.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
