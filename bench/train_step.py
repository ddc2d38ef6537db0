"""Co-Reg training throughput: samples/s per network on synthetic batches, any device.

    python bench/train_step.py                                   # small_cnn, CPU
    python bench/train_step.py --backbone preact_resnet18 --size 32 --channels 3 \
        --batch 256 --steps 300 --device cuda --bf16 --channels-last   # the GPU check

Times full Co-Reg optimiser steps (co-pseudo-labels, MixUp, label, prototype and contrastive
losses, queue and EMA updates) after warm-up steps, and prints what it measured and on what.
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from coreg_dist.config import load_config
from coreg_dist.data.stream import PassSpec, Route
from coreg_dist.dist import Collectives
from coreg_dist.engines import build_engine
from coreg_dist.methods.base import Batch, BatchPart, DataInfo, PassRng, build_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="small_cnn")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    cfg = load_config(None, [f"model.backbone={a.backbone}", f"model.bf16={a.bf16}",
                             f"model.channels_last={a.channels_last}", f"train.batch_size={a.batch}",
                             "coreg.warm_up=0", "coreg.feature_start=0",
                             # the published switches, set: auto would need a co-divide,
                             # which this loop does not run (the own targets cost the same)
                             "coreg.p_refine=all", "coreg.co_divide=true",
                             "coreg.co_pseudo_label=true"])
    coll = Collectives()
    method = build_method("coreg", cfg, DataInfo(a.classes, a.channels, a.size), a.device, coll)
    engines = [build_engine(n, cfg, coll, a.device) for n in method.networks()]
    method.attach_engines(engines)
    method.epoch = 0
    rng = np.random.default_rng(0)
    Y = np.zeros((a.batch, a.classes), dtype=bool)
    Y[np.arange(a.batch), rng.integers(0, a.classes, a.batch)] = True
    Y |= rng.random((a.batch, a.classes)) < 0.05
    Yt = torch.from_numpy(Y).float().to(a.device)
    keys = [f"k{i}" for i in range(a.batch)]

    def part(attach: bool) -> BatchPart:
        x = torch.rand(a.batch, a.channels, a.size, a.size, device=a.device)
        extra = {}
        if attach:     # the other network's split: w and its candidate-masked prediction
            for k in range(2):
                extra[f"w{k}"] = torch.ones(a.batch, device=a.device)
                extra[f"pred{k}"] = Yt / Yt.sum(1, keepdim=True)
        return BatchPart(x=x, Y=Yt, true=torch.full((a.batch,), -1, device=a.device), keys=keys,
                         attach=extra)

    parts = {"x": part(True), "u": part(False)}
    routes = (Route("x", a.batch), Route("u", a.batch))
    rngs = PassRng(0, 0, 0, [0], 1)

    def step(net: int) -> None:
        spec = PassSpec(f"train_net{net + 1}", net, steps=a.steps, routes=routes)
        batch = Batch(spec=spec, epoch=0, step=0, parts=parts,
                      sizes={"x": [a.batch], "u": [a.batch]}, rng=rngs)
        out = method.update(batch)
        engines[out.net].backward(out.loss)
        engines[out.net].step()
        method.after_step(batch, out)

    for i in range(a.warmup_steps):
        step(i % 2)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(a.steps):
        step(i % 2)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    per_step = dt / a.steps
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {a.device} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"backbone {a.backbone}, {a.channels}x{a.size}px, batch {a.batch} labeled + {a.batch} "
          f"unlabeled, bf16={a.bf16}, channels_last={a.channels_last}, feature terms on")
    print(f"{a.steps} Co-Reg steps in {dt:.2f}s: {per_step * 1000:.1f} ms/step, "
          f"{2 * a.batch / per_step:.0f} samples/s per network (labeled + unlabeled)")


if __name__ == "__main__":
    main()
