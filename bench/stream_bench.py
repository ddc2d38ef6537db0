"""Streaming Co-Reg on CPU: throughput with 1 and 2 processes, memory / traffic flat in N, and
the same training under each distributed backend (DDP, DeepSpeed ZeRO-0/1/2/3, accelerate).

    python bench/stream_bench.py                          # N=2000 and 10N=20000, 1 and 2 processes
    python bench/stream_bench.py --n 200 --factor 2 --skip-2proc      # the smoke-test size
    python bench/stream_bench.py --workdir /tmp/sb --n 4000           # pools are reused if present
    python bench/stream_bench.py --queue-size 0 --malloc-mmap-threshold 0     # project defaults as is
    python bench/stream_bench.py --backends-only          # backend axis only (make bench-backends)
    python bench/stream_bench.py --backends-only --backends ddp,zero3 --backend-epochs 2
    python bench/stream_bench.py --backends all           # the N vs 10N study, then the backend axis
    python bench/stream_bench.py --backends-only --repeats 2          # fastest of 2 runs per backend
    python bench/stream_bench.py --backends-only --set train.lr=0.03  # extra config overrides
    python bench/stream_bench.py --n 200 --shard-size 100 --backends-only --backends ddp,zero1,accelerate \\
        --backend-epochs 2                                # the backend smoke-test size

What it does:
  1. writes two synthetic pools with the project's own writers (tests/helpers.make_dataset:
     grey 28x28 PNGs in shards of --shard-size), N and factor x N training samples (more shards
     of the same size; the same fixed test split in both), and a synthetic candidate-set column
     (annotate.cli.annotate_synthetic, q=0.2, eta=0.2, column 'synthetic'); with
     --backends-only, only the N pool;
  2. trains Co-Reg on each pool for --epochs epochs (warm-up, then Co-Reg epochs with co-divide,
     MixUp, prototypes and the contrastive loss from the first Co-Reg epoch) with 1 process and
     with 2 (torchrun --standalone, gloo). The process entry is this file in --worker mode: the
     CLI's own set-up (coreg_dist.runtime.parse_args / setup_process), then a subclass of
     train.trainer.Trainer that changes nothing in training, only observes it: phase-tagged
     Collectives counters, a DDP comm hook (the standard allreduce hook) that counts gradient
     bucket bytes (the engine's traffic), the wire counter (below), per-epoch step / sample /
     wait totals of every rank, and ru_maxrss. Each rank writes RUN/bench/rank_R.json;
  3. prints per-run details, one table, and two verdicts per world size: peak RSS per rank and
     bytes per optimizer step must not grow with N (memory is bounded by buffers, not by N);
  4. with --backends (a list of ddp, zero0, zero1, zero2, zero3, accelerate, or 'all'): trains
     the same Co-Reg with 2 processes on the N pool for --backend-epochs epochs under each
     backend: ddp (torchrun, dist.engine=ddp), zeroK (torchrun, dist.engine=deepspeed
     dist.deepspeed_config=configs/deepspeed/zeroK-fp32.json), accelerate (`accelerate launch
     --config_file configs/accelerate/cpu-2proc.yaml --main_process_port P` this file --worker;
     the trainer picks its accelerate engine), and prints per-backend details and one table:
     samples/s per rank (warm-up / Co-Reg epochs), bytes per optimizer step per rank (engine
     traffic and the method's collectives separately), peak RSS per rank (max over ranks), and
     the ensemble's test accuracy from report.json as a sanity check (every backend trains the
     same networks from the same seeds; they differ in floating-point summation order only), and
     the largest relative difference of the per-epoch training losses from the first backend's
     (metrics.jsonl; at the default size the networks have barely started to learn, so the
     accuracies sit near chance and the losses are the sharper check). With --repeats R each
     backend runs R times, round robin, and the table shows the fastest run: on a shared machine
     samples/s follow the other processes' load (printed per run; a NOTE says when it was above
     the CPU count); bytes, RSS and losses do not.

The wire counter (how bytes are counted, the same way for every backend): before anything
imports DeepSpeed or accelerate, the worker wraps the collectives of torch.distributed where
they live (torch.distributed and torch.distributed.distributed_c10d: all_reduce, reduce,
broadcast, all_gather, all_gather_into_tensor, reduce_scatter_tensor, reduce_scatter, the
_base / coalesced variants, all_to_all, gather, scatter, send, and the object collectives), and
after set-up it checks that nothing of DeepSpeed, accelerate or the project holds an unwrapped
reference (DeepSpeed's comm backend resolves all_gather_into_tensor / reduce_scatter_tensor
once, when it is made: after the wrap, so it holds the wrappers; the details line says so, and
any reference found is wrapped then and listed). A call counts the bytes this rank contributes,
once, at the outermost call: its input tensors (broadcast and scatter only on the source rank).
That is not what a ring algorithm puts on the wire: for W ranks an all-reduce of S bytes sends
about 2(W-1)/W x S per rank, a reduce-scatter of S bytes (W-1)/W x S, an all-gather of S-byte
parts (W-1) x S. Calls are tagged 'method' when the caller is the project's Collectives (coreg_dist.dist: Co-Reg's key and
feature gathers and the all-reduce of their gradients, BN buffer averaging, counts) and
'engine' otherwise (DeepSpeed's reduce-scatters / all-reduces / all-gathers / broadcasts, and
DDP's gradient buckets, which reach torch.distributed as Python calls because the worker
registers torch's standard allreduce comm hook on DDP-wrapped networks: plain DDP and
accelerate's; the hook's own bucket count is a cross-check). Bytes per optimizer step count the
calls made between the method's update and the end of after_step (forward, backward, optimizer
step, EMA key-encoder update), divided by the steps.

The N vs 10N comparison is only meaningful if every bounded buffer is already full at N, so by
default the shuffle buffer is 256 samples per stream and route and the MoCo queue 2048 keys (the
method's 8192 is not full after one Co-Reg epoch on 2000 samples; its fill level adds to RSS
until it is), and peak RSS comes from separate memory runs with a fixed glibc mmap threshold
(glibc's dynamic threshold keeps freed blocks of the co-divide batches in the heap, a peak that
grows with the number of iterations, not with what is held; the fixed threshold page-faults
every large tensor, so samples/s come from throughput runs with glibc's defaults). `--queue-size
0 --malloc-mmap-threshold 0` measures the project defaults as they are, one run per
configuration. The backend axis makes one run per backend (glibc's defaults): every backend makes
the same number of steps, so the allocator's effect is alike, and peak RSS includes each
backend's imports (DeepSpeed's are the largest; the details give RSS after set-up too).

Numbers are per rank (each rank's own samples, time and peak RSS; the tables show the largest
over ranks where they say max) and per optimizer step (bytes this rank contributes to a
collective in one step; the study's table: `Collectives.bytes_sent`, which counts in 1 process
too, where nothing crosses a wire). samples/s count the training epochs only: process start,
imports, DeepSpeed's one-off op build (~25-60 s the first time on a machine, then cached in
~/.cache/torch_extensions), engine set-up, co-divide and evaluation are outside. The exit
status is 0 whatever the verdicts: it is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

POOL_MARK = "bench_pool.json"
KINDS = ("all_reduce", "all_gather", "object")


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2 ** 20


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


# =========================================================================== wire counter
# Every collective any backend makes reaches torch.distributed as a Python call (DDP's reducer
# only once the standard allreduce comm hook is registered, which the worker does): the
# functions below are wrapped where they live (torch.distributed and its distributed_c10d
# module) before anything imports DeepSpeed or accelerate, so every backend is counted the same
# way. Bytes = what this rank contributes: the input tensor(s); for broadcast and scatter only on
# the source rank. Nested calls (all_gather_object calls all_gather, _all_gather_base calls
# all_gather_into_tensor) count once, at the outermost. Object collectives count calls only
# (their pickled size is in the Collectives counters).
WIRE_INPUTS = {           # function -> the argument(s) holding this rank's contribution
    "all_reduce": "tensor", "reduce": "tensor", "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor", "_all_gather_base": "input_tensor",
    "all_gather_coalesced": "input_tensor_list", "reduce_scatter_tensor": "input",
    "_reduce_scatter_base": "input", "reduce_scatter": "input_list",
    "all_reduce_coalesced": "tensors", "all_to_all_single": "input", "all_to_all": "input_tensor_list",
    "gather": "tensor", "send": "tensor", "isend": "tensor",
    "broadcast": "tensor@src", "scatter": "scatter_list@src",
}
WIRE_OBJECTS = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
_WIRE: Dict = {"sink": None, "originals": {}, "wrappers": {}}
_WIRE_TLS = threading.local()
METHOD_MODULE = "coreg_dist.dist"     # the project's Collectives (the method's and trainer's collectives)


def _nbytes(x) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    if hasattr(x, "numel") and hasattr(x, "element_size"):
        return int(x.numel() * x.element_size())
    return 0


def _wire_origin() -> str:
    """'method' when the call comes from the project's Collectives (coreg_dist.dist: the
    method's gathers / all-reduces, buffer averaging, the trainer's counts), else 'engine'
    (DDP's gradient buckets, DeepSpeed, accelerate)."""
    f = sys._getframe(2)
    for _ in range(80):
        if f is None:
            break
        if f.f_globals.get("__name__") == METHOD_MODULE:
            return "method"
        f = f.f_back
    return "engine"


def _wire_wrapper(name: str, orig):
    import functools
    import inspect
    sig = inspect.signature(orig)
    spec = WIRE_INPUTS.get(name)

    def contribution(args, kwargs) -> int:
        if spec is None:
            return 0
        b = sig.bind(*args, **kwargs).arguments
        arg, _, src = spec.partition("@")
        if src:
            import torch.distributed as tdist
            if b.get("src") is not None:
                if b["src"] != tdist.get_rank():
                    return 0
            elif b.get("group_src") is not None and b["group_src"] != tdist.get_rank(b.get("group")):
                return 0
        return _nbytes(b.get(arg))

    @functools.wraps(orig)
    def wrapper(*args, **kwargs):
        depth = getattr(_WIRE_TLS, "depth", 0)
        sink = _WIRE["sink"]
        if depth == 0 and sink is not None:
            try:
                n = contribution(args, kwargs)
            except TypeError:
                n = -1
            sink(name, _wire_origin(), n)
        _WIRE_TLS.depth = depth + 1
        try:
            return orig(*args, **kwargs)
        finally:
            _WIRE_TLS.depth = depth

    wrapper._bench_wire = name
    return wrapper


def install_wire_counter() -> None:
    """Wrap the torch.distributed collectives (both namespaces); call before DeepSpeed is imported."""
    import torch.distributed as tdist
    import torch.distributed.distributed_c10d as c10d
    if _WIRE["originals"]:
        return
    for name in (*WIRE_INPUTS, *WIRE_OBJECTS):
        orig = getattr(c10d, name, None)
        if orig is None:
            continue
        w = _wire_wrapper(name, orig)
        _WIRE["originals"][id(orig)] = (name, orig)
        _WIRE["wrappers"][name] = w
        setattr(c10d, name, w)
        if getattr(tdist, name, None) is orig:
            setattr(tdist, name, w)


def wire_check() -> Dict:
    """After set-up: which loaded modules and objects of DeepSpeed / accelerate / this project
    still hold an unwrapped torch.distributed function (a reference taken before the wrap, e.g.
    `from torch.distributed import all_reduce`, or DeepSpeed's TorchBackend.all_gather_function /
    reduce_scatter_function, taken when its comm backend is made). Each is replaced by the
    wrapper; the answer lists what was found, and how DeepSpeed's comm backend resolves."""
    originals = _WIRE["originals"]
    found = []
    for modname, mod in list(sys.modules.items()):
        if mod is None or not modname.split(".")[0] in ("deepspeed", "accelerate", "coreg_dist", "train"):
            continue
        for attr, val in list(vars(mod).items()):
            hit = originals.get(id(val))
            if hit is not None and hit[1] is val:
                setattr(mod, attr, _WIRE["wrappers"][hit[0]])
                found.append(f"{modname}.{attr}")
    out: Dict = {"patched_late": found, "deepspeed_comm": None}
    dsc = sys.modules.get("deepspeed.comm.comm")
    cdb = getattr(dsc, "cdb", None) if dsc is not None else None
    if cdb is not None:
        resolved = {}
        for attr, val in list(vars(cdb).items()):
            hit = originals.get(id(val))
            if hit is not None and hit[1] is val:
                setattr(cdb, attr, _WIRE["wrappers"][hit[0]])
                found.append(f"deepspeed.comm.comm.cdb.{attr}")
        for attr in ("all_gather_function", "reduce_scatter_function"):
            f = getattr(cdb, attr, None)
            resolved[attr] = (f"wrapped torch.distributed.{f._bench_wire}" if hasattr(f, "_bench_wire")
                              else repr(f))
        resolved["backend"] = type(cdb).__name__
        out["deepspeed_comm"] = resolved
    return out


# =========================================================================== worker (one rank)
def _bench_trainer_class():
    import torch
    from train.trainer import Trainer

    class BenchTrainer(Trainer):
        """The real Trainer; the overrides only tag phases and record what happened."""

        def __init__(self, cfg, device):
            super().__init__(cfg, device)
            self.bench = {"phases": {}, "steps": {}, "epochs": [], "rss": [], "routed_min": {}}
            self._phase = "setup"
            coll = self.coll
            count = coll._count

            def counted(kind, nbytes):
                count(kind, nbytes)
                # Collectives counts objects by their pickled size, under "object".
                self._add("object_pickled" if kind == "object" else kind, int(nbytes))

            coll._count = counted
            self.bench["wire_calls"] = {}
            _WIRE["sink"] = self._wire

        # ------------------------------------------------------------ recording
        def _add(self, key: str, nbytes: int) -> None:
            ph = self.bench["phases"].setdefault(self._phase, {})
            calls_bytes = ph.setdefault(key, [0, 0])
            calls_bytes[0] += 1
            calls_bytes[1] += nbytes

        def _snap(self, where: str) -> None:
            self.bench["rss"].append({"at": where, "peak_mib": peak_rss_mib(),
                                      "current_mib": current_rss_mib()})

        def _wire(self, fn: str, origin: str, nbytes: int) -> None:
            """One call into torch.distributed (see install_wire_counter), by origin: 'method'
            (the project's Collectives) or 'engine' (DDP buckets, DeepSpeed, accelerate)."""
            nbytes = max(nbytes, 0)
            if fn not in WIRE_OBJECTS:
                self._add(f"wire:{origin}", nbytes)
            self._add(f"wire:{origin}:{fn}", nbytes)
            if fn in ("all_reduce", "all_gather"):        # the 1-process / 2-process study's keys
                self._add(f"wire_{fn}", nbytes)
            cb = self.bench["wire_calls"].setdefault(f"{origin}:{fn}", [0, 0])
            cb[0] += 1
            cb[1] += nbytes

        # ------------------------------------------------------------ phases
        def _setup(self) -> None:
            super()._setup()
            self.bench["wire_check"] = wire_check()
            self._snap("after set-up (model, engines)")
            m = self.method
            update, after_step, begin_epoch = m.update, m.after_step, m.begin_epoch

            def tagged_update(batch):
                kind = batch.spec.name.split("_")[0]          # warmup_net1 -> warmup, train_net2 -> train
                self._phase = "step:" + kind
                st = self.bench["steps"].setdefault(kind, {"steps": 0, "samples": 0, "parts": {}})
                st["steps"] += 1
                for name, part in batch.parts.items():
                    st["samples"] += len(part)
                    st["parts"][name] = st["parts"].get(name, 0) + len(part)
                return update(batch)

            def tagged_after_step(batch, out):
                try:
                    return after_step(batch, out)
                finally:
                    self._phase = "in passes, between steps (BN buffer averaging at pass starts)"

            def tagged_begin_epoch(epoch, ctx):
                self._phase = "co-divide"
                try:
                    return begin_epoch(epoch, ctx)
                finally:
                    self._phase = "after co-divide (BN buffer averaging at the first pass start)"
                    if not getattr(self.method, "in_warmup", lambda e: True)(epoch):
                        self._snap(f"after co-divide {epoch}")

            m.update, m.after_step, m.begin_epoch = tagged_update, tagged_after_step, tagged_begin_epoch
            from torch.nn.parallel import DistributedDataParallel as DDP
            for e in self.engines:
                if isinstance(e.model, DDP):
                    e.model.register_comm_hook(None, self._ddp_hook)

        def _ddp_hook(self, state, bucket):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
            buf = bucket.buffer()
            self._add("ddp_grad_all_reduce", buf.numel() * buf.element_size())
            return allreduce_hook(None, bucket)

        def _start(self):
            self._phase = "init scan (state v0)"
            out = super()._start()
            self._snap("after init scan")
            self._phase = "setup"
            return out

        def _stream_plans(self, epoch, pi, spec, resume):
            plans = super()._stream_plans(epoch, pi, spec, resume)
            # Fewest samples routed to one stream and route: the shuffle buffer holds
            # min(data.shuffle_buffer, that), so it is full only if that is >= the buffer.
            kind = spec.name.split("_")[0]
            low = self.bench["routed_min"]
            for p in plans:
                for r, c in zip(spec.routes, p.counts):
                    key = f"{kind}:{r.name}"
                    low[key] = min(low.get(key, int(c)), int(c))
            return plans

        def _run_pass(self, epoch, pi, spec, acc, resume):
            out = super()._run_pass(epoch, pi, spec, acc, resume)
            self._snap(f"after {spec.name} {epoch}")
            return out

        def evaluate(self):
            self._phase = "evaluate"
            try:
                return super().evaluate()
            finally:
                self._phase = "between epochs"

        def _checkpoint(self, *a, **k):
            prev, self._phase = self._phase, "checkpoint"
            try:
                return super()._checkpoint(*a, **k)
            finally:
                self._phase = prev

        def _epoch_record(self, epoch, acc, result, seconds):
            prev, self._phase = self._phase, "epoch record"
            rec = super()._epoch_record(epoch, acc, result, seconds)
            self._phase = prev
            warm = bool(getattr(self.method, "in_warmup", lambda e: False)(epoch))
            self.bench["epochs"].append({
                "epoch": epoch, "warmup": warm, "steps": acc["steps"], "samples": acc["samples"],
                "compute_s": acc["compute_s"], "wait_s": acc["wait_s"],
                "divide_s": acc.get("divide_s", 0.0), "epoch_s": seconds,
                "samples_per_s": rec["samples_per_s"], "data_wait_fraction": rec["data_wait_fraction"]})
            self._snap(f"after epoch {epoch}")
            return rec

        def _finish(self, *a, **k):
            self._phase = "finish (report)"
            return super()._finish(*a, **k)

        def bench_record(self) -> Dict:
            self._snap("end of run")
            return {"rank": self.coll.rank, "world_size": self.coll.world_size,
                    "torch_threads": torch.get_num_threads(), "global_step": self.global_step,
                    "n_streams": self.n_streams, "train_samples": int(self.index["totals"]["n"]),
                    "shards": len(self.index["shards"]), "peak_rss_mib": peak_rss_mib(),
                    "bytes_sent": dict(self.coll.bytes_sent), "calls": dict(self.coll.calls),
                    "queue_filled": [int(q.filled) for q in getattr(self.method, "queues", [])],
                    "queue_size": int(self.cfg.coreg.queue_size) if "coreg" in self.cfg else 0,
                    "params_per_net": [sum(int(getattr(p, "ds_numel", p.numel())) for p in n.parameters())
                                       for n in self.method.networks()],
                    "engine": self.engines[0].name,
                    "zero_stage": getattr(self.engines[0], "stage", None),
                    **self.bench}

    return BenchTrainer


def worker_main(argv: List[str]) -> int:
    from coreg_dist.dist import shutdown_distributed
    from coreg_dist.runtime import parse_args, setup_process

    parser = argparse.ArgumentParser(prog="stream_bench --worker")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--result-dir", required=True)
    cfg, args = parse_args(argv, "stream_bench worker", parser)
    install_wire_counter()            # before the engines import DeepSpeed / accelerate
    device = setup_process(cfg)
    trainer = _bench_trainer_class()(cfg, device)
    try:
        report = trainer.run() or {}
        rec = trainer.bench_record()
        rec["report"] = {k: report[k] for k in ("engine", "world_size", "test_acc", "test_acc_net1",
                                                "test_acc_net2", "test_acc_ensemble", "ranks_in_sync")
                         if k in report}
        os.makedirs(args.result_dir, exist_ok=True)
        path = os.path.join(args.result_dir, f"rank_{rec['rank']}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(path + ".tmp", path)
    finally:
        # As train.trainer.train does: drop the DDP wrappers before the group goes away.
        trainer.__dict__.clear()
        import gc
        gc.collect()
        shutdown_distributed()
    return 0


# =========================================================================== orchestration
def make_pool(root: str, n: int, a) -> float:
    """A synthetic pool of n training samples (+ the fixed test split) with its label column;
    reused when its marker says it was built with the same parameters."""
    want = {"n_train": n, "n_test": a.n_test, "classes": a.classes, "shard_size": a.shard_size,
            "size": a.size, "q": 0.2, "eta": 0.2, "column": "synthetic"}
    mark = os.path.join(root, POOL_MARK)
    if os.path.isfile(mark):
        with open(mark) as f:
            if json.load(f) == want:
                return 0.0
    import shutil
    from annotate.cli import annotate_synthetic
    from coreg_dist.config import load_config
    from tests.helpers import make_dataset

    t0 = time.time()
    shutil.rmtree(root, ignore_errors=True)
    make_dataset(root, n_train=n, n_test=a.n_test, num_classes=a.classes, shard_size=a.shard_size,
                 size=a.size)
    annotate_synthetic(load_config(None, [f"data.root={root}", f"run.out_dir={root}/annotation",
                                          "synthetic.q=0.2", "synthetic.eta=0.2"]))
    with open(mark, "w") as f:
        json.dump(want, f)
    return time.time() - t0


def overrides(a, pool: str, out: str, epochs: Optional[int] = None) -> List[str]:
    return [f"data.root={pool}", f"run.out_dir={out}", "run.device=cpu", "train.column=synthetic",
            f"train.epochs={epochs or a.epochs}", "coreg.warm_up=1", "coreg.feature_start=0",
            f"train.batch_size={a.batch_size}", "model.backbone=small_cnn",
            f"data.streams={a.streams}", f"run.threads={a.threads}",
            f"train.eval_batch_size={a.eval_batch_size}", f"data.shuffle_buffer={a.shuffle_buffer}",
            "data.num_workers=0"] + ([f"coreg.queue_size={a.queue_size}"] if a.queue_size > 0 else []) + list(a.set)


# The backend axis: name -> (launcher, config overrides). Every one trains the same networks.
BACKENDS = {
    "ddp": ("torchrun", ["dist.engine=ddp"]),
    **{f"zero{k}": ("torchrun", ["dist.engine=deepspeed",
                                 f"dist.deepspeed_config=configs/deepspeed/zero{k}-fp32.json"])
       for k in range(4)},
    # `accelerate launch` sets ACCELERATE_MIXED_PRECISION: dist.engine=auto picks accelerate.
    "accelerate": ("accelerate", []),
}
ACCELERATE_CONFIG = "configs/accelerate/cpu-2proc.yaml"


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_training(a, world: int, pool: str, out: str, mmap_threshold: int = 0,
                 backend: Optional[str] = None, epochs: Optional[int] = None) -> Dict:
    """One training run (world 1: this file --worker; world 2: torchrun, or `accelerate launch`
    for backend 'accelerate'); returns the ranks' records. `mmap_threshold` > 0 sets
    MALLOC_MMAP_THRESHOLD_ in the training processes (memory runs); `backend` is a BACKENDS key."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    res = os.path.join(out, "bench")
    launcher, extra = BACKENDS[backend] if backend else ("torchrun", [])
    entry = [os.path.abspath(__file__), "--worker", f"--result-dir={res}",
             *overrides(a, pool, out, epochs), *extra]
    if world == 1:
        cmd = [sys.executable, *entry]
    elif launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, ACCELERATE_CONFIG), "--num_processes", str(world),
               "--main_process_port", str(free_port()), *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={world}", *entry]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    log = os.path.join(out, "bench_log.txt")
    t0 = time.time()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                           timeout=a.timeout)
    wall = time.time() - t0
    ranks = []
    for rank in range(world):
        p = os.path.join(res, f"rank_{rank}.json")
        if os.path.isfile(p):
            with open(p) as f:
                ranks.append(json.load(f))
    if r.returncode != 0 or len(ranks) != world:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"training (world {world}{', ' + backend if backend else ''}) exited {r.returncode}; command:\n  "
                           f"{' '.join(shlex.quote(c) for c in cmd)}\nlog {log} ends:\n{tail}")
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    history = []
    metrics = os.path.join(out, "metrics.jsonl")      # rank 0's per-epoch record (losses averaged over ranks)
    if os.path.isfile(metrics):
        with open(metrics) as f:
            history = [json.loads(line) for line in f if line.strip()]
    return {"world": world, "wall_s": wall, "ranks": ranks, "cmd": cmd, "log": log, "load": (load0, load1),
            "backend": backend, "history": history}


# --------------------------------------------------------------------------- summaries
def step_bytes(rank: Dict, kind: str, key: str) -> float:
    """Bytes of `key` per optimizer step of pass kind `kind` (warmup / train) on this rank."""
    st = rank["steps"].get(kind)
    if not st or not st["steps"]:
        return float("nan")
    cb = rank["phases"].get(f"step:{kind}", {}).get(key, [0, 0])
    return cb[1] / st["steps"]


def epoch_rate(rank: Dict, warmup: bool):
    eps = [e for e in rank["epochs"] if e["warmup"] == warmup]
    if not eps:
        return float("nan"), float("nan"), 0, 0
    samples = sum(e["samples"] for e in eps)
    busy = sum(e["compute_s"] + e["wait_s"] for e in eps)
    wait = sum(e["wait_s"] for e in eps)
    return samples / max(busy, 1e-9), wait / max(busy, 1e-9), sum(e["steps"] for e in eps), samples


def summarize(run: Dict) -> Dict:
    ranks = run["ranks"]
    s = {"world": run["world"], "wall_s": run["wall_s"], "load": run["load"], "N": ranks[0]["train_samples"],
         "shards": ranks[0]["shards"], "steps": ranks[0]["global_step"],
         "threads": ranks[0]["torch_threads"],
         "peak_rss": max(r["peak_rss_mib"] for r in ranks),
         "peak_rss_each": [r["peak_rss_mib"] for r in ranks]}
    for warm, tag in ((True, "warmup"), (False, "coreg")):
        rates = [epoch_rate(r, warm) for r in ranks]
        s[f"sps_{tag}"] = [x[0] for x in rates]
        s[f"wait_{tag}"] = [x[1] for x in rates]
        s[f"steps_{tag}"] = rates[0][2]
    for kind in ("warmup", "train"):
        for key in ("all_reduce", "all_gather", "ddp_grad_all_reduce", "wire_all_reduce",
                    "wire_all_gather", "wire:engine", "wire:method"):
            s[f"{kind}:{key}"] = [step_bytes(r, kind, key) for r in ranks]
        # per torch.distributed function, per step: {origin:fn: ([calls per rank], [bytes per rank])}
        per_fn: Dict = {}
        for i, r in enumerate(ranks):
            st = r["steps"].get(kind)
            for key, (calls, nbytes) in r["phases"].get(f"step:{kind}", {}).items():
                if key.count(":") == 2 and key.startswith("wire:") and st and st["steps"]:
                    c, b = per_fn.setdefault(key[5:], ([0.0] * len(ranks), [0.0] * len(ranks)))
                    c[i], b[i] = calls / st["steps"], nbytes / st["steps"]
        s[f"{kind}:wire_fns"] = per_fn
        st = ranks[0]["steps"].get(kind, {"steps": 0, "samples": 0, "parts": {}})
        s[f"{kind}:samples_per_step"] = st["samples"] / st["steps"] if st["steps"] else float("nan")
        s[f"{kind}:parts_per_step"] = {p: v / st["steps"] for p, v in st["parts"].items()} if st["steps"] else {}
    outside = {}
    for r in ranks[:1]:
        for ph, d in r["phases"].items():
            if ph.startswith("step:"):
                continue
            for key, (calls, nbytes) in d.items():
                o = outside.setdefault(ph, {})
                o[key] = (calls, nbytes)
    s["outside_rank0"] = outside
    s["rss_trace_rank0"] = ranks[0]["rss"]
    s["params_per_net"] = ranks[0]["params_per_net"]
    s["queue_filled"], s["queue_size"] = ranks[0].get("queue_filled", []), ranks[0].get("queue_size", 0)
    s["routed_min"] = ranks[0].get("routed_min", {})
    s["backend"] = run.get("backend")
    s["history"] = [{k: v for k, v in r.items() if k == "epoch" or k.startswith(("loss/", "test_acc"))}
                    for r in run.get("history", [])]
    s["engine"] = ranks[0].get("engine", "?")
    s["zero_stage"] = ranks[0].get("zero_stage")
    s["report"] = next((r["report"] for r in ranks if r.get("report")), {})
    s["rss_setup_each"] = [r["rss"][0]["current_mib"] if r.get("rss") else float("nan") for r in ranks]
    s["wire_check"] = [r.get("wire_check", {}) for r in ranks]
    s["wire_calls_rank0"] = ranks[0].get("wire_calls", {})
    return s


def fmt_b(x: float) -> str:
    if x != x:
        return "-"
    return f"{x:,.0f}"


def fmt_list(xs: List[float], f: str = "{:.0f}") -> str:
    return " / ".join(f.format(x) if x == x else "-" for x in xs)


def print_run(sp: Dict, s: Dict, n_target: int, pinned: bool) -> None:
    """`sp`: the throughput run; `s`: the memory run (the same run when nothing is pinned)."""
    w = s["world"]
    rk = "rank 0 / rank 1" if w > 1 else "rank 0"
    walls = (f"throughput run {sp['wall_s']:.1f}s, memory run {s['wall_s']:.1f}s" if pinned
             else f"{s['wall_s']:.1f}s")
    print(f"\n--- world size {w}, N = {n_target} ({s['N']} training samples in {s['shards']} shards); "
          f"wall {walls} (incl. process start, init scan, co-divide, evaluation, checkpoints); "
          f"1-min load average {sp['load'][0]:.2f} before, {sp['load'][1]:.2f} after the throughput run")
    print(f"  optimizer steps per rank: {s['steps']} ({s['steps_warmup']} warm-up, {s['steps_coreg']} Co-Reg); "
          f"torch threads per rank: {s['threads']}")
    print(f"  samples/s per rank [{rk}]: warm-up epochs {fmt_list(sp['sps_warmup'])}, "
          f"Co-Reg epochs {fmt_list(sp['sps_coreg'])}")
    print(f"  data-wait fraction per rank [{rk}]: warm-up {fmt_list(sp['wait_warmup'], '{:.1%}')}, "
          f"Co-Reg {fmt_list(sp['wait_coreg'], '{:.1%}')}")
    if pinned:
        print(f"  peak RSS per rank (MiB) [{rk}]: memory run {fmt_list(s['peak_rss_each'], '{:.1f}')}; "
              f"throughput run (glibc's dynamic mmap threshold) {fmt_list(sp['peak_rss_each'], '{:.1f}')}")
    else:
        print(f"  peak RSS per rank (MiB) [{rk}]: {fmt_list(s['peak_rss_each'], '{:.1f}')}")
    if s["queue_filled"]:
        print(f"  MoCo queues at the end (rank 0): filled {' / '.join(map(str, s['queue_filled']))} of "
              f"{s['queue_size']} each")
    trace = ", ".join(f"{t['at']}: {t['peak_mib']:.0f} / {t['current_mib']:.0f}"
                      for t in s["rss_trace_rank0"])
    print(f"  rank 0 RSS{' (memory run)' if pinned else ''}, peak so far / current (MiB): {trace}")
    for kind, label in (("warmup", "warm-up step"), ("train", "Co-Reg step")):
        parts = ", ".join(f"{p}={v:.0f}" for p, v in s[f"{kind}:parts_per_step"].items())
        print(f"  per {label} (rank 0, {s[kind + ':samples_per_step']:.0f} samples: {parts}): "
              f"Collectives all-reduce {fmt_b(s[kind + ':all_reduce'][0])} B, "
              f"all-gather {fmt_b(s[kind + ':all_gather'][0])} B"
              + (f" (the all-reduce is the backward of the queries gathered with their gradient); "
                 f"the engine's DDP gradient buckets {fmt_b(s[kind + ':ddp_grad_all_reduce'][0])} B "
                 f"all-reduced; as handed to torch.distributed: all_reduce "
                 f"{fmt_b(s[kind + ':wire_all_reduce'][0])} B, all_gather "
                 f"{fmt_b(s[kind + ':wire_all_gather'][0])} B" if w > 1 else ""))
    if pinned:
        keys = [f"{k}:{c}" for k in ("warmup", "train") for c in ("all_reduce", "all_gather", "ddp_grad_all_reduce")]
        diff = [k for k in keys if fmt_list(sp[k]) != fmt_list(s[k])]
        print("  bytes per step of the throughput run: " +
              ("the same as the memory run's" if not diff else f"DIFFER from the memory run's in {diff}"))
    print("  collectives outside optimizer steps, whole run, rank 0 (calls / bytes this rank contributed):")
    label = {"all_reduce": "Collectives all-reduce", "all_gather": "Collectives all-gather",
             "object_pickled": "object gathers (pickled size)",
             "wire_all_reduce": "torch.distributed.all_reduce input",
             "wire_all_gather": "torch.distributed.all_gather input"}
    for ph, d in s["outside_rank0"].items():
        items = ", ".join(f"{label[k]} {c} / {fmt_b(b)} B" for k, (c, b) in sorted(d.items()) if k in label)
        print(f"    {ph}: {items}")


def check_flat(a, small: Dict, big: Dict) -> List[str]:
    """PASS/FAIL lines: peak RSS per rank and bytes per step of the big pool vs the small one."""
    w = small["world"]
    lines = []
    # --- memory
    base, grown = small["peak_rss"], big["peak_rss"]
    allowed = min(base * (1 + a.rss_tol_pct / 100.0), base + a.rss_tol_mib)
    extra = big["N"] - small["N"]
    sens = (allowed - base) * 2 ** 20 / max(extra, 1)
    ok = grown <= allowed
    notes = []
    qf, qs = small["queue_filled"], small["queue_size"]
    if qf and min(qf) < qs:
        notes.append(f"NOTE  world {w}: at N={small['N']} the MoCo queues held only {' / '.join(map(str, qf))} of "
                     f"{qs} keys; the contrastive working set and the queue's pages keep growing until they "
                     f"are full, so part of any RSS growth is that bounded fill (see --queue-size)")
    for key, c in sorted(small["routed_min"].items()):
        if c < a.shuffle_buffer:
            notes.append(f"NOTE  world {w}: at N={small['N']} a stream of route {key} had {c} samples < "
                         f"shuffle_buffer={a.shuffle_buffer}: that buffer was not full at N (see --shuffle-buffer)")
    lines.append(f"{'PASS' if ok else 'FAIL'}  world {w}: peak RSS per rank (max over ranks) "
                 f"{base:.1f} MiB at N={small['N']} -> {grown:.1f} MiB at N={big['N']} "
                 f"({grown - base:+.1f} MiB, {100 * (grown / base - 1):+.1f}%); allowed "
                 f"<= {allowed:.1f} MiB (+{a.rss_tol_pct:g}% or +{a.rss_tol_mib:g} MiB, whichever is "
                 f"smaller). An O(N) term above {sens:,.0f} B/sample would fail this.")
    # --- bytes per step, per pass kind and key
    bad, shown = [], []
    for kind in ("warmup", "train"):
        ns, nb = small[f"{kind}:samples_per_step"], big[f"{kind}:samples_per_step"]
        comp = abs(nb / ns - 1) if ns == ns and nb == nb and ns else 0.0
        keys = ["all_reduce", "all_gather"] + (["ddp_grad_all_reduce"] if w > 1 else [])
        for key in keys:
            for r, (x, y) in enumerate(zip(small[f"{kind}:{key}"], big[f"{kind}:{key}"])):
                if x != x and y != y:
                    continue
                if x == 0 and y == 0:
                    rel = 0.0
                else:
                    rel = abs(y / x - 1) if x else float("inf")
                if rel > comp + 1e-9:
                    bad.append(f"{kind}/{key}/rank{r}: {fmt_b(x)} -> {fmt_b(y)} B/step")
                if r == 0:
                    shown.append(f"{'Co-Reg' if kind == 'train' else 'warm-up'} {key} {fmt_b(x)} -> {fmt_b(y)}")
    comp_txt = ", ".join(f"{'Co-Reg' if k == 'train' else 'warm-up'} {small[k + ':samples_per_step']:.0f} -> "
                         f"{big[k + ':samples_per_step']:.0f} samples/step" for k in ("warmup", "train"))
    lines.append(f"{'PASS' if not bad else 'FAIL'}  world {w}: bytes per optimizer step, N={small['N']} -> "
                 f"N={big['N']} (rank 0): {'; '.join(shown)}. Tolerance: equal up to the relative change "
                 f"in samples per step ({comp_txt})." + (f" Differs: {'; '.join(bad)}" if bad else ""))
    return lines + notes


def run_study(a, pools: Dict, sizes: List[int], worlds: List[int]) -> None:
    """The N vs factor x N study with 1 and 2 processes (DDP): details, table, flat-in-N verdicts."""
    pinned = a.malloc_mmap_threshold > 0
    speed: Dict = {}          # throughput runs: the allocator as the environment has it
    mem: Dict = {}            # memory runs: MALLOC_MMAP_THRESHOLD_ pinned (the same runs if not)
    for w in worlds:
        for n in sizes:
            out = os.path.join(a.workdir, "runs", f"w{w}_n{n}")
            print(f"training: world size {w}, N={n}{' throughput run' if pinned else ''} -> {out} ...", flush=True)
            speed[(w, n)] = summarize(run_training(a, w, pools[n], out))
            print(f"  done in {speed[(w, n)]['wall_s']:.1f}s", flush=True)
            if pinned:
                out = os.path.join(a.workdir, "runs", f"w{w}_n{n}_mem")
                print(f"training: world size {w}, N={n} memory run -> {out} ...", flush=True)
                mem[(w, n)] = summarize(run_training(a, w, pools[n], out, a.malloc_mmap_threshold))
                print(f"  done in {mem[(w, n)]['wall_s']:.1f}s", flush=True)
            else:
                mem[(w, n)] = speed[(w, n)]

    print("\n== details ==")
    print("samples/s per rank = training samples this rank fed to optimizer steps / (its step compute "
          "+ data wait); data-wait fraction = wait / (compute + wait). Co-divide and evaluation time "
          "are not in the denominator (their data wait is, as the trainer's metrics.jsonl counts it).")
    if pinned:
        print(f"Each configuration runs twice: a throughput run (samples/s, data wait) with glibc's malloc "
              f"defaults, and a memory run (peak RSS, bytes) with MALLOC_MMAP_THRESHOLD_="
              f"{a.malloc_mmap_threshold}, which returns every freed block of that size or more to the OS "
              f"(and costs speed: page faults on every large tensor).")
    for key in sorted(mem):
        print_run(speed[key], mem[key], key[1], pinned)

    print("\n== table (per rank; bytes per optimizer step from the Collectives counters, warm-up step / "
          "Co-Reg step; RSS = max over ranks) ==")
    rss_h = "peak RSS MiB" + (" mem/thr" if pinned else "")
    hdr = (f"{'world':>5} {'N':>7} {'steps':>6} {'samples/s/rank':>16} {'data-wait':>13} "
           f"{rss_h:>20} {'all-reduce B/step':>18} {'all-gather B/step':>18} {'DDP grad B/step':>18}")
    print(hdr)
    print("-" * len(hdr))
    for (w, n), s in sorted(mem.items()):
        sp = speed[(w, n)]
        sps = f"{sum(sp['sps_warmup']) / w:.0f} / {sum(sp['sps_coreg']) / w:.0f}"
        wait = f"{sum(sp['wait_warmup']) / w:.1%} / {sum(sp['wait_coreg']) / w:.1%}"
        rss = f"{s['peak_rss']:.1f} / {sp['peak_rss']:.1f}" if pinned else f"{s['peak_rss']:.1f}"
        ar = f"{fmt_b(s['warmup:all_reduce'][0])} / {fmt_b(s['train:all_reduce'][0])}"
        ag = f"{fmt_b(s['warmup:all_gather'][0])} / {fmt_b(s['train:all_gather'][0])}"
        ddp = (f"{fmt_b(s['warmup:ddp_grad_all_reduce'][0])} / {fmt_b(s['train:ddp_grad_all_reduce'][0])}"
               if w > 1 else "- / -")
        print(f"{w:>5} {n:>7} {s['steps']:>6} {sps:>16} {wait:>13} {rss:>20} "
              f"{ar:>18} {ag:>18} {ddp:>18}")
    print("(samples/s and data-wait: warm-up epochs / Co-Reg epochs, mean over ranks, throughput runs; "
          + ("peak RSS: memory run / throughput run; " if pinned else "") + "bytes: rank 0)")

    print("\n== flat in N ==")
    for w in worlds:
        for line in check_flat(a, mem[(w, sizes[0])], mem[(w, sizes[1])]):
            print(line)
        if pinned:
            x, y = speed[(w, sizes[0])]["peak_rss"], speed[(w, sizes[1])]["peak_rss"]
            print(f"INFO  world {w}: peak RSS of the throughput runs (glibc's dynamic mmap threshold) "
                  f"{x:.1f} -> {y:.1f} MiB ({y - x:+.1f} MiB); not a verdict: it includes freed blocks "
                  f"glibc keeps in its heap, more of them the more iterations a run makes")


def backend_label(s: Dict) -> str:
    if s["engine"] == "deepspeed":
        return f"deepspeed ZeRO-{s['zero_stage']}"
    return s["engine"]


def fmt_pair(d: Dict, key: str) -> str:
    return f"{fmt_b(d['warmup:' + key][0])} / {fmt_b(d['train:' + key][0])}"


def print_backend_run(s: Dict) -> None:
    rk = "rank 0 / rank 1"
    rep = s["report"]
    print(f"\n--- {s['backend']}: engine {backend_label(s)}, N = {s['N']} ({s['shards']} shards), 2 processes; "
          f"wall {s['wall_s']:.1f}s (incl. process start, imports, engine set-up, init scan, co-divide, "
          f"evaluation, checkpoints); 1-min load average {s['load'][0]:.2f} before, {s['load'][1]:.2f} after")
    print(f"  optimizer steps per rank: {s['steps']} ({s['steps_warmup']} warm-up, {s['steps_coreg']} Co-Reg); "
          f"torch threads per rank: {s['threads']}; parameters per network: "
          f"{' / '.join(f'{p:,}' for p in s['params_per_net'])}")
    print(f"  samples/s per rank [{rk}]: warm-up epochs {fmt_list(s['sps_warmup'])}, "
          f"Co-Reg epochs {fmt_list(s['sps_coreg'])}; data-wait fraction: warm-up "
          f"{fmt_list(s['wait_warmup'], '{:.1%}')}, Co-Reg {fmt_list(s['wait_coreg'], '{:.1%}')}")
    if len(s.get("repeats", [])) > 1:
        print("  repeats (samples/s per rank, mean over ranks, warm-up / Co-Reg; 1-min load average before): "
              + ", ".join(f"{w:.0f} / {c:.0f} ({ld[0]:.2f})" for w, c, ld in s["repeats"])
              + "; the details are the fastest repeat's")
    print(f"  RSS per rank (MiB) [{rk}]: peak {fmt_list(s['peak_rss_each'], '{:.1f}')}; after set-up "
          f"(imports, model, engines) {fmt_list(s['rss_setup_each'], '{:.1f}')}")
    accs = ", ".join(f"{k[len('test_acc_'):]} {v:.2%}" for k, v in rep.items()
                     if k.startswith("test_acc_"))
    print(f"  test accuracy: {accs or '-'}; parameters bit-identical on every rank at the end: "
          f"{rep.get('ranks_in_sync', '-')}")
    for kind, label in (("warmup", "warm-up step"), ("train", "Co-Reg step")):
        print(f"  per {label} [{rk}]: engine {fmt_list(s[kind + ':wire:engine'])} B, method "
              f"{fmt_list(s[kind + ':wire:method'])} B (Collectives counters, rank 0: all-reduce "
              f"{fmt_b(s[kind + ':all_reduce'][0])} B, all-gather {fmt_b(s[kind + ':all_gather'][0])} B"
              + (f"; DDP comm hook buckets {fmt_b(s[kind + ':ddp_grad_all_reduce'][0])} B"
                 if s["engine"] in ("ddp", "accelerate") else "") + ")")
        fns = s[f"{kind}:wire_fns"]
        if fns:
            print("    torch.distributed calls per step, rank 0 (calls / bytes): " + ", ".join(
                f"{k.replace(':', ' ')} {c[0]:.2f} / {fmt_b(b[0])}" for k, (c, b) in sorted(fns.items())))
    calls = s["wire_calls_rank0"]
    print("  torch.distributed functions called, whole run, rank 0 (calls / bytes): " + ", ".join(
        f"{k.replace(':', ' ')} {c} / {fmt_b(b)}" for k, (c, b) in sorted(calls.items())))
    wc = s["wire_check"][0] if s["wire_check"] else {}
    late = sorted({x for w in s["wire_check"] for x in w.get("patched_late", [])})
    ds = wc.get("deepspeed_comm")
    print("  references to unwrapped torch.distributed functions found after set-up (and wrapped then): "
          + (", ".join(late) if late else "none")
          + (f"; DeepSpeed comm backend {ds.pop('backend', '?')}: "
             + ", ".join(f"{k} -> {v}" for k, v in ds.items()) if ds else ""))


def loss_difference(s: Dict, ref: Dict):
    """Largest relative difference between the per-epoch training losses (averaged over ranks,
    metrics.jsonl) of run s and of run ref: (difference, 'epoch E key') or (nan, '')."""
    worst, where = float("nan"), ""
    ref_by_epoch = {r["epoch"]: r for r in ref["history"]}
    for r in s["history"]:
        q = ref_by_epoch.get(r["epoch"], {})
        for k, v in r.items():
            if k.startswith("loss/") and k in q:
                d = abs(v - q[k]) / max(abs(q[k]), 1e-12)
                if not worst >= d:
                    worst, where = d, f"epoch {r['epoch']} {k}"
    return worst, where


def run_backends(a, pool: str, backends: List[str]) -> Dict[str, Dict]:
    """The backend axis: the same Co-Reg training, 2 processes, under each backend."""
    res: Dict[str, Dict] = {}
    failed: Dict[str, str] = {}
    reps: Dict[str, List[Dict]] = {b: [] for b in backends}
    for rep in range(a.repeats):              # round robin: a burst of load hits one repeat, not one backend
        for b in backends:
            if b in failed:
                continue
            out = os.path.join(a.workdir, "runs", f"backend_{b}_n{a.n}" + (f"_r{rep}" if a.repeats > 1 else ""))
            print(f"training: backend {b}, 2 processes, N={a.n}"
                  + (f", repeat {rep + 1}/{a.repeats}" if a.repeats > 1 else "") + f" -> {out} ...", flush=True)
            try:
                reps[b].append(summarize(run_training(a, 2, pool, out, backend=b, epochs=a.backend_epochs)))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                failed[b] = str(exc)
                print(f"  FAILED: {exc}", flush=True)
                continue
            print(f"  done in {reps[b][-1]['wall_s']:.1f}s", flush=True)
    for b in backends:
        if b in failed or not reps[b]:
            continue
        # The repeat least disturbed by other processes: the fastest Co-Reg epochs. Bytes are the
        # same in every repeat; peak RSS is the largest of any.
        best = max(reps[b], key=lambda x: sum(x["sps_coreg"]))
        best = dict(best, peak_rss=max(x["peak_rss"] for x in reps[b]),
                    repeats=[(sum(x["sps_warmup"]) / 2, sum(x["sps_coreg"]) / 2, x["load"]) for x in reps[b]])
        res[b] = best

    print("\n== backend axis: details ==")
    print("samples/s per rank = training samples this rank fed to optimizer steps / (its step compute + "
          "data wait), over the training epochs only (process start, DeepSpeed's op build/load, engine "
          "set-up, co-divide and evaluation are outside). Bytes per optimizer step = what this rank hands "
          "to torch.distributed inside optimizer steps (forward, backward, optimizer step, EMA update), "
          "split by caller: 'method' = the project's Collectives (Co-Reg's key/feature gathers and the "
          "all-reduce of their gradients), 'engine' = everything else (DDP / accelerate gradient buckets "
          "through the standard allreduce comm hook, DeepSpeed's reduce-scatters, all-gathers, "
          "all-reduces and broadcasts, grad-norm reductions).")
    for b in backends:
        if b in res:
            print_backend_run(res[b])

    print(f"\n== backend axis: table (2 processes, N={a.n}, {a.backend_epochs} epochs"
          + (f", fastest of {a.repeats} runs" if a.repeats > 1 else "") + "; per rank; warm-up / Co-Reg) ==")
    ref = next((res[b] for b in backends if b in res), None)
    hdr = (f"{'backend':<11} {'engine':<17} {'steps':>5} {'samples/s/rank':>15} {'engine B/step':>23} "
           f"{'method B/step':>19} {'peak RSS MiB':>12} {'test acc':>8} {'loss diff':>9} {'in sync':>7} "
           f"{'wall s':>6}")
    print(hdr)
    print("-" * len(hdr))
    for b in backends:
        if b not in res:
            print(f"{b:<11} FAILED (see above)")
            continue
        s = res[b]
        sps = f"{sum(s['sps_warmup']) / 2:.0f} / {sum(s['sps_coreg']) / 2:.0f}"
        acc = s["report"].get("test_acc_ensemble", s["report"].get("test_acc", float("nan")))
        diff = "ref" if s is ref else f"{loss_difference(s, ref)[0]:.1e}"
        print(f"{b:<11} {backend_label(s):<17} {s['steps']:>5} {sps:>15} {fmt_pair(s, 'wire:engine'):>23} "
              f"{fmt_pair(s, 'wire:method'):>19} {s['peak_rss']:>12.1f} {acc:>8.2%} {diff:>9} "
              f"{str(s['report'].get('ranks_in_sync', '-')):>7} {s['wall_s']:>6.1f}")
    print(f"(samples/s: mean over ranks, warm-up epochs / Co-Reg epochs; bytes: rank 0, per optimizer step, "
          f"counted at torch.distributed; peak RSS: ru_maxrss, max over ranks; test acc: the ensemble's, "
          f"from report.json; loss diff: largest relative difference of the per-epoch training losses from "
          f"{ref['backend'] if ref else '-'}'s; in sync: parameters bit-identical on both ranks at the end; "
          f"wall: whole run)")
    loads = [x for s in res.values() for r in s.get("repeats", [(0, 0, s["load"])]) for x in r[2]]
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if loads and max(loads) > ncpu + 1.0:      # the load average lags: a little over 2 is the runs' own
        print(f"NOTE  the 1-min load average ranged {min(loads):.2f} to {max(loads):.2f} around the runs on "
              f"{ncpu} CPUs (a run itself is 2 busy processes): other processes shared the cores, so "
              f"samples/s differences between backends may be load, not backend"
              + ("" if a.repeats > 1 else "; --repeats R keeps the fastest of R round-robin runs") + ". Bytes, "
              "peak RSS and losses do not depend on load.")
    accs = {b: s["report"].get("test_acc_ensemble") for b, s in res.items()
            if s["report"].get("test_acc_ensemble") is not None}
    if len(accs) > 1:
        lo, hi = min(accs, key=accs.get), max(accs, key=accs.get)
        print("\nsanity check (the backends train the same networks from the same seeds and data order; "
              "they differ only in floating-point summation order: bucketing, partitioning, when gradients "
              "are averaged):")
        print((f"  ensemble test accuracy {accs[lo]:.2%} for every backend" if accs[lo] == accs[hi] else
               f"  ensemble test accuracy {accs[lo]:.2%} ({lo}) to {accs[hi]:.2%} ({hi}), spread "
               f"{100 * (accs[hi] - accs[lo]):.1f} points")
              + (f" (near chance for {a.classes} classes: at this size the networks have barely started to "
                 f"learn, so agreement of the accuracies says little; the losses say more)"
                 if accs[hi] < 2.0 / a.classes else ""))
        diffs = {b: loss_difference(s, ref) for b, s in res.items() if s is not ref}
        if diffs:
            worst = max(diffs, key=lambda b: diffs[b][0] if diffs[b][0] == diffs[b][0] else -1)
            d, where = diffs[worst]
            ok = all(x[0] <= a.loss_tol for x in diffs.values())
            print(f"  {'AGREE ' if ok else 'DIFFER'} per-epoch training losses (averaged over ranks) vs "
                  f"{ref['backend']}: largest relative difference {d:.1e} ({worst}, {where}); tolerance "
                  f"{a.loss_tol:g} (--loss-tol; the 'in sync' column says whether the ranks of each run "
                  f"ended with bit-identical parameters)")
        for b, s in res.items():
            per = "; ".join(f"epoch {r['epoch']}: " + ", ".join(f"{k[len('test_acc_'):]} {v:.1%}"
                                                               for k, v in r.items() if k.startswith("test_acc_"))
                            for r in s["history"])
            print(f"  {b}: test accuracy per epoch: {per}")
    if failed:
        print(f"FAILED backends: {', '.join(failed)}")
    return res


def package_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_lines(a, backends: List[str] = ()) -> List[str]:
    import torch
    from coreg_dist.runtime import cpu_description
    return [f"machine: {platform.node()}, {cpu_description()} at start, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__} "
            f"(CPU)" + (f", deepspeed {package_version('deepspeed')}, accelerate {package_version('accelerate')}"
                        if backends else ""),
            f"threads: run.threads={a.threads} for the machine, split over the ranks by setup_process "
            f"(1 process: {a.threads}, 2 processes: {max(1, a.threads // 2)} each); DataLoader workers: 0"]


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:
        return worker_main(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="training samples of the small pool (N)")
    ap.add_argument("--factor", type=int, default=10, help="the big pool has factor x N samples")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs (the first is warm-up)")
    ap.add_argument("--workdir", default="/tmp/coreg_stream_bench",
                    help="pools (reused if present) and run directories")
    ap.add_argument("--skip-2proc", action="store_true", help="only the 1-process runs")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=0, help="test samples (fixed for both pools); "
                    "0 = 2 x shard size (one test shard per rank)")
    ap.add_argument("--size", type=int, default=28, help="image side (grey)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64, help="train.batch_size (global)")
    ap.add_argument("--eval-batch-size", type=int, default=512)
    ap.add_argument("--streams", type=int, default=2, help="data.streams (same for 1 and 2 processes)")
    ap.add_argument("--shuffle-buffer", type=int, default=256,
                    help="data.shuffle_buffer per stream and route; small enough that the buffers "
                         "are full at N already, so the N vs 10N comparison sees only N")
    ap.add_argument("--queue-size", type=int, default=2048,
                    help="coreg.queue_size (MoCo queue per network; the method's default is 8192, "
                         "0 keeps it): small enough to be full by the end of the N run, so the "
                         "N vs 10N comparison sees only N (the contrastive loss's working set and the "
                         "queue's committed pages grow with its fill level until it is full)")
    ap.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                    help="MALLOC_MMAP_THRESHOLD_ (bytes) of the memory runs; 0 = no separate memory "
                         "runs, peak RSS from the throughput runs under glibc's defaults. A fixed "
                         "threshold returns freed large blocks to the OS, so peak RSS measures what "
                         "the process holds; glibc's dynamic threshold keeps freed blocks in the heap "
                         "(a peak that grows with the number of iterations, not with what is held). "
                         "It slows training, hence separate throughput runs")
    ap.add_argument("--threads", type=int, default=2, help="run.threads (whole machine)")
    ap.add_argument("--rss-tol-pct", type=float, default=15.0)
    ap.add_argument("--rss-tol-mib", type=float, default=30.0)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per training run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra config override for every training run (repeatable)")
    ap.add_argument("--backends", default="",
                    help="the backend axis, 2 processes on the N pool: a comma-separated list of "
                         f"{', '.join(BACKENDS)}, or 'all'")
    ap.add_argument("--backends-only", action="store_true",
                    help="only the backend axis (no N vs factor x N study; only the N pool is "
                         "written); without --backends it runs all of them")
    ap.add_argument("--loss-tol", type=float, default=1e-2,
                    help="backend axis: largest relative difference of the per-epoch training losses "
                         "from the first backend's that still counts as the same training")
    ap.add_argument("--repeats", type=int, default=1,
                    help="backend axis: runs per backend, round robin; the table shows the fastest "
                         "(least disturbed by other processes); peak RSS is the largest of any")
    ap.add_argument("--backend-epochs", type=int, default=3,
                    help="training epochs of the backend runs (the first is warm-up)")
    a = ap.parse_args(argv)
    if a.n_test <= 0:
        a.n_test = 2 * a.shard_size
    if a.backends_only and not a.backends:
        a.backends = "all"
    backends = list(BACKENDS) if a.backends == "all" else [b.strip() for b in a.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        ap.error(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)} or 'all'")
    t_start = time.time()
    study = not a.backends_only
    sizes = [a.n, a.n * a.factor] if study else [a.n]
    worlds = [1] if a.skip_2proc else [1, 2]

    print("== Co-Reg streaming benchmark (CPU)" + (": backend axis" if not study else "") + " ==")
    for line in machine_lines(a, backends):
        print(line)
    if study:
        print(f"pools: N = {sizes[0]} and {a.factor}N = {sizes[1]} training samples, grey {a.size}x{a.size} PNG, "
              f"{a.classes} classes, shards of {a.shard_size} ({-(-sizes[0] // a.shard_size)} and "
              f"{-(-sizes[1] // a.shard_size)} shards), test split {a.n_test} (same for both), synthetic "
              f"candidate sets q=0.2 eta=0.2")
    else:
        print(f"pool: N = {a.n} training samples, grey {a.size}x{a.size} PNG, {a.classes} classes, shards of "
              f"{a.shard_size} ({-(-a.n // a.shard_size)} shards), test split {a.n_test}, synthetic candidate "
              f"sets q=0.2 eta=0.2")
    epochs_txt = (f"epochs={a.epochs}" if study else "") + (
        f"{', ' if study else ''}backend runs: epochs={a.backend_epochs}" if backends else "")
    print(f"config: Co-Reg, small_cnn, train.batch_size={a.batch_size} (+{a.batch_size} unlabeled in Co-Reg "
          f"steps; warm-up steps take {2 * a.batch_size}), {epochs_txt} (warm_up=1, feature terms "
          f"from the first Co-Reg epoch), data.streams={a.streams}, shuffle_buffer={a.shuffle_buffer}, "
          f"eval_batch_size={a.eval_batch_size}, gloo for 2 processes")
    if study:
        print(f"measurement conditions: coreg.queue_size={a.queue_size or 'default (8192)'}; "
              + (f"peak RSS from memory runs with MALLOC_MMAP_THRESHOLD_={a.malloc_mmap_threshold}, samples/s "
                 f"from throughput runs with glibc's defaults" if a.malloc_mmap_threshold > 0 else
                 "one run per configuration, glibc's malloc defaults") + " (see --help)")
    if backends:
        print(f"backend axis: {', '.join(backends)}; 2 processes each on the N={a.n} pool, "
              f"coreg.queue_size={a.queue_size or 'default (8192)'}, one run per backend (samples/s, bytes and "
              f"peak RSS from the same run, glibc's malloc defaults)")
    print(f"workdir: {a.workdir}", flush=True)

    pools = {}
    for n in sizes:
        root = os.path.join(a.workdir, "pools", f"n{n}_s{a.size}_sh{a.shard_size}_c{a.classes}_t{a.n_test}")
        dt = make_pool(root, n, a)
        print(f"pool N={n}: {root} ({'reused' if dt == 0 else f'written in {dt:.1f}s'})", flush=True)
        pools[n] = root

    if study:
        run_study(a, pools, sizes, worlds)
    if backends:
        run_backends(a, pools[a.n], backends)
    print(f"\nwall time: {time.time() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
