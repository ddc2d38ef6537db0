"""Benchmark grid: cells (label columns, pool sizes, overrides) x methods x seeds, one command.

    python bench/grid.py --grid configs/grids/robustness.yaml                 # the issue's grid (make grid)
    python bench/grid.py --grid configs/grids/robustness.yaml --dry-run       # the plan; nothing runs
    python bench/grid.py --grid configs/grids/robustness.yaml --jobs 2        # 2 runs at a time, 1 thread each
    python bench/grid.py --grid configs/grids/robustness.yaml --only 'pool4k_clip/*' --seeds 0
    python bench/grid.py --grid configs/grids/robustness.yaml --only pool4k_syn_q25_e15 \\
        --set train.epochs=4 --workdir runs/grid-slice                         # a quick slice
    python bench/grid.py --grid configs/grids/smoke.yaml              # minutes: the plumbing, real data
    python bench/grid.py --grid configs/grids/robustness.yaml --report-only   # tables and plots only
    python bench/grid.py --grid configs/grids/robustness.yaml --methods coreg_p_own_aligned \\
        --only '*/coreg_p_own_aligned'           # a method the grid defines, added to every cell

Everything about the experiment is in the grid YAML (see configs/grids/robustness.yaml):
  base:     config: [YAML presets]  overrides: [key=value, ...]     (every run)
  prepare:  name -> command           steps that make label columns etc.; each must be idempotent.
            A step runs once per invocation, alone, before the first run of a cell that lists it
            (cell `prepare:`; default: every step; with --jobs N > 1 every needed step runs
            first, before the first run). `{python}` and `{workdir}` are substituted.
  methods:  name -> [overrides] or {overrides: [...], label: "...", config: [presets after base's]}
  default_methods: [names]            methods of a cell that has no `methods:` list
  seeds:    [0, 1, 2]
  cells:    name -> {label, overrides, methods?, seeds?, prepare?}
  launcher: ["{python}", "-m", "train.cli"] (default)   env: {VAR: value} (optional)
  defs:     free-form; for YAML anchors shared by cells (`overrides: [a=1, *pool]` is flattened)
  scaling / expected_minutes:         printed in the header and results.md
Overrides apply in the order base, cell, method, then --set, then run.seed / run.out_dir.

Runs go seed-major (every cell and method with its first seed, then the second seed, ...).
Each (cell, method, seed) runs the trainer as a subprocess in WORKDIR/<cell>/<method>/seed<S>
(log: train.log there). A run is finished when its report.json exists and the hash of its
command (launcher, presets, overrides; not the run directory) recorded in grid_run.json
matches, and so does the hash of its resolved config (what the presets say now and the code's
defaults: an edited preset or a changed default is a changed definition): reruns skip finished
runs, rerun runs whose definition changed (their old directory is deleted) and continue killed
runs with train.resume=latest. A failing run is reported with its
exit code, log and last lines, and the grid goes on; the exit status is 1 if any run failed.
Ctrl-C (or SIGTERM) stops the runs in flight with SIGTERM (they checkpoint), waits for them (a
second Ctrl-C, or 120 s, kills them at once), writes the results so far and exits 130.

--jobs N (default 1: one run at a time) keeps up to N runs going at once, in plan order. Each
gets `run.threads=T` as its last override, T = max(1, R // N), R = the run's own run.threads
(from its presets and overrides), or the CPU count where that is 0 (torch's default). T is not part
of a run's definition (the hash): a run finished with one --jobs is skipped with any other, and
a killed one resumes with any. The thread count changes no result except through the order of
float sums (not bit-identical across thread counts). Progress lines name the runs in flight;
the ETA divides the work left by N. The outputs are written once, by the harness's main loop,
after the runs.

Outputs in WORKDIR (over every finished run of the grid, not only this invocation's):
  results.json  every run (cell, method, seed, test_acc, per-epoch curve, seconds, report
                fields) and the mean / std over seeds per cell and method
  results.md    cells x methods: "mean ± std (n)" test accuracy (%) over seeds, best per row in
                bold, with the annotator's zero-shot accuracy, avg |S| and eta; seconds per run
  curves.png    per cell: mean test accuracy over seeds vs epoch, one line per method
  bars.png      per cell: mean ± std test accuracy per method
Paths inside the grid YAML are relative to the repository root (the subprocesses' working
directory); --grid and --workdir are relative to where the command is started.
"""
from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from omegaconf import DictConfig, OmegaConf  # noqa: E402

RUN_RECORD = "grid_run.json"
LOG_NAME = "train.log"
DEFAULT_LAUNCHER = ["{python}", "-m", "train.cli"]
# The hash leaves out what names the place, not the experiment.
UNHASHED_KEYS = ("run.out_dir", "train.resume")


# ----------------------------------------------------------------------------- the grid
@dataclass
class Method:
    name: str
    overrides: List[str]
    label: str
    configs: List[str] = field(default_factory=list)   # presets stacked after the base's


@dataclass
class Cell:
    name: str
    label: str
    overrides: List[str]
    methods: List[str]
    seeds: List[int]
    prepare: List[str]


@dataclass
class Run:
    cell: str
    method: str
    seed: int
    run_dir: str
    argv: List[str]            # as launched (python path expanded, out_dir and resume added)
    key: Dict                  # what the hash is over
    hash: str
    epochs: Optional[int] = None
    threads: Optional[int] = None  # its resolved run.threads (0: torch's default); None: not resolved
    # sha256 of the resolved config (presets' contents and the code's defaults, not just their
    # names): a changed default or an edited preset reruns the run. None: not resolved.
    config_sha: Optional[str] = None
    config_error: str = ""
    status: str = ""           # done | new | resume | changed
    result: Dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.cell}/{self.method}/seed{self.seed}"


