"""The one trainer every method runs through: streams, engines, evaluation, checkpoints, logs.

    coreg-train --config configs/demo.yaml                                   # one process
    torchrun --nproc_per_node=2 -m train.cli --config configs/demo.yaml      # 2 ranks (gloo/NCCL)
    coreg-train --config configs/demo.yaml --resume latest                   # continue a killed run
    coreg-train --config configs/demo.yaml train.method=pce run.out_dir=runs/demo-pce

A run: state version 0 (membership.py: which samples train) -> per epoch:
  method.begin_epoch  (co-divide: streamed sweeps, a new per-sample state version)
  method.plan_epoch   -> passes; for each pass, the rank streams its chunks of every step
                         (coreg_dist/data/stream.py), and per step:
                         method.update -> engine.backward -> engine.step -> method.after_step
  evaluation on the test split (each rank its shards, counts all-reduced)
  metrics.jsonl / TensorBoard (rank 0) -> collective checkpoint (also every K steps)
At the end, rank 0 writes report.json, report.md and the plots.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Dict, List, Optional

import numpy as np
import torch

from coreg_dist.config import Config, save_config, to_dict
from coreg_dist.data.stream import (PassSpec, ShardSource, StreamContext, StreamPlan, iterate_pass,
                                    iterate_sweep, plan_streams, rank_streams, require_scores,
                                    sweep_shards)
from coreg_dist.data.transform import ImageTransform, channels_for_mode, probe_image
from coreg_dist.dist import init_distributed
from coreg_dist.engines import build_engine, full_parameters, uneven_forwards
from coreg_dist.methods.base import Batch, DataInfo, PassRng, build_method
from coreg_dist.output_prior import check_config as check_output_prior
from coreg_dist.output_prior import candidate_mass, fit_logit_bias, prior_shards, target_prior
from coreg_dist.progress import progress
from coreg_dist.shards.format import (FormatError, Manifest, check_column_current,
                                      read_column_info, read_manifest, require_column_shards)
from coreg_dist.shards.reader import ErrorLog, image_field, iter_tar
from coreg_dist.state import StateStore
from train.checkpoint import (check_engine, check_resumable, find_checkpoint, kept_state_versions,
                              load_checkpoint, rng_state, save_checkpoint, saved_error_logs,
                              set_rng_state)
from train.epoch_context import EpochContext, report_events, to_device_part
from train.membership import TRAINER_FIELDS, build_initial_state
from train.metrics_log import MetricsLogger, to_jsonable
from train.preemption import Preempted, StopRequest
from train.step_writes import StepWrites
from train.report import format_gain, write_report



class RunKilled(RuntimeError):
    """Raised by train.stop_after_steps: behaves like a kill at that step (tests, drills)."""


def image_transform(cfg, source: ShardSource, manifest: Manifest) -> ImageTransform:
    """data.image_size / data.channels, or what the first training image says."""
    d = cfg.data
    size, channels = d.image_size, d.channels
    if size <= 0 or channels <= 0:
        first = manifest.shards("train")[0].name
        for _, fields in iter_tar(source.image(first)):
            ext = image_field(fields)
            if ext is None:
                continue
            data = fields[ext]
            mode, w, h = probe_image(data)
            if size <= 0:
                if w != h or w > 512:
                    raise FormatError(f"set config key 'data.image_size': the first training image "
                                      f"({first}) is {w}x{h}, not a small square to take the size from")
                size = w
            channels = channels if channels > 0 else channels_for_mode(mode)
            break
    return ImageTransform(size=size, channels=channels, resize=d.resize, interpolation=d.interpolation)


class Trainer:
    def __init__(self, cfg: Config, device: str):
        self.cfg = cfg
        self.coll, self.device = init_distributed(cfg, device)
        self.main = self.coll.is_main
        self.run_dir = cfg.run.out_dir
        self.errors = ErrorLog()
        self._warned: set = set()
        self.global_step = 0
        self.t_start = time.time()
        self.stop = StopRequest()
        check_output_prior(cfg.train)

    def log(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    # ------------------------------------------------------------------ set-up
    def _check_shared_run_dir(self) -> None:
        """Ranks read the per-sample state other ranks wrote and write their checkpoint parts
        into one folder: run.out_dir must be storage every rank sees."""
        token = os.path.join(self.run_dir, ".rank0-token")
        if self.main:
            with open(token, "w") as f:
                f.write(f"{os.getpid()} {time.time()}\n")
        self.coll.barrier()
        seen = os.path.isfile(token) and open(token).read()
        ok = self.coll.all_gather_object(bool(seen))
        self.coll.barrier()
        if self.main:
            os.unlink(token)
        if not all(ok):
            missing = [r for r, o in enumerate(ok) if not o]
            raise RuntimeError(f"run.out_dir ({self.run_dir}) is not shared: rank(s) {missing} cannot see "
                               "what rank 0 writes there. Put it on a filesystem every node mounts "
                               "(the per-sample state and the checkpoints are written by every rank).")

    def _setup(self) -> None:
        cfg, coll = self.cfg, self.coll
        os.makedirs(self.run_dir, exist_ok=True)
        if coll.distributed:
            self._check_shared_run_dir()
        self.config_file = save_config(cfg, self.run_dir) if self.main else ""
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        root = cfg.data.root
        self.manifest = manifest = read_manifest(root)
        self.K = manifest.num_classes
        self.source = ShardSource(root, cfg.data.shard_url)
        if not cfg.data.shard_url:
            train_shards = [s.name for s in manifest.shards("train")]
            require_column_shards(root, cfg.train.column, train_shards)
            check_column_current(root, cfg.train.column, train_shards)
        self.transform = image_transform(cfg, self.source, manifest)
        self.image_shape = self.transform.shape
        d, W = cfg.data, coll.world_size
        self.n_streams = d.streams or W * max(1, d.num_workers)
        if self.n_streams % W:
            raise ValueError(f"config key 'data.streams' ({self.n_streams}) must be a multiple of the "
                             f"world size ({W}): every rank holds the same number of streams")
        info = DataInfo(num_classes=self.K, in_channels=self.transform.channels,
                        image_size=self.transform.size, flip=cfg.train.flip)
        self.method = build_method(cfg.train.method, cfg, info, self.device, coll)
        self.engines = [build_engine(n, cfg, coll, self.device) for n in self.method.networks()]
        self.method.attach_engines(self.engines)
        fields = dict(TRAINER_FIELDS)
        for name, spec in self.method.state_fields().items():
            if name in fields:
                raise ValueError(f"method {self.method.name}: state field {name!r} is the trainer's")
            fields[name] = spec
        self.store = StateStore(self.run_dir, fields)
        self.step_writes = (StepWrites(self.store, self.method.step_state, coll.rank)
                            if self.method.step_state else None)
        self.stream_ctx = StreamContext(source=self.source, num_classes=self.K, transform=self.transform,
                                        column=cfg.train.column, state_root=self.run_dir,
                                        state_version=-1, state_fields=tuple(fields.items()),
                                        soft_labels=self.method.soft_labels)
        if self.method.soft_labels:
            require_scores(self.stream_ctx, manifest.shards("train")[0].name)
        train_counts = {s.name: s.n for s in manifest.shards("train")}
        self.train_sweep = sweep_shards(train_counts, coll.rank, W, cfg.run.seed)
        self.prior_sweep = sweep_shards(prior_shards(train_counts, cfg.train.output_prior_samples),
                                        coll.rank, W, cfg.run.seed)
        test_counts = {s.name: s.n for s in manifest.shards("test")}
        self.test_sweep = sweep_shards(test_counts, coll.rank, W, cfg.run.seed)
        self.n_manifest = sum(train_counts.values())

    # ------------------------------------------------------------------ resume or start
    def _start(self):
        """Returns (start epoch, resume position or None)."""
        cfg = self.cfg
        path = find_checkpoint(self.run_dir, cfg.train.resume) if cfg.train.resume else None
        if path is None:
            if cfg.train.resume:
                self.log(f"no checkpoint in {self.run_dir} yet: starting from scratch")
            if self.main:
                self.store.prune(())
            self.coll.barrier()
            self.index = build_initial_state(self.store, self.stream_ctx, self.train_sweep,
                                             self.n_manifest, cfg, self.coll, self.errors)
            self.version = 0
            return 0, None
        meta, model, rank_state = load_checkpoint(path, self.coll.rank, self.device)
        check_resumable(path, meta, self.coll.world_size, self.n_streams)
        if meta["method"] != self.method.name:
            raise ValueError(f"{path} is a checkpoint of method '{meta['method']}', not '{self.method.name}'")
        check_engine(path, meta, self.engines[0], self.coll.world_size)
        with full_parameters(self.engines, modify=True):
            self.method.load_state_dict(model["method"])
        for k, (e, s) in enumerate(zip(self.engines, model["engines"])):
            e.load_state_dict(s)
            e.load_collective(os.path.join(path, f"engine{k}"))
        self.version = int(meta["state_version"])
        self.index = self.store.read_index(self.version)
        self.global_step = int(meta["global_step"])
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            self.method.load_rank_buffers(rank_state["buffers"])
            self.errors.load_state_dict(rank_state["errors"])
            where = f"epoch {meta['epoch']}, pass {meta['pass_index']}, step {meta['step']}"
            self.log(f"resumed from {path}: continuing mid-epoch at {where}")
            return int(meta["epoch"]), {"meta": meta, "rank": rank_state}
        if self.main:
            for log in saved_error_logs(path):
                self.errors.merge(log)
        self.log(f"resumed from {path}: continuing at epoch {meta['epoch']}")
        return int(meta["epoch"]), None

    # ------------------------------------------------------------------ one pass
    def _stream_plans(self, epoch: int, pi: int, spec: PassSpec, resume: Optional[Dict]) -> List[StreamPlan]:
        for r in spec.routes:
            if r.per_step % self.n_streams:
                raise ValueError(f"pass {spec.name}: {r.per_step} samples per step for part '{r.name}' "
                                 f"do not split over data.streams={self.n_streams}; make train.batch_size "
                                 f"a multiple of data.streams")
        plans = plan_streams(spec, self.index["shards"], self.n_streams, (self.cfg.run.seed, epoch, pi))
        self._warn_imbalance(spec, plans)
        mine = rank_streams(plans, self.coll.rank, self.coll.world_size)
        if resume is None:
            return mine
        saved = resume["rank"]["streams"]
        out = []
        for p in mine:
            s = saved[str(p.stream)]
            if [list(x) for x in p.shards] != s["shards"]:
                raise ValueError(f"stream {p.stream} of pass {spec.name}: the shard order differs from "
                                 "the checkpoint's (did the dataset or its state change?)")
            out.append(replace(p, skip=tuple(int(s["taken"][r.name]) for r in spec.routes)))
        return out

    def _warn_imbalance(self, spec: PassSpec, plans: List[StreamPlan]) -> None:
        """Shards are dealt whole to streams; every stream gives the same number of samples per
        epoch, so a stream holding fewer repeats some and one holding more leaves some for the
        next epoch. Say so once per part when that exceeds 25%."""
        for i, r in enumerate(spec.routes):
            key = (spec.name.rstrip("0123456789"), r.name)
            counts = [p.counts[i] for p in plans]
            need = spec.steps * r.per_step // self.n_streams
            if self.main and key not in self._warned and max(counts) > 1.25 * max(1, min(counts)):
                self._warned.add(key)
                print(f"note: pass {spec.name}, part '{r.name}': the {self.n_streams} streams hold "
                      f"{min(counts)} to {max(counts)} samples and each gives {need} per epoch, so some "
                      "samples repeat within an epoch and others wait for the next (shards are dealt "
                      "whole to streams: more, smaller shards balance them)", flush=True)

    def _run_pass(self, epoch: int, pi: int, spec: PassSpec, acc: Dict, resume: Optional[Dict]) -> None:
        cfg, d = self.cfg, self.cfg.data
        plans = self._stream_plans(epoch, pi, spec, resume)
        rng = PassRng(cfg.run.seed, epoch, pi, [p.stream for p in plans], self.n_streams)
        start = 0
        taken = {p.stream: {r.name: (p.skip[i] if p.skip else 0) for i, r in enumerate(spec.routes)}
                 for p in plans}
        if resume is not None:
            rng.load_state_dict(resume["rank"]["pass_rng"])
            start = int(resume["meta"]["step"])
        for e in self.engines:
            if resume is None:        # (a resumed pass had its buffers averaged when it began)
                e.sync_buffers()
            e.set_lr(self.method.lr_at(epoch))
        self.method.begin_pass(spec)
        ctx = replace(self.stream_ctx, state_version=self.version)
        bar = progress(total=spec.steps, initial=start, desc=f"epoch {epoch} {spec.name}", unit="step",
                       disable=not self.main)
        keys_log = self._keys_log()
        for data in iterate_pass(ctx, spec, plans, self.n_streams, start, num_workers=d.num_workers,
                                 prefetch=d.prefetch, shuffle_buffer=d.shuffle_buffer,
                                 image_shape=self.image_shape):
            t0 = time.perf_counter()
            report_events(self.errors, data.errors, self.coll.rank)
            parts = {n: to_device_part(p, self.device) for n, p in data.parts.items()}
            batch = Batch(spec=spec, epoch=epoch, step=data.step, parts=parts, sizes=data.sizes,
                          rng=rng, progress=data.step / max(1, spec.steps))
            out = self.method.update(batch)
            engine = self.engines[out.net]
            engine.backward(out.loss)
            engine.step()
            self.method.after_step(batch, out)
            if out.writes:
                self._log_writes(pi, data, out.writes)
            acc["compute_s"] += time.perf_counter() - t0
            acc["wait_s"] += data.wait_s
            acc["steps"] += 1
            acc["samples"] += sum(len(p) for p in parts.values())
            for k, v in out.logs.items():
                acc["sums"][k] = acc["sums"].get(k, 0.0) + v
                acc["counts"][k] = acc["counts"].get(k, 0) + 1
            for s, t in data.taken.items():
                taken[s] = t
            if keys_log is not None:
                for name, p in data.parts.items():
                    keys_log.write("".join(f"{epoch} {pi} {data.step} {name} {k}\n" for k in p.keys))
                keys_log.flush()
            self.global_step += 1
            bar.update(1)
            if data.step % cfg.train.log_every == 0:
                bar.set_postfix(samples_s=f"{acc['samples'] / max(acc['compute_s'] + acc['wait_s'], 1e-9):.0f}",
                                **{k.split("/")[-1]: f"{v:.3f}" for k, v in out.logs.items()
                                   if k.startswith("loss/")})
            every = cfg.train.checkpoint_every
            due = bool(every) and self.global_step % every == 0
            signum = self.stop.agreed(self.coll)
            if due or signum:
                self._checkpoint(epoch, pi, data.step + 1, True, acc,
                                 {"streams": {str(p.stream): {"shards": [list(x) for x in p.shards],
                                                              "taken": taken[p.stream]} for p in plans},
                                  "pass_rng": rng.state_dict()})
            if signum:
                bar.close()
                self._preempted(signum, f"epoch {epoch}, pass {pi}, step {data.step + 1}")
            if cfg.train.stop_after_steps and self.global_step >= cfg.train.stop_after_steps:
                bar.close()
                raise RunKilled(f"stopped after {self.global_step} steps (train.stop_after_steps)")
        bar.close()
        if keys_log is not None:
            keys_log.close()

    def _log_writes(self, pi: int, data, writes: Dict) -> None:
        """A step's new per-sample rows -> this rank's write log, each row ordered by
        (pass, step, stream)."""
        if self.step_writes is None:
            raise ValueError(f"method {self.method.name} returned state writes but declares no "
                             "step_state fields")
        for name, values in writes.items():
            part = data.parts[name]
            stream = np.repeat(np.asarray(data.streams, dtype=np.int64), data.sizes[name])
            order = np.stack([np.full(len(part), pi), np.full(len(part), data.step), stream], 1)
            self.step_writes.add(order, part.shards, part.keys, part.Y,
                                 {f: v.detach().cpu().numpy() for f, v in values.items()})

    def _preempted(self, signum: int, where: str) -> None:
        raise Preempted(f"{StopRequest.name(signum)} received: checkpoint written at {where} "
                        f"({self.run_dir}/checkpoints/latest)")

    def _keys_log(self):
        if not self.cfg.train.log_keys:
            return None
        os.makedirs(os.path.join(self.run_dir, "keys"), exist_ok=True)
        return open(os.path.join(self.run_dir, "keys", f"rank_{self.coll.rank}.txt"), "a")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> Dict:
        """Test accuracy of each network and of the ensemble, with the output alignment and without
        (raw_acc); the confusion matrix (C <= 256) of the final prediction."""
        for e in self.engines:
            e.sync_buffers()
        with uneven_forwards(self.engines):
            bias = self._output_bias()
            return self._evaluate(replace(self.stream_ctx, column="", state_version=-1), bias)

    def _output_bias(self) -> Dict[str, torch.Tensor]:
        """Per output (net1, net2, ensemble), the logit bias that aligns its mean prediction on the
        prior sweep's images to train.output_prior ({} when none). Collective."""
        kind = self.cfg.train.output_prior
        if kind == "none":
            return {}
        ctx = replace(self.stream_ctx, column=self.stream_ctx.column if kind == "candidates" else "",
                      state_version=-1)
        logits: Dict[str, List[torch.Tensor]] = {}
        mass = np.zeros(self.K)
        for part, out in self._predict_sweep(ctx, self.prior_sweep, need_label=False):
            for name, o in out.items():
                logits.setdefault(name, []).append(o)
            if part.Y is not None:
                mass += candidate_mass(torch.as_tensor(part.Y))
        prior = target_prior(kind, self.coll.sum(mass) if kind == "candidates" else None, self.K)
        names = sorted(set().union(*self.coll.all_gather_object(sorted(logits))))  # a rank may have none
        empty = torch.zeros(0, self.K, device=self.device)
        return {name: fit_logit_bias(torch.cat(logits.get(name, [empty])), prior, self.coll).to(self.device)
                for name in names}

    def _predict_sweep(self, ctx, shards: List[str], need_label: bool):
        """(the batch's samples as numpy, each output's logits) over `shards`, data problems logged."""
        for b in iterate_sweep(ctx, shards, self.cfg.train.eval_batch_size, image_shape=self.image_shape,
                               need_label=need_label, num_workers=self.cfg.data.num_workers,
                               prefetch=self.cfg.data.prefetch):
            report_events(self.errors, b.errors, self.coll.rank)
            if len(b.part):
                yield b.part, self.method.predict_each(to_device_part(b.part, self.device).x)

    def _evaluate(self, ctx, bias: Dict[str, torch.Tensor]) -> Dict:
        K = self.K
        confusion = np.zeros((K, K), dtype=np.int64) if K <= 256 else None
        correct: Dict[str, int] = {}
        raw: Dict[str, int] = {}
        n = 0
        for part, out in self._predict_sweep(ctx, self.test_sweep, need_label=True):
            true = torch.as_tensor(part.true, device=self.device)
            for name, logits in out.items():
                raw[name] = raw.get(name, 0) + int((logits.argmax(1) == true).sum())
                if name in bias:
                    out[name] = logits = logits + bias[name]
                correct[name] = correct.get(name, 0) + int((logits.argmax(1) == true).sum())
            final = out.get("ensemble", out["net1"]).argmax(1).cpu().numpy()
            if confusion is not None:
                np.add.at(confusion, (part.true, final), 1)
            n += len(part)
        merged: Dict[str, int] = {}
        merged_raw: Dict[str, int] = {}
        for c, r in self.coll.all_gather_object((correct, raw)):
            for k, v in c.items():
                merged[k] = merged.get(k, 0) + v
                merged_raw[k] = merged_raw.get(k, 0) + r[k]
        n = self.coll.sum(n)
        if confusion is not None:
            confusion = self.coll.sum(confusion)
        if n == 0:
            raise ValueError("the test split has no labelled sample to evaluate on")
        return {"acc": {k: v / n for k, v in sorted(merged.items())},
                "raw_acc": {k: v / n for k, v in sorted(merged_raw.items())} if bias else {},
                "bias": {k: v.cpu().tolist() for k, v in sorted(bias.items())},
                "n": n, "confusion": confusion}

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, epoch: int, pi: int, step: int, mid_epoch: bool, acc: Dict,
                    rank_extra: Optional[Dict] = None) -> None:
        """Collective. Mid-epoch, each rank keeps its own BatchNorm buffers (they are averaged at
        pass boundaries only, and a checkpoint must not change the run it saves)."""
        if not mid_epoch:
            for e in self.engines:
                e.sync_buffers()
        meta = {"epoch": epoch, "pass_index": pi, "step": step, "mid_epoch": mid_epoch,
                "global_step": self.global_step, "method": self.method.name,
                "world_size": self.coll.world_size, "streams": self.n_streams,
                "engine": self.engines[0].name, "engine_format": self.engines[0].state_format,
                "state_version": self.version, "config": to_jsonable(to_dict(self.cfg)),
                "epoch_record": to_jsonable(acc.get("record", {}))}
        with full_parameters(self.engines):
            model = {"method": self.method.state_dict(), "engines": [e.state_dict() for e in self.engines]}
        if mid_epoch and self.step_writes is not None:
            self.step_writes.flush()              # the checkpoint counts this rank's chunks
            rank_extra = {**(rank_extra or {}), "writes_seq": self.step_writes.seq}
        rank_state = {"rng": rng_state(), "errors": self.errors.state_dict(),
                      "buffers": self.method.rank_buffers(),
                      "acc": {k: v for k, v in acc.items() if k != "record"}, **(rank_extra or {})}
        engines = self.engines

        def engine_parts(folder: str) -> None:
            for k, e in enumerate(engines):
                e.save_collective(os.path.join(folder, f"engine{k}"))

        save_checkpoint(self.run_dir, self.coll, meta, model, rank_state,
                        keep=self.cfg.train.keep_checkpoints, collective=engine_parts)
        if self.main:
            self.store.prune(kept_state_versions(self.run_dir) | {self.version})
        self.coll.barrier()

    # ------------------------------------------------------------------ the run
    def run(self) -> Dict:
        self._setup()
        cfg, coll = self.cfg, self.coll
        start_epoch, resume = self._start()
        self.log(f"{cfg.train.method}: {self.index['totals']['n']} training samples "
                 f"({len(self.index['shards'])} shards), {self.K} classes, "
                 f"{self.transform.channels}x{self.transform.size}px, backbone {cfg.model.backbone}, "
                 f"device {self.device}, {coll.world_size} rank(s), {self.n_streams} streams")
        log = MetricsLogger(self.run_dir, resume_epoch=start_epoch) if self.main else None
        result = None
        samples_seen = compute_s = wait_s = 0.0
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.time()
            ectx = EpochContext(epoch=epoch, cfg=cfg, coll=coll, device=self.device, store=self.store,
                                version=self.version, index=self.index, stream_ctx=self.stream_ctx,
                                sweep_shards=self.train_sweep, image_shape=self.image_shape,
                                errors=self.errors)
            if resume is None:
                for e in self.engines:
                    e.sync_buffers()
                with uneven_forwards(self.engines):      # sweeps: ranks forward different counts
                    record = {"epoch": epoch, **self.method.begin_epoch(epoch, ectx)}
                self.version, self.index = ectx.version, ectx.index
                acc = {"sums": {}, "counts": {}, "steps": 0, "samples": 0, "compute_s": 0.0,
                       "wait_s": ectx.data_wait_s, "divide_s": time.time() - t0}
                first_pass = 0
            else:
                self.method.epoch = epoch
                record = dict(resume["meta"]["epoch_record"])
                acc = dict(resume["rank"]["acc"])
                first_pass = int(resume["meta"]["pass_index"])
            acc["record"] = record
            passes = self.method.plan_epoch(epoch, ectx)
            if self.step_writes is not None:
                self.step_writes.begin_epoch(epoch, None if resume is None
                                             else resume["rank"].get("writes_seq", 0))
            for pi in range(first_pass, len(passes)):
                self._run_pass(epoch, pi, passes[pi], acc, resume if pi == first_pass else None)
            resume = None
            if self.step_writes is not None:      # this epoch's step writes -> the next version
                self.index = self.step_writes.apply(coll, self.version, self.index, self.train_sweep)
                self.version = int(self.index["version"])
            result = self.evaluate()
            record.update(self._epoch_record(epoch, acc, result, time.time() - t0))
            samples_seen += acc["samples"]
            compute_s += acc["compute_s"]
            wait_s += acc["wait_s"]
            if log is not None:
                log.log_epoch(record)
            self._checkpoint(epoch + 1, 0, 0, False, {})   # named by where the run continues
            signum = self.stop.agreed(coll)
            if signum and epoch + 1 < cfg.train.epochs:
                self._preempted(signum, f"the end of epoch {epoch}")
            accs = "  ".join(f"{k}={v:.2%}" for k, v in result["acc"].items())
            sizes = "  ".join(f"|P{k}|={record[f'n_p_net{k}']}" for k in (1, 2) if f"n_p_net{k}" in record)
            self.log(f"epoch {epoch}: {accs}  {sizes}  {record['samples_per_s']:.0f} samples/s per rank, "
                     f"data wait {record['data_wait_fraction']:.0%} ({record['epoch_s']:.1f}s)")
        if result is None:      # resumed a finished run: evaluate the restored networks
            result = self.evaluate()
        return self._finish(result, log, samples_seen / max(compute_s + wait_s, 1e-9),
                            wait_s / max(compute_s + wait_s, 1e-9))

    def _epoch_record(self, epoch: int, acc: Dict, result: Dict, seconds: float) -> Dict:
        """Per-epoch metrics, averaged over ranks (loss keys may differ between ranks)."""
        coll = self.coll
        sums: Dict[str, float] = {}
        counts: Dict[str, int] = {}
        for r in coll.all_gather_object({"s": acc["sums"], "c": acc["counts"]}):
            for k, v in r["s"].items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + r["c"][k]
        rec = {k: sums[k] / max(counts[k], 1) for k in sorted(sums)}
        for name, a in result["acc"].items():
            rec[f"test_acc_{name}"] = a
        for name, a in result["raw_acc"].items():
            rec[f"raw_test_acc_{name}"] = a
        busy = acc["compute_s"] + acc["wait_s"]
        rec.update({"lr": self.method.lr_at(epoch), "steps": acc["steps"],
                    "samples_per_s": acc["samples"] / max(busy, 1e-9),
                    "data_wait_fraction": acc["wait_s"] / max(busy, 1e-9),
                    "data_wait_s": acc["wait_s"], "compute_s": acc["compute_s"],
                    "divide_s": acc.get("divide_s", 0.0), "epoch_s": seconds,
                    "world_size": coll.world_size})
        return rec

    def _finish(self, result: Dict, log, samples_per_s: float, wait_fraction: float) -> Dict:
        coll = self.coll
        with full_parameters(self.engines):
            in_sync = coll.parameters_in_sync(self.method.networks())
        errors = ErrorLog.combine(coll.all_gather_object(self.errors.state_dict()))
        if not self.main:
            coll.barrier()            # leave together: rank 0 writes the report first
            return {}
        if sum(errors["counts"].values()):
            self.log(f"data problems (all ranks): {errors['counts']} (see report.json)")
        report = build_report(self.cfg, self.manifest, result, self.method,
                              time.time() - self.t_start, self.device, self.config_file, errors,
                              samples_per_s, wait_fraction)
        report.update({"world_size": coll.world_size, "streams": self.n_streams,
                       "engine": self.engines[0].name, "ranks_in_sync": in_sync,
                       "train_samples": int(self.index["totals"]["n"])})
        history = log.history()
        log.close()
        table = write_report(self.run_dir, report, history, result["confusion"], self.manifest.classes)
        print(table, flush=True)
        gain = format_gain(report, emphasis="")
        if gain:
            print(gain, flush=True)
        coll.barrier()
        return report


