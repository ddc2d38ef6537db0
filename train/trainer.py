"""The one trainer every method runs through: data, schedule, evaluation, checkpoints, logs.

    coreg-train --config configs/demo.yaml                      # Co-Reg on the demo column
    coreg-train --config configs/demo.yaml train.resume=latest  # continue a killed run
    coreg-train --config configs/demo.yaml train.method=pce run.out_dir=runs/demo-pce

Per epoch: method.begin_epoch (co-divide) -> method.plan_epoch -> for each step: batch from
the pool -> method.update -> evaluate on the test split -> metrics.jsonl / TensorBoard ->
atomic checkpoint. At the end: report.json, report.md and plots in the run directory.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

import numpy as np
import torch

from coreg_dist.config import Config, save_config, to_dict
from coreg_dist.io import read_json
from coreg_dist.methods.base import Batch, DataInfo, build_method
from coreg_dist.progress import progress
from coreg_dist.shards.format import read_column_info, read_manifest
from coreg_dist.shards.reader import ErrorLog
from train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from train.data import Pool, load_pool
from train.metrics_log import MetricsLogger
from train.report import format_gain, write_report

# Classes whose mirror image is another class (digits, text): no horizontal flips.
NO_FLIP_DATASETS = ("mnist", "svhn", "digits")


class RunKilled(RuntimeError):
    """Raised by train.stop_after_steps: behaves like a kill at that step (tests, drills)."""


def make_batch(pool: Pool, step, device) -> Batch:
    x = pool.x(step.labeled, device)
    u = pool.x(step.unlabeled, device) if step.unlabeled is not None else None
    true = torch.from_numpy(pool.true[step.labeled]).to(device)
    return Batch(step=step, x=x, Y=pool.y(step.labeled, device), u=u,
                 uY=pool.y(step.unlabeled, device) if u is not None else None,
                 true=true if (pool.true[step.labeled] >= 0).all() else None)


@torch.no_grad()
def evaluate(method, pool: Pool, device, batch_size: int) -> Dict:
    """Test accuracy of each network and of the ensemble; predictions of the final one."""
    correct: Dict[str, int] = {}
    preds = []
    for i in range(0, len(pool), batch_size):
        idx = np.arange(i, min(i + batch_size, len(pool)))
        x = pool.x(idx, device)
        t = torch.from_numpy(pool.true[idx]).to(device)
        out = method.predict_each(x)
        for name, logits in out.items():
            correct[name] = correct.get(name, 0) + int((logits.argmax(1) == t).sum())
        final = out.get("ensemble", out["net1"])
        preds.append(final.argmax(1).cpu().numpy())
    n = len(pool)
    return {"acc": {k: v / n for k, v in correct.items()}, "pred": np.concatenate(preds)}


def apply_few_shot(pool: Pool, shots: int, num_classes: int, seed: int) -> np.ndarray:
    """[D] `shots` samples per class get a manual label: Y becomes one-hot(true label)."""
    if shots <= 0:
        return np.zeros(0, dtype=np.int64)
    if (pool.true < 0).any():
        raise ValueError("config key 'coreg.few_shot' needs true labels in the training pool")
    rng = np.random.default_rng([seed, 17])
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(pool.true == c)
        chosen.extend(rng.choice(idx, size=min(shots, len(idx)), replace=False).tolist())
    chosen = np.sort(np.asarray(chosen, dtype=np.int64))
    pool.Y[chosen] = False
    pool.Y[chosen, pool.true[chosen]] = True
    return chosen


def train(cfg: Config, device: str) -> Dict:
    t_start = time.time()
    run_dir = cfg.run.out_dir
    os.makedirs(run_dir, exist_ok=True)
    config_file = save_config(cfg, run_dir)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    manifest = read_manifest(cfg.data.root)
    errors = ErrorLog()
    col = cfg.train.column
    print(f"loading {cfg.data.root}: train (column '{col}') and test", flush=True)
    pool = load_pool(cfg.data.root, manifest, "train", col, max_samples=cfg.train.max_train_samples,
                     errors=errors, seed=cfg.run.seed)
    test = load_pool(cfg.data.root, manifest, "test", None, errors=errors)
    K = manifest.num_classes
    few = apply_few_shot(pool, cfg.coreg.few_shot, K, cfg.run.seed)
    keys_by_shard, start = [], 0
    for n in pool.shard_sizes:
        keys_by_shard.append(pool.keys[start:start + n])
        start += n
    info = DataInfo(num_classes=K, in_channels=pool.in_channels, image_size=pool.image_size,
                    shard_names=pool.shard_names, shard_keys=keys_by_shard,
                    flip=not any(d in manifest.name.lower() for d in NO_FLIP_DATASETS))
    method = build_method(cfg.train.method, cfg, info, device)
    if len(few) and hasattr(method, "set_few_shot"):
        method.set_few_shot(few)
    print(f"{cfg.train.method}: {len(pool)} training samples ({len(pool.shard_names)} shards), "
          f"{len(test)} test, {K} classes, {pool.in_channels}x{pool.image_size}px, "
          f"backbone {cfg.model.backbone}, device {device}", flush=True)

    start_epoch, resumed = 0, False
    if cfg.train.resume:
        path = find_checkpoint(run_dir, cfg.train.resume)
        if path:
            last, _ = load_checkpoint(path, method)
            start_epoch, resumed = last + 1, True
            print(f"resumed from {path}: continuing at epoch {start_epoch}", flush=True)
        else:
            print(f"no checkpoint in {run_dir} yet: starting from scratch", flush=True)
    log = MetricsLogger(run_dir, resume_epoch=start_epoch if resumed else None)

    def passes(batch_size: int):
        for i in range(0, len(pool), batch_size):
            idx = np.arange(i, min(i + batch_size, len(pool)))
            yield idx, pool.x(idx, device), pool.y(idx, device)

    global_step = 0
    samples_seen, compute_s = 0, 0.0
    result = None
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        record: Dict = {"epoch": epoch}
        record.update(method.begin_epoch(epoch, pool.Y, pool.true, passes))
        t_divide = time.time() - t0
        steps = method.plan_epoch(epoch, len(pool))
        sums: Dict[str, float] = {}
        data_s = step_s = 0.0
        n_samples = 0
        bar = progress(total=len(steps), desc=f"epoch {epoch}/{cfg.train.epochs}", unit="step")
        for i, step in enumerate(steps):
            t1 = time.time()
            batch = make_batch(pool, step, device)
            t2 = time.time()
            losses = method.update(batch)
            t3 = time.time()
            data_s += t2 - t1
            step_s += t3 - t2
            n = len(step.labeled) + (len(step.unlabeled) if step.unlabeled is not None else 0)
            n_samples += n
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            global_step += 1
            bar.update(1)
            if i % cfg.train.log_every == 0:
                bar.set_postfix(samples_s=f"{n_samples / max(step_s + data_s, 1e-9):.0f}",
                                **{k.split("/")[-1]: f"{v:.3f}" for k, v in losses.items()
                                   if k.startswith("loss/")})
            if cfg.train.stop_after_steps and global_step >= cfg.train.stop_after_steps:
                bar.close()
                raise RunKilled(f"stopped after {global_step} steps (train.stop_after_steps)")
        bar.close()
        samples_seen += n_samples
        compute_s += step_s
        record.update({k: v / max(len(steps), 1) for k, v in sums.items()})
        result = evaluate(method, test, device, cfg.train.eval_batch_size)
        for name, acc in result["acc"].items():
            record[f"test_acc_{name}"] = acc
        record.update({"lr": method.lr_at(epoch), "steps": len(steps),
                       "samples_per_s": n_samples / max(step_s, 1e-9),
                       "data_wait_s": data_s, "compute_s": step_s, "divide_s": t_divide,
                       "epoch_s": time.time() - t0})
        log.log_epoch(record)
        save_checkpoint(run_dir, epoch, method, {"config": to_dict(cfg)})
        accs = "  ".join(f"{k}={v:.2%}" for k, v in result["acc"].items())
        sizes = "  ".join(f"|P{k}|={record[f'n_p_net{k}']}" for k in (1, 2) if f"n_p_net{k}" in record)
        print(f"epoch {epoch}: {accs}  {sizes}  {record['samples_per_s']:.0f} samples/s "
              f"({record['epoch_s']:.1f}s)", flush=True)
    if result is None:      # resumed a finished run: evaluate the restored networks
        result = evaluate(method, test, device, cfg.train.eval_batch_size)
    log.close()
    if errors.total:
        print(f"data problems: {errors.counts} (see report.json)", flush=True)

    report = build_report(cfg, manifest, result, method, time.time() - t_start, device,
                          config_file, errors, samples_seen / max(compute_s, 1e-9))
    confusion = np.zeros((K, K), dtype=np.int64)
    np.add.at(confusion, (test.true, result["pred"]), 1)
    table = write_report(run_dir, report, log.history(), confusion, manifest.classes)
    print(table, flush=True)
    gain = format_gain(report, emphasis="")
    if gain:
        print(gain, flush=True)
    return report


def build_report(cfg, manifest, result, method, seconds, device, config_file, errors,
                 samples_per_s) -> Dict:
    report: Dict = {"method": method.name, "dataset": manifest.name, "column": cfg.train.column}
    info = read_column_info(cfg.data.root, cfg.train.column) or {}
    splits = info.get("splits", {})
    test_stats, train_stats = splits.get("test", {}), splits.get("train", {})
    # The annotator is judged on the same test images as the learner.
    for key, src in (("annotator_zero_shot_acc", "zero_shot_acc"),
                     ("annotator_template_avg_acc", "template_avg_acc")):
        if src in test_stats:
            report[key] = test_stats[src]
    for key in ("avg_candidates", "eta"):
        if key in train_stats:
            report[key] = train_stats[key]
    acc = result["acc"]
    if "net2" in acc:
        report["test_acc_net1"], report["test_acc_net2"] = acc["net1"], acc["net2"]
        if "ensemble" in acc:
            report["test_acc_ensemble"] = acc["ensemble"]
    report["test_acc"] = acc.get("ensemble", acc["net1"])
    if method.num_networks == 1:
        report["test_acc_net1"] = acc["net1"]
    report.update({"epochs": cfg.train.epochs, "seconds": round(seconds, 1),
                   "samples_per_s": round(samples_per_s, 1), "device": device,
                   "backbone": cfg.model.backbone, "config_file": config_file,
                   "data_errors": errors.summary()})
    return report
