"""Stage 2: train a classifier from a label column (Co-Reg or a baseline from the registry).

    coreg-train --config configs/demo.yaml                                # Co-Reg, CPU preset
    coreg-train --config configs/demo.yaml --resume latest                # continue a killed run
    torchrun --nproc_per_node=2 -m train.cli --config configs/demo.yaml   # 2 processes (gloo on CPU)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        -m train.cli --config configs/gpu.yaml                            # 2 nodes x 8 GPUs (NCCL)
    coreg-train --config configs/demo.yaml train.method=pce run.out_dir=runs/demo-pce   # baseline
    coreg-train --config configs/demo.yaml coreg.contrastive=false coreg.mixup=false    # ablation
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from coreg_dist.runtime import parse_args, setup_process


def main(argv: Optional[Sequence[str]] = None) -> int:
    from coreg_dist.dist import shutdown_distributed
    from train.trainer import RunKilled, train

    parser = argparse.ArgumentParser(prog="coreg-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", default=None,
                        help="'latest' (the run directory's newest checkpoint) or a checkpoint path")
    cfg, args = parse_args(argv, "coreg-train", parser)
    if args.resume:
        cfg.train.resume = args.resume
    device = setup_process(cfg)
    try:
        train(cfg, device)
    except RunKilled as exc:
        print(f"{exc}; resume with --resume latest", file=sys.stderr)
        return 3
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