def build_report(cfg, manifest, result, method, seconds, device, config_file, errors,
                 samples_per_s, wait_fraction) -> Dict:
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
    report["output_prior"] = cfg.train.output_prior
    if result["raw_acc"]:     # the same prediction without the output alignment, and its bias
        report["raw_test_acc"] = result["raw_acc"].get("ensemble", result["raw_acc"]["net1"])
        report["output_bias"] = result["bias"].get("ensemble", result["bias"]["net1"])
    if method.num_networks == 1:
        report["test_acc_net1"] = acc["net1"]
    report.update({"epochs": cfg.train.epochs, "seconds": round(seconds, 1),
                   "samples_per_s": round(samples_per_s, 1),
                   "data_wait_fraction": round(wait_fraction, 4), "device": device,
                   "backbone": cfg.model.backbone, "config_file": config_file,
                   "test_samples": int(result["n"]), "data_errors": errors})
    return report


def train(cfg: Config, device: str) -> Dict:
    trainer = Trainer(cfg, device)
    stop = trainer.stop.install()
    try:
        return trainer.run()
    finally:
        stop.restore()
        # Drop the DDP wrappers (they hold the process group) before anyone destroys the group:
        # a gloo group torn down at interpreter exit can abort the process.
        trainer.__dict__.clear()
        import gc
        gc.collect()