@dataclass
class Grid:
    name: str
    path: str
    configs: List[str]
    base: List[str]
    launcher: List[str]
    env: Dict[str, str]
    prepare: "OrderedDict[str, str]"
    methods: "OrderedDict[str, Method]"
    cells: "OrderedDict[str, Cell]"
    scaling: str
    expected_minutes: Optional[float]
    workdir: str


def _strs(x) -> List[str]:
    """A string or a list of them; nested lists (YAML anchors: [a=1, *shared]) are flattened."""
    if x is None:
        return []
    if isinstance(x, (str, int, float)):
        return [str(x)]
    return [s for v in x for s in _strs(v)]


def _named(node, what: str) -> "OrderedDict[str, object]":
    """A mapping name -> spec, or a list of specs each with a `name`."""
    out: "OrderedDict[str, object]" = OrderedDict()
    if node is None:
        return out
    if isinstance(node, (dict, DictConfig)):
        for k, v in node.items():
            out[str(k)] = v
        return out
    for item in node:
        if not isinstance(item, (dict, DictConfig)) or "name" not in item:
            raise SystemExit(f"error: every entry of '{what}' needs a name (got {item!r})")
        out[str(item["name"])] = item
    return out


def load_grid(path: str, workdir: Optional[str] = None, seeds: Optional[List[int]] = None,
              cell_methods: Optional[List[str]] = None) -> Grid:
    """cell_methods: methods (names under `methods:`) added to every cell's list (--methods: a
    switch measured beyond the preset's table; the results then have its rows too)."""
    raw = OmegaConf.load(path)
    raw = OmegaConf.to_container(raw, resolve=True)
    known = {"name", "description", "defs", "scaling", "expected_minutes", "workdir", "base", "prepare",
             "methods", "default_methods", "seeds", "cells", "launcher", "env"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SystemExit(f"error: {path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    name = str(raw.get("name") or os.path.splitext(os.path.basename(path))[0])
    base = raw.get("base") or {}
    methods: "OrderedDict[str, Method]" = OrderedDict()
    for mname, spec in _named(raw.get("methods"), "methods").items():
        if isinstance(spec, dict):
            methods[mname] = Method(mname, _strs(spec.get("overrides")), str(spec.get("label") or mname),
                                    _strs(spec.get("config")))
        else:
            methods[mname] = Method(mname, _strs(spec), mname)
    if not methods:
        raise SystemExit(f"error: {path}: no methods")
    default_methods = _strs(raw.get("default_methods")) or list(methods)
    for m in cell_methods or []:
        if m not in methods:
            raise SystemExit(f"error: --methods {m}: no such method under methods: in {path} "
                             f"({', '.join(methods)})")
    default_seeds = [int(s) for s in (raw.get("seeds") or [0])]
    prepare: "OrderedDict[str, str]" = OrderedDict()
    for pname, spec in _named(raw.get("prepare"), "prepare").items():
        cmd = spec.get("command") if isinstance(spec, dict) else spec
        prepare[pname] = cmd if isinstance(cmd, str) else " ".join(shlex.quote(str(c)) for c in cmd)
    cells: "OrderedDict[str, Cell]" = OrderedDict()
    for cname, spec in _named(raw.get("cells"), "cells").items():
        spec = spec or {}
        cm = _strs(spec.get("methods")) or default_methods
        cm = cm + [m for m in cell_methods or [] if m not in cm]
        for m in cm:
            if m not in methods:
                raise SystemExit(f"error: {path}: cell '{cname}' uses method '{m}', which is not "
                                 f"under methods: ({', '.join(methods)})")
        cp = _strs(spec["prepare"]) if "prepare" in spec else list(prepare)
        for p in cp:
            if p not in prepare:
                raise SystemExit(f"error: {path}: cell '{cname}' needs prepare step '{p}', "
                                 f"which is not under prepare: ({', '.join(prepare) or 'none'})")
        cs = [int(s) for s in (spec.get("seeds") or default_seeds)]
        if seeds is not None:
            cs = list(seeds)
        cells[cname] = Cell(cname, str(spec.get("label") or cname), _strs(spec.get("overrides")),
                            cm, cs, cp)
    if not cells:
        raise SystemExit(f"error: {path}: no cells")
    wd = workdir or raw.get("workdir") or os.path.join("runs", "grid", name)
    return Grid(name=name, path=path, configs=_strs(base.get("config")),
                base=_strs(base.get("overrides")), launcher=_strs(raw.get("launcher")) or DEFAULT_LAUNCHER,
                env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
                prepare=prepare, methods=methods, cells=cells,
                scaling=str(raw.get("scaling") or "").strip(),
                expected_minutes=raw.get("expected_minutes"),
                workdir=os.path.abspath(wd) if not os.path.isabs(wd) else wd)


def _subst(s: str, workdir: str, quote=shlex.quote) -> str:
    return s.replace("{python}", quote(sys.executable)).replace("{workdir}", quote(workdir))


def _key_of(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def plan_runs(grid: Grid, extra: Sequence[str] = ()) -> List[Run]:
    runs = []
    for cell in grid.cells.values():
        for mname in cell.methods:
            m = grid.methods[mname]
            for seed in cell.seeds:
                overrides = [*grid.base, *cell.overrides, *m.overrides, *extra, f"run.seed={seed}"]
                overrides = [o for o in overrides if _key_of(o) not in UNHASHED_KEYS]
                configs = [*grid.configs, *m.configs]
                key = {"launcher": grid.launcher, "config": configs, "overrides": overrides}
                h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
                run_dir = os.path.join(grid.workdir, cell.name, mname, f"seed{seed}")
                argv = [_subst(a, grid.workdir, quote=str) for a in grid.launcher]
                for c in configs:
                    argv += ["--config", c]
                argv += [*overrides, f"run.out_dir={run_dir}", "train.resume=latest"]
                runs.append(Run(cell.name, mname, seed, run_dir, argv, key, h))
    # Seed-major order: every cell and method once before any second seed, so that a partial
    # grid already has the whole table (n = 1).
    order = {(c.name, s): i for c in grid.cells.values() for i, s in enumerate(c.seeds)}
    return sorted(runs, key=lambda r: order[(r.cell, r.seed)])


def validate(grid: Grid, runs: List[Run]) -> None:
    """Resolve every run's config with the project's loader: a typo fails here, not an hour in."""
    try:
        from coreg_dist.config import ConfigError, load_config
    except Exception as exc:  # pragma: no cover - the harness still works without the check
        print(f"(config check skipped: {type(exc).__name__}: {exc})")
        return
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        for r in runs:
            try:
                cfg = load_config(r.key["config"], r.key["overrides"])
                r.epochs = int(cfg.train.epochs)
                r.threads = int(cfg.run.threads)
                r.config_sha = config_sha(cfg)
            except ConfigError as exc:
                r.config_error = str(exc)
            except SystemExit as exc:
                r.config_error = str(exc)
    finally:
        os.chdir(cwd)


def config_sha(cfg) -> str:
    """The resolved config's hash, without what names the place (UNHASHED_KEYS)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    for dotted in UNHASHED_KEYS:
        *path, last = dotted.split(".")
        node = tree
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]


def selected(run: Run, patterns: Sequence[str]) -> bool:
    if not patterns:
        return True
    names = (run.id, run.cell, f"{run.cell}/{run.method}")
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def status_of(run: Run) -> str:
    rec_path = os.path.join(run.run_dir, RUN_RECORD)
    rec = _read_json(rec_path)
    has_report = os.path.isfile(os.path.join(run.run_dir, "report.json"))
    # a record from before config hashes (no config_sha256) is judged by its command alone
    recorded = (rec or {}).get("config_sha256")
    same_config = recorded is None or run.config_sha is None or recorded == run.config_sha
    if rec is not None and rec.get("hash") == run.hash and same_config:
        return "done" if has_report else "resume"
    if rec is None and not os.path.exists(run.run_dir):
        return "new"
    return "changed"


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- running
def fmt_time(s: Optional[float]) -> str:
    if s is None or not math.isfinite(s):
        return "--:--"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def child_env(grid: Grid) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.update(grid.env)
    return env


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


POLL_S = 0.2          # how often the harness looks at its children
EPOCH_POLL_S = 2.0    # how often it reads a run's metrics.jsonl for the epoch lines
STOP_WAIT_S = 120     # after SIGTERM, how long the children have to checkpoint before SIGKILL


def _die_with_parent() -> None:
    """In the child: SIGTERM when the harness dies, even by SIGKILL (Linux), so that no orphaned
    trainer keeps writing into a run directory that a rerun of the grid takes over."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def threads_per_run(run: Run, jobs: int) -> Optional[int]:
    """run.threads for one of `jobs` concurrent runs: the threads the run has alone (its resolved
    run.threads: presets, base, cell, method, --set), else the CPU count, divided by `jobs`.
    None for --jobs 1: nothing is added, the run is launched exactly as without --jobs."""
    if jobs <= 1:
        return None
    alone = run.threads
    if alone is None:                                # not resolved (no config check): the overrides
        given = [o.split("=", 1)[1] for o in run.key["overrides"] if _key_of(o) == "run.threads"]
        try:
            alone = int(given[-1]) if given else 0
        except ValueError:
            alone = 0
    if not alone or alone <= 0:                      # 0 = torch's default: every core
        alone = os.cpu_count() or 1
    return max(1, alone // jobs)


def launch_argv(run: Run, jobs: int) -> List[str]:
    """The command line as launched. With --jobs N > 1, run.threads=T comes last (it wins); it is
    not part of the run's hash, so --jobs never changes which runs count as finished."""
    t = threads_per_run(run, jobs)
    return run.argv if t is None else [*run.argv, f"run.threads={t}"]


@dataclass
class Active:
    """A trainer in flight (Runner.start -> poll -> finish)."""
    run: Run
    index: int                 # the [i/n] of the progress lines
    argv: List[str]
    proc: subprocess.Popen
    logf: object
    rec: Dict
    rec_path: str
    log_path: str
    metrics_path: str
    seen: int                  # metrics.jsonl lines already reported
    t0: float
    next_epochs: float = 0.0
    signalled: bool = False    # SIGTERM sent: it checkpoints and exits
    rc: Optional[int] = None   # its exit status, once it ended


class Runner:
    """Starts, polls and stops the children: up to `jobs` trainers at once, or one prepare command
    alone. Signal handlers only record the signal and forward it; the main loop (main thread)
    does everything else, so nothing is interrupted halfway."""

    def __init__(self, grid: Grid, log=print, jobs: int = 1):
        self.grid, self.log, self.jobs = grid, log, max(1, int(jobs))
        self.env = child_env(grid)
        self.active: List[Active] = []
        self.prep: Optional[subprocess.Popen] = None
        self.stop = ""                    # the first signal's name, once one came
        self.stop_t: Optional[float] = None
        self.forced = False               # a second signal (or STOP_WAIT_S passed): SIGKILL
        self.killed = False

    # --- signals
    def _signal(self, signum, frame):
        if self.stop:                     # a second Ctrl-C: do not wait for the checkpoints
            self.forced = True
            self._kill_all()
            return
        self.stop, self.stop_t = signal.Signals(signum).name, time.time()
        self.terminate()

    def terminate(self) -> None:
        """SIGTERM to every child not yet told: a prepare command's whole process group; a
        trainer itself (it checkpoints and exits 75; a launcher like torchrun forwards it)."""
        if self.prep is not None and self.prep.poll() is None:
            _killpg(self.prep.pid, signal.SIGTERM)
        for a in self.active:
            if not a.signalled and a.proc.poll() is None:
                a.signalled = True
                try:
                    a.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _kill_all(self) -> None:
        for p in [self.prep, *(a.proc for a in self.active)]:
            if p is not None and p.poll() is None:
                _killpg(p.pid, signal.SIGKILL)

    def _check_stop(self) -> None:
        """Called while waiting: tell children started after the signal; SIGKILL after STOP_WAIT_S."""
        if not self.stop:
            return
        self.terminate()
        if not self.forced and time.time() - self.stop_t > STOP_WAIT_S:
            self.forced = True
            self.log(f"    children still running {STOP_WAIT_S} s after {self.stop}: SIGKILL")
        if self.forced:
            if not self.killed and (self.active or self.prep is not None):
                self.killed = True
                self.log("    killed (SIGKILL) without waiting for a checkpoint")
            self._kill_all()

    # --- prepare steps: alone, nothing else in flight
    def prepare(self, name: str) -> bool:
        assert not self.active, "a prepare step runs alone"
        cmd = _subst(self.grid.prepare[name], self.grid.workdir)
        pdir = os.path.join(self.grid.workdir, "prepare")
        os.makedirs(pdir, exist_ok=True)
        log_path = os.path.join(pdir, f"{name}.log")
        self.log(f"prepare {name}: {cmd}")
        t0 = time.time()
        with open(log_path, "a") as logf:
            logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {cmd}\n")
            logf.flush()
            plain = not any(ch in cmd for ch in ";&|<>()$`\n*?")
            self.prep = subprocess.Popen(shlex.split(cmd) if plain else cmd, shell=not plain, cwd=REPO,
                                         env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
            while True:
                self._check_stop()
                try:
                    rc = self.prep.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
            self.prep = None
        if self.stop:
            self.log(f"prepare {name}: stopped ({self.stop}, exit {rc}); it runs again on the next call")
            return False
        if rc != 0:
            self.log(f"prepare {name} FAILED (exit {rc}, {time.time() - t0:.0f} s); log: {log_path}\n"
                     + _indent(tail(log_path)))
            return False
        self.log(f"prepare {name}: ok ({time.time() - t0:.0f} s; log: {log_path})")
        return True

    # --- trainers: start, poll, finish
    def start(self, run: Run, index: int = 0) -> Active:
        if run.status == "changed" and os.path.exists(run.run_dir):
            shutil.rmtree(run.run_dir)
        os.makedirs(run.run_dir, exist_ok=True)
        argv = launch_argv(run, self.jobs)
        rec_path = os.path.join(run.run_dir, RUN_RECORD)
        rec = _read_json(rec_path) or {"cell": run.cell, "method": run.method, "seed": run.seed,
                                       "hash": run.hash, "key": run.key, "attempts": []}
        if run.config_sha is not None:
            rec["config_sha256"] = run.config_sha
        rec["argv"] = argv
        attempt = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
        if self.jobs > 1:
            attempt.update({"jobs": self.jobs, "threads": threads_per_run(run, self.jobs)})
        rec["attempts"].append(attempt)
        _write_json(rec_path, rec)
        log_path = os.path.join(run.run_dir, LOG_NAME)
        metrics_path = os.path.join(run.run_dir, "metrics.jsonl")
        seen = _count_lines(metrics_path)
        logf = open(log_path, "a")
        try:
            logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                       + " ".join(shlex.quote(a) for a in argv) + "\n")
            logf.flush()
            proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        except BaseException:
            logf.close()
            raise
        t0 = time.time()
        a = Active(run, index, argv, proc, logf, rec, rec_path, log_path, metrics_path, seen, t0,
                   next_epochs=t0 + EPOCH_POLL_S)
        self.active.append(a)
        if self.stop:                      # a signal came while it started
            self.terminate()
        return a

    def poll(self) -> List[Active]:
        """The runs that ended since the last call (their .rc set), removed from `active`; prints
        the epoch lines of the others every EPOCH_POLL_S."""
        self._check_stop()
        done, now = [], time.time()
        for a in list(self.active):
            rc = a.proc.poll()
            if rc is not None:
                a.rc = rc
                self.active.remove(a)
                done.append(a)
            elif now >= a.next_epochs:
                a.seen = self._epochs(a.run, a.metrics_path, a.seen)
                a.next_epochs = now + EPOCH_POLL_S
        return done

    def finish(self, a: Active) -> Dict:
        """Record the attempt and judge it. {"status": "stopped"} for a run that a signal stopped
        before it finished: it continues from its checkpoint on the next call."""
        rc = a.rc
        a.seen = self._epochs(a.run, a.metrics_path, a.seen)
        a.logf.close()
        wall = time.time() - a.t0
        report = _read_json(os.path.join(a.run.run_dir, "report.json"))
        stopped = a.signalled and not (rc == 0 and report is not None)
        a.rec["attempts"][-1].update({"exit": rc, "wall_s": round(wall, 1), **({"stopped": True} if stopped else {})})
        _write_json(a.rec_path, a.rec)
        if stopped:
            return {"status": "stopped", "returncode": rc, "wall_s": round(wall, 1)}
        if rc != 0 or report is None:
            why = f"exit {rc}" if rc != 0 else "exit 0 but no report.json"
            return {"status": "failed", "returncode": rc, "error": why, "log": a.log_path,
                    "wall_s": round(wall, 1), "log_tail": tail(a.log_path)}
        return {"status": "ok", "wall_s": round(wall, 1)}

    def abort(self) -> None:
        """Stop every child and wait for it (an error in the harness itself)."""
        if not self.stop:
            self.stop, self.stop_t = "error", time.time()
        try:
            while self.active:
                for a in self.poll():
                    self.finish(a)
                if self.active:
                    time.sleep(POLL_S)
        except BaseException:
            self._kill_all()

    def _epochs(self, run: Run, path: str, seen: int) -> int:
        """One line per finished epoch while a run trains (with --jobs > 1: led by the run's id)."""
        lines = _read_lines(path)
        who = f" {run.id}" if self.jobs > 1 else ""
        for line in lines[seen:]:
            try:
                rec = json.loads(line)
            except ValueError:
                return seen
            acc = _epoch_acc(rec)
            total = f"/{run.epochs}" if run.epochs else ""
            extra = f"  P {rec['n_p_net1']}" if "n_p_net1" in rec else ""
            self.log(f"     {who} epoch {int(rec.get('epoch', 0)) + 1}{total}  test_acc "
                     f"{_pct(acc)}  ({rec.get('epoch_s', 0):.0f} s){extra}")
            seen += 1
        return seen


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _count_lines(path: str) -> int:
    return len(_read_lines(path))


def _read_lines(path: str) -> List[str]:
    try:
        with open(path) as f:
            return [l for l in f.read().splitlines() if l.strip()]
    except OSError:
        return []


def _indent(text: str, pad: str = "    | ") -> str:
    return "".join(pad + l + "\n" for l in text.rstrip("\n").splitlines())


def _epoch_acc(rec: Dict) -> Optional[float]:
    for k in ("test_acc_ensemble", "test_acc_net1", "test_acc"):
        if k in rec:
            return float(rec[k])
    return None


def _pct(x: Optional[float], nd: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{nd}f}%"


# ----------------------------------------------------------------------------- results
def collect(runs: List[Run], outcomes: Dict[str, Dict]) -> List[Dict]:
    out = []
    for r in runs:
        entry = {"cell": r.cell, "method": r.method, "seed": r.seed, "run_dir": r.run_dir, "hash": r.hash}
        oc = outcomes.get(r.id, {})
        st = status_of(r) if not r.config_error else "config_error"
        if st == "done":
            report = _read_json(os.path.join(r.run_dir, "report.json")) or {}
            curve = {}
            for line in _read_lines(os.path.join(r.run_dir, "metrics.jsonl")):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "epoch" in rec and _epoch_acc(rec) is not None:
                    curve[int(rec["epoch"])] = rec        # a resumed epoch: the last record wins
            entry.update({"status": "ok", "test_acc": report.get("test_acc"),
                          "seconds": report.get("seconds"),
                          "curve": [{"epoch": e, "test_acc": _epoch_acc(curve[e]),
                                     **{k: curve[e][k] for k in ("test_acc_net1", "test_acc_net2",
                                                                 "test_acc_ensemble", "n_p_net1")
                                        if k in curve[e]}} for e in sorted(curve)],
                          "report": report})
        elif oc.get("status") == "failed" or r.config_error:
            entry.update({"status": "failed", **{k: v for k, v in oc.items() if k != "status"}})
            if r.config_error:
                entry["error"] = r.config_error
        else:
            entry["status"] = "missing"
            rec = _read_json(os.path.join(r.run_dir, RUN_RECORD)) or {}
            last = (rec.get("attempts") or [{}])[-1] if rec.get("hash") == r.hash else {}
            if last.get("exit") not in (None, 0) and not last.get("stopped"):   # an earlier call's failure
                entry.update({"status": "failed", "returncode": last["exit"], "error": f"exit {last['exit']} "
                              f"(earlier call)", "log": os.path.join(r.run_dir, LOG_NAME)})
        out.append(entry)
    return out


def mean_std(xs: Sequence[float]):
    n = len(xs)
    if n == 0:
        return None, None
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd


def aggregate(grid: Grid, results: List[Dict]) -> List[Dict]:
    aggs = []
    for cell in grid.cells.values():
        for m in cell.methods:
            rs = [r for r in results if r["cell"] == cell.name and r["method"] == m
                  and r["status"] == "ok" and r.get("test_acc") is not None]
            accs = [float(r["test_acc"]) for r in rs]
            mean, sd = mean_std(accs)
            epochs = sorted({p["epoch"] for r in rs for p in r["curve"]})
            curve = []
            for e in epochs:
                vals = [p["test_acc"] for r in rs for p in r["curve"] if p["epoch"] == e]
                curve.append({"epoch": e, "test_acc": sum(vals) / len(vals), "n": len(vals)})
            secs = [float(r["seconds"]) for r in rs if r.get("seconds") is not None]
            aggs.append({"cell": cell.name, "method": m, "n": len(accs),
                         "seeds": [r["seed"] for r in rs], "test_acc_mean": mean, "test_acc_std": sd,
                         "test_accs": accs, "seconds_mean": (sum(secs) / len(secs)) if secs else None,
                         "curve_mean": curve})
    return aggs


def cell_annotation(results: List[Dict], cell: str) -> Dict:
    """The column's statistics (the same for every run of a cell) and the pool sizes and epochs seen."""
    reps = [r.get("report") or {} for r in results if r["cell"] == cell and r["status"] == "ok"]
    if not reps:
        return {}
    out = {k: reps[0].get(k) for k in ("column", "annotator_zero_shot_acc", "annotator_template_avg_acc",
                                       "avg_candidates", "eta")}
    for k in ("train_samples", "epochs"):
        vals = sorted({rep[k] for rep in reps if rep.get(k) is not None})
        out[k] = "-" if not vals else (str(vals[0]) if len(vals) == 1 else f"{vals[0]}-{vals[-1]}")
    return out


def markdown(grid: Grid, results: List[Dict], aggs: List[Dict]) -> str:
    methods = [m for m in grid.methods if any(m in c.methods for c in grid.cells.values())]
    by = {(a["cell"], a["method"]): a for a in aggs}
    lines = [f"# Grid `{grid.name}`", ""]
    if grid.scaling:
        lines += ["Scaling: " + " ".join(grid.scaling.split()), ""]
    lines += ["Every run: " + " ".join(f"`--config {c}`" for c in grid.configs)
              + (f" `{' '.join(grid.base)}`" if grid.base else "") + ", then the cell's and the method's "
              "overrides and `run.seed`.", ""]
    lines += ["Test accuracy (%) of the final epoch (Co-Reg: the two networks' ensemble), "
              "mean ± sample std over seeds (n = finished seeds); best per row in bold. "
              "Images: the training subset (it depends on the seed). Zero-shot / tmpl-avg: the "
              "annotator's accuracy on the test set, first template / template average (the rows "
              "the methods must beat, measured when the column was written); avg |S| and eta: the column's candidate sets "
              "over the whole training pool; from the runs' report.json.", ""]
    head = (["cell", "images", "epochs", "zero-shot", "tmpl-avg", "avg \\|S\\|", "eta"]
            + [grid.methods[m].label for m in methods])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in grid.cells.values():
        ann = cell_annotation(results, cell.name)
        means = [by[(cell.name, m)]["test_acc_mean"] for m in methods
                 if (cell.name, m) in by and by[(cell.name, m)]["test_acc_mean"] is not None]
        best = max(means) if means else None
        row = [cell.label, ann.get("train_samples", "-"), ann.get("epochs", "-"),
               _num(ann.get("annotator_zero_shot_acc"), 100), _num(ann.get("annotator_template_avg_acc"), 100),
               _num(ann.get("avg_candidates"), 1, 3),
               _num(ann.get("eta"), 100)]
        for m in methods:
            a = by.get((cell.name, m))
            if a is None:
                row.append("")
            elif a["n"] == 0:
                row.append("–")
            else:
                s = (f"{100 * a['test_acc_mean']:.2f} ± {100 * a['test_acc_std']:.2f} ({a['n']})" if a["n"] > 1
                     else f"{100 * a['test_acc_mean']:.2f} (1)")
                row.append(f"**{s}**" if best is not None and abs(a["test_acc_mean"] - best) < 1e-12 else s)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Seconds per run (mean over finished seeds):", ""]
    head = ["cell"] + [grid.methods[m].label for m in methods]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in grid.cells.values():
        row = [cell.label]
        for m in methods:
            a = by.get((cell.name, m))
            row.append("" if a is None else (f"{a['seconds_mean']:.0f}" if a["seconds_mean"] else "–"))
        lines.append("| " + " | ".join(row) + " |")
    def method_args(m):
        args = [f"--config {c}" for c in grid.methods[m].configs] + list(grid.methods[m].overrides)
        return f"`{' '.join(args)}`" if args else "(base)"

    lines += ["", "Methods: " + "; ".join(f"{grid.methods[m].label} = {method_args(m)}" for m in methods) + ".",
              "Cells: " + "; ".join(f"{c.label} = " + (f"`{' '.join(c.overrides)}`" if c.overrides else "(base)")
                                         for c in grid.cells.values()) + "."]
    failed = [r for r in results if r["status"] == "failed"]
    missing = [r for r in results if r["status"] == "missing"]
    if failed:
        lines += ["", "Failed runs: " + ", ".join(f"{r['cell']}/{r['method']}/seed{r['seed']} "
                                                  f"({r.get('error', '')})" for r in failed) + "."]
    if missing:
        lines += ["", f"Not run yet: {len(missing)} of {len(results)} runs."]
    return "\n".join(lines) + "\n"


def _num(x, scale=1.0, nd=2) -> str:
    return "-" if x is None else f"{scale * float(x):.{nd}f}"


def plots(grid: Grid, aggs: List[Dict], workdir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = [m for m in grid.methods if any(m in c.methods for c in grid.cells.values())]
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    by = {(a["cell"], a["method"]): a for a in aggs}
    cells = list(grid.cells.values())
    made = []
    # curves: one panel per cell
    ncol = min(3, len(cells))
    nrow = math.ceil(len(cells) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.8 * nrow), squeeze=False)
    for i, cell in enumerate(cells):
        ax = axes[i // ncol][i % ncol]
        for m in cell.methods:
            a = by.get((cell.name, m))
            if a and a["curve_mean"]:
                ax.plot([p["epoch"] + 1 for p in a["curve_mean"]], [100 * p["test_acc"] for p in a["curve_mean"]],
                        marker="o", ms=3, color=colors[m], label=f"{grid.methods[m].label} (n={a['n']})")
        if not ax.lines:
            ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(cell.label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for j in range(len(cells), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.suptitle(f"{grid.name}: test accuracy per epoch (mean over seeds)")
    fig.tight_layout()
    path = os.path.join(workdir, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    # bars: one group per cell, its own methods side by side (cells may have different methods)
    slots = sum(len(c.methods) for c in cells) + 1.5 * (len(cells) - 1)
    fig, ax = plt.subplots(figsize=(min(18.0, 3.5 + 0.38 * slots), 4.8))
    x, ticks, lows, highs, labelled = 0.0, [], [], [], set()
    for cell in cells:
        start = x
        for m in cell.methods:
            a = by.get((cell.name, m))
            if a and a["n"]:
                y, e = 100 * a["test_acc_mean"], 100 * a["test_acc_std"]
                ax.bar(x, y, 0.9, yerr=e if a["n"] > 1 else None, capsize=2, color=colors[m],
                       label=None if m in labelled else grid.methods[m].label)
                labelled.add(m)
                lows.append(y - e)
                highs.append(y + e)
            x += 1
        ticks.append((start + x - 1) / 2)
        x += 1.5
    ax.set_xticks(ticks)
    ax.set_xticklabels([c.label.replace(", ", "\n") for c in cells], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 5), min(100.0, max(highs) + 3))
    ax.set_title(f"{grid.name}: test accuracy, mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    if labelled:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = os.path.join(workdir, "bars.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    return made


def write_outputs(grid: Grid, runs: List[Run], outcomes: Dict[str, Dict], log=print) -> List[Dict]:
    os.makedirs(grid.workdir, exist_ok=True)
    results = collect(runs, outcomes)
    aggs = aggregate(grid, results)
    _write_json(os.path.join(grid.workdir, "results.json"),
                {"grid": grid.name, "grid_file": os.path.abspath(grid.path), "scaling": grid.scaling,
                 "written": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": results, "aggregate": aggs})
    md = markdown(grid, results, aggs)
    with open(os.path.join(grid.workdir, "results.md"), "w") as f:
        f.write(md)
    try:
        plots(grid, aggs, grid.workdir)
    except Exception as exc:  # never lose the tables to a plotting problem
        log(f"plots skipped: {type(exc).__name__}: {exc}")
    return results


# ----------------------------------------------------------------------------- main
def estimate(run: Run, measured: Dict[tuple, List[float]]) -> Optional[float]:
    """Seconds: the same cell and method, else the method in other cells, else the cell, else any."""
    for pick in (lambda c, m: (c, m) == (run.cell, run.method), lambda c, m: m == run.method,
                 lambda c, m: c == run.cell, lambda c, m: True):
        ts = [t for (c, m), v in measured.items() if pick(c, m) for t in v]
        if ts:
            return sum(ts) / len(ts)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", required=True, help="grid YAML (configs/grids/)")
    ap.add_argument("--workdir", default=None, help="where runs and results go (default: the grid's "
                                                     "workdir, else runs/grid/<name>)")
    ap.add_argument("--only", action="append", default=[],
                    help="glob(s) over cell, cell/method or cell/method/seedS (repeatable; commas)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated methods (under the grid's methods:) added to every cell, "
                         "e.g. a switch beyond the preset's table (with --only '*/NAME': just those)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds for every cell (e.g. 0,1,2)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="an override added to every run (changes the runs' hash: they rerun)")
    ap.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="run up to N trainings at once (default 1: one at a time). Each gets "
                         "run.threads=T appended last, T = max(1, its run.threads alone // N) (a run "
                         "without run.threads: the CPU count // N). Not part of a run's definition: "
                         "runs finished with any --jobs are skipped with any other. Results do not "
                         "depend on the thread count except through the order of float sums (not "
                         "bit-identical). Prepare steps all run first, alone")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: rewrite results.json / .md / plots from the finished runs")
    a = ap.parse_args(argv)
    if a.jobs < 1:
        ap.error("--jobs must be at least 1")
    log = lambda s="": print(s, flush=True)  # noqa: E731

    seeds = [int(s) for s in a.seeds.split(",") if s.strip()] if a.seeds else None
    cell_methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    grid = load_grid(a.grid, a.workdir, seeds, cell_methods)
    patterns = [p for item in a.only for p in item.split(",") if p]
    runs = plan_runs(grid, a.extra)
    validate(grid, runs)
    for r in runs:
        r.status = status_of(r)
    todo = [r for r in runs if selected(r, patterns) and r.status != "done" and not r.config_error]
    bad = [r for r in runs if selected(r, patterns) and r.config_error]
    sel = [r for r in runs if selected(r, patterns)]
    counts = {s: sum(r.status == s for r in todo) for s in ("new", "resume", "changed")}

    log(f"== grid {grid.name} ({grid.path}) -> {grid.workdir}")
    if grid.scaling:
        log("   scaling: " + " ".join(grid.scaling.split()))
    if grid.expected_minutes:
        log(f"   expected: about {grid.expected_minutes} min for the whole grid on 2 CPU cores")
    log(f"   {len(grid.cells)} cells, {len(grid.methods)} methods, {len(runs)} runs in the grid; "
        f"selected {len(sel)}: {sum(r.status == 'done' for r in sel)} finished (skipped), "
        f"{counts['new']} new, {counts['resume']} to resume, {counts['changed']} changed "
        f"(definition changed: rerun from scratch), {len(bad)} with config errors")
    if a.extra:
        log(f"   --set: {' '.join(a.extra)}")
    if a.jobs > 1:
        ts = sorted({threads_per_run(r, a.jobs) for r in todo})
        log(f"   --jobs {a.jobs}: up to {a.jobs} runs at a time"
            + (f", run.threads={'/'.join(map(str, ts))} each" if ts else ""))
    for r in bad:
        log(f"   CONFIG ERROR {r.id}: {r.config_error}")

    if a.dry_run:
        needed = [p for p in grid.prepare if any(p in grid.cells[r.cell].prepare for r in todo)]
        for p in needed:
            log(f"   prepare {p}: {_subst(grid.prepare[p], grid.workdir)}")
        for r in sel:
            what = "skip (finished)" if r.status == "done" else ("config error" if r.config_error else r.status)
            log(f"   {r.id:48s} {what:16s} {' '.join(shlex.quote(x) for x in launch_argv(r, a.jobs)[1:])}")
        return 0

    if a.report_only:
        todo = []
    os.makedirs(grid.workdir, exist_ok=True)
    lock = open(os.path.join(grid.workdir, ".grid.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log(f"error: another bench/grid.py is running in {grid.workdir}")
        return 2
    outcomes: Dict[str, Dict] = {r.id: {"status": "failed", "error": r.config_error} for r in bad}
    for r in sel:
        if r.status == "done":
            log(f"   skipped {r.id}: finished (report.json, same definition)")
    measured: Dict[tuple, List[float]] = {}
    for r in runs:                                      # times of finished runs feed the ETA
        if r.status == "done":
            rep = _read_json(os.path.join(r.run_dir, "report.json")) or {}
            if rep.get("seconds"):
                measured.setdefault((r.cell, r.method), []).append(float(rep["seconds"]))
    runner = Runner(grid, log, a.jobs)
    prepared: Dict[str, bool] = {}
    t_start = time.time()
    old = {s: signal.signal(s, runner._signal) for s in (signal.SIGINT, signal.SIGTERM)}
    hows = {"new": "", "resume": " (continuing a killed run: train.resume=latest)",
            "changed": " (definition changed: old run deleted, rerun)"}
    pending = list(todo)                # in plan order; the pool takes from the front
    started, stopped, announced = 0, [], False
    try:
        if runner.jobs > 1:             # every prepare step first, alone, before any run starts
            for p in grid.prepare:
                if not runner.stop and any(p in grid.cells[r.cell].prepare for r in todo):
                    prepared[p] = runner.prepare(p)
        while (pending and not runner.stop) or runner.active:
            while pending and len(runner.active) < runner.jobs and not runner.stop:
                r = pending[0]
                need = [p for p in grid.cells[r.cell].prepare if p not in prepared]
                if need and runner.active:
                    break               # a prepare step runs alone: after the runs in flight
                for p in need:
                    if not runner.stop:
                        prepared[p] = runner.prepare(p)
                if runner.stop:
                    break
                pending.pop(0)
                started += 1
                failed_prep = [p for p in grid.cells[r.cell].prepare if not prepared[p]]
                if failed_prep:
                    outcomes[r.id] = {"status": "failed", "error": f"prepare step {', '.join(failed_prep)} failed"}
                    log(f"[{started}/{len(todo)}] {r.id}: not run (prepare step {', '.join(failed_prep)} failed)")
                    continue
                elapsed = time.time() - t_start
                # ETA: what is left of the runs in flight and the runs to come, shared by the jobs
                ests = [None if e is None else max(0.0, e - (time.time() - x.t0))
                        for x in runner.active for e in [estimate(x.run, measured)]]
                ests += [estimate(x, measured) for x in [r, *pending]]
                eta = sum(ests) / runner.jobs if all(e is not None for e in ests) else None
                flight = ""
                if runner.jobs > 1:
                    ids = [x.run.id for x in runner.active] + [r.id]
                    flight = f"  running {len(ids)}/{runner.jobs}: {', '.join(ids)}"
                log(f"[{started}/{len(todo)}] {r.id}{hows[r.status]}  elapsed {fmt_time(elapsed)}  "
                    f"ETA {fmt_time(eta)}{flight}")
                runner.start(r, started)
            if runner.stop and runner.active and not announced:
                announced = True
                log(f"\n{runner.stop}: stopping {', '.join(x.run.id for x in runner.active)} (SIGTERM: "
                    f"a checkpoint, then exit; a second Ctrl-C kills at once)")
            for x in runner.poll():
                r, oc = x.run, runner.finish(x)
                if oc["status"] == "stopped":
                    stopped.append(r.id)
                    continue
                outcomes[r.id] = oc
                if oc["status"] == "ok":
                    rep = _read_json(os.path.join(r.run_dir, "report.json")) or {}
                    measured.setdefault((r.cell, r.method), []).append(float(rep.get("seconds") or oc["wall_s"]))
                    extra = f" (net1 {_pct(rep.get('test_acc_net1'))})" if "test_acc_ensemble" in rep else ""
                    log(f"    done {r.id}: test_acc {_pct(rep.get('test_acc'))}{extra}  "
                        f"{rep.get('seconds', oc['wall_s'])} s")
                else:
                    log(f"    FAILED {r.id}: {oc['error']}; log: {oc['log']}\n" + _indent(oc["log_tail"]))
            if runner.active:
                time.sleep(POLL_S)
    except BaseException:               # a bug in the harness: do not leave trainers behind
        runner.abort()
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    interrupted = runner.stop or None
    if interrupted:
        if len(stopped) == 1:
            log(f"\n{interrupted}: stopped; the interrupted run continues from its checkpoint on the next call")
        elif stopped:
            log(f"\n{interrupted}: stopped; the interrupted runs ({', '.join(stopped)}) continue from "
                f"their checkpoints on the next call")
        else:
            log(f"\n{interrupted}: stopped")

    results = write_outputs(grid, runs, outcomes, log)
    mine = {r.id for r in sel}
    failed = [x for x in results if x["status"] == "failed" and
              f"{x['cell']}/{x['method']}/seed{x['seed']}" in mine]
    ok = sum(x["status"] == "ok" for x in results)
    log(f"\n== {grid.name}: {ok}/{len(results)} runs of the grid finished; this call ran "
        f"{sum(o.get('status') == 'ok' for o in outcomes.values())} in {fmt_time(time.time() - t_start)}")
    with open(os.path.join(grid.workdir, "results.md")) as f:
        log(f.read())
    log(f"results: {os.path.join(grid.workdir, 'results.json')}, results.md, curves.png, bars.png")
    if failed:
        log(f"FAILED ({len(failed)}): " + ", ".join(f"{x['cell']}/{x['method']}/seed{x['seed']}"
                                                    for x in failed))
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
