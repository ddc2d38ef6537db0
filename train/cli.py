"""Stage 2: train a classifier from a label column (Co-Reg or a baseline from the registry).

    coreg-train --config configs/demo.yaml                                # Co-Reg, CPU preset
    coreg-train --config configs/demo.yaml --resume latest                # continue a killed run
    deepspeed --num_gpus 2 --module train.cli --config configs/gpu.yaml dist.engine=deepspeed
    accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m train.cli --config configs/demo.yaml
    sbatch --nodes=2 --gres=gpu:8 slurm/train.sbatch configs/gpu.yaml     # SLURM (slurm/README.md)

SIGUSR1 / SIGTERM: every rank finishes its step, a checkpoint is written, exit status 75.
A rank that dies makes the others fail their next collective within dist.timeout_s, exit 1.
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
    from coreg_dist.dist import collective_failure, shutdown_distributed
    from train.preemption import EXIT_PREEMPTED, Preempted
    from train.trainer import RunKilled, train

    parser = argparse.ArgumentParser(prog="coreg-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", default=None,
                        help="'latest' (the run directory's newest checkpoint) or a checkpoint path")
    # The deepspeed launcher passes --local_rank=N (it also sets LOCAL_RANK, which is what is read).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    cfg, args = parse_args(argv, "coreg-train", parser)
    if args.resume:
        cfg.train.resume = args.resume
    device = setup_process(cfg)
    try:
        train(cfg, device)
    except RunKilled as exc:
        print(f"{exc}; resume with --resume latest", file=sys.stderr)
        return 3
    except Preempted as exc:
        print(f"{exc}; resume with --resume latest", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except Exception as exc:
        message = collective_failure(exc, cfg)
        if message is None:
            raise
        print(message, file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
