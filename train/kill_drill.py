"""Kill-anywhere drill: SIGKILL a run at N random moments, resume each time, and check that it
ends with the same weights and metrics as a run nobody touched.

    python -m train.kill_drill --config configs/demo.yaml --kills 5 --nproc 2 --workdir runs/drill \\
        train.max_train_samples=2000 train.epochs=4 coreg.warm_up=1      # overrides as for coreg-train
    python -m train.kill_drill ... --victim one      # kill one rank only: the others must notice
                                                     # (collective failure) and exit by themselves

1. A reference run (WORKDIR/reference) trains uninterrupted; its timing sets the kill moments.
2. The drilled run (WORKDIR/drill) is started with `--resume latest` and SIGKILLed, --kills
   times: the whole process group (--victim all: torchrun and every rank at once, like a node
   losing power) or one random rank (--victim one). Each attempt dies a random time into its
   start-up or, more often, after its start line by the gap to the next of --kills points drawn
   uniformly over the reference's training time, so the kills walk through the whole run and
   land anywhere: steps, co-divide sweeps and state writes, evaluation, checkpoint writes.
   Then the run is left to finish.
3. Verdict: every tensor of the final checkpoint's networks, key encoders, queues and prototypes
   is bit-identical, and every per-epoch metric except timings is equal.
Checkpoints are written every --checkpoint-every steps in both runs (it does not change
training), so kills lose little work. Exit status 0 when the verdict is PASS.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Per-epoch metrics that measure time, not training: they differ between any two runs.
TIMING_KEYS = ("samples_per_s", "data_wait_fraction", "data_wait_s", "compute_s", "divide_s", "epoch_s")


def command(args, out_dir: str, resume: bool) -> List[str]:
    cli = ["-m", "train.cli", *sum((["--config", c] for c in args.config), []),
           *args.overrides, f"run.out_dir={out_dir}", f"train.checkpoint_every={args.checkpoint_every}"]
    if resume:
        cli += ["--resume", "latest"]
    if args.nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}", *cli]
    return [sys.executable, *cli]


def start(cmd: List[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    log = open(log_path, "a")
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)     # its own process group: killpg reaches all


def children(pid: int) -> List[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def kill(proc: subprocess.Popen, victim: str, rng: random.Random) -> str:
    if victim == "one":
        ranks = children(proc.pid) or [proc.pid]      # torchrun's workers, or the one process
        pid = rng.choice(ranks)
        os.kill(pid, signal.SIGKILL)
        return f"one rank (pid {pid})"
    os.killpg(proc.pid, signal.SIGKILL)
    return "all processes"


def latest(run_dir: str) -> str:
    p = os.path.join(run_dir, "checkpoints", "latest")
    return open(p).read().strip() if os.path.isfile(p) else "-"


def final_tensors(run_dir: str) -> Dict[str, torch.Tensor]:
    path = os.path.join(run_dir, "checkpoints", latest(run_dir), "model.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)["method"]
    flat: Dict[str, torch.Tensor] = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}[{i}]", v)
    walk("", state)
    return flat


def epoch_metrics(run_dir: str) -> List[Dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def compare(ref: str, drill: str) -> Tuple[bool, List[str]]:
    problems = []
    a, b = final_tensors(ref), final_tensors(drill)
    if latest(ref) != latest(drill):
        problems.append(f"final checkpoints differ: {latest(ref)} vs {latest(drill)}")
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            problems.append(f"tensor {k} only in one run")
        elif a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].shape == b[k].shape else "shape"
            problems.append(f"tensor {k} differs (max |diff| {diff})")
    ma, mb = epoch_metrics(ref), epoch_metrics(drill)
    if len(ma) != len(mb):
        problems.append(f"metrics.jsonl: {len(ma)} epochs vs {len(mb)}")
    for ra, rb in zip(ma, mb):
        for k in sorted(set(ra) | set(rb)):
            if ra.get(k) != rb.get(k):
                problems.append(f"epoch {ra.get('epoch')}: {k} = {ra.get(k)} vs {rb.get(k)}")
    return not problems, problems


START_MARK = " training samples ("      # the trainer's first line once start-up (and resume) is done


def wait_for_mark(proc: subprocess.Popen, log_path: str, offset: int, timeout: float) -> Optional[float]:
    """Seconds until the trainer's start line appears in the log after `offset` (None if the
    process ended first)."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        with open(log_path, errors="replace") as f:
            f.seek(offset)
            if START_MARK in f.read():
                return time.time() - t0
        time.sleep(0.02)
    return None


def run_to_end(cmd, log_path: str, timeout: float) -> Tuple[int, float, float]:
    """Exit status, start-up seconds (to the trainer's start line) and training seconds after it."""
    offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    t0 = time.time()
    proc = start(cmd, log_path)
    startup = wait_for_mark(proc, log_path, offset, timeout) or 0.0
    try:
        rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError(f"run did not finish within {timeout:.0f}s; see {log_path}")
    return rc, startup, time.time() - t0 - startup


def kill_moments(kills: int, startup: float, training: float, rng: random.Random) -> List[Tuple[str, float]]:
    """Where each attempt is killed: ("start", s) s seconds into its start-up (about one kill in
    kills+1), or ("train", g) g seconds after its start line, g the gap to the next of the points
    drawn uniformly over the reference's training time: the kills walk through the whole run
    (a resume goes back to its checkpoint, so the run never passes the last point early)."""
    points = sorted(rng.uniform(0.0, training) for _ in range(kills))
    out, last = [], 0.0
    for p in points:
        if rng.random() < 1.0 / (kills + 1):
            out.append(("start", rng.uniform(0.0, startup)))
        else:
            out.append(("train", p - last))
            last = p
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.kill_drill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], help="as for coreg-train (repeatable)")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--nproc", type=int, default=1, help="ranks (torchrun --standalone when > 1)")
    p.add_argument("--victim", choices=("all", "one"), default="all")
    p.add_argument("--checkpoint-every", type=int, default=2)
    p.add_argument("--workdir", default="runs/kill-drill")
    p.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for any one run")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_args(argv)
    work = os.path.abspath(args.workdir)
    ref, drill = os.path.join(work, "reference"), os.path.join(work, "drill")
    for d in (ref, drill):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    rng = random.Random(args.seed)

    rc, startup, training = run_to_end(command(args, ref, False), os.path.join(work, "reference.log"),
                                       args.timeout)
    if rc != 0:
        print(f"the reference run failed (exit {rc}); see {work}/reference.log", file=sys.stderr)
        return 2
    print(f"reference run: start-up {startup:.1f}s, then {training:.1f}s; final checkpoint "
          f"{latest(ref)}", flush=True)
    moments = kill_moments(args.kills, startup, training, rng)

    log_path = os.path.join(work, "drill.log")
    print(f"{'kill':>4}  {'moment':<16} {'victim':<22} {'latest before':<18} {'exit':>5}  latest after",
          flush=True)
    killed = 0
    for i, (phase, delay) in enumerate(moments):
        before = latest(drill)
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        proc = start(command(args, drill, True), log_path)
        alive = True
        if phase == "train":
            alive = wait_for_mark(proc, log_path, offset, args.timeout) is not None
        if alive:
            try:
                proc.wait(timeout=delay)
                alive = False
            except subprocess.TimeoutExpired:
                pass
        if not alive:
            who = "(ended first)"
        else:
            who = kill(proc, args.victim, rng)
            killed += 1
            try:
                proc.wait(timeout=max(120.0, startup + training))   # --victim one: the rest must exit
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                print(f"FAIL: after killing {who}, the other ranks did not exit within "
                      f"{max(120.0, startup + training):.0f}s (a hang); see {log_path}", flush=True)
                return 1
        moment = f"{phase} +{delay:.1f}s"
        print(f"{i + 1:>4}  {moment:<16} {who:<22} {before:<18} {proc.returncode:>5}  {latest(drill)}",
              flush=True)
    rc, _, _ = run_to_end(command(args, drill, True), log_path, args.timeout)
    if rc != 0:
        print(f"FAIL: the final resume exited {rc}; see {log_path}", flush=True)
        return 1
    ok, problems = compare(ref, drill)
    n = len(final_tensors(ref))
    print(f"final: {latest(drill)}; {n} tensors and {len(epoch_metrics(ref))} epochs of metrics compared"
          + (f"; {args.kills - killed} attempt(s) ended before their kill moment" if killed < args.kills else ""))
    for line in problems[:20]:
        print(f"  {line}")
    ok = ok and killed == args.kills
    if killed < args.kills:
        print(f"  only {killed} of {args.kills} kills landed: make the run longer (more epochs or samples)")
    print(f"verdict: {'PASS' if ok else 'FAIL'}: {killed} kills ({args.victim}), {args.nproc} rank(s); "
          f"weights and metrics {'identical to' if ok else 'differ from'} the uninterrupted run", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
