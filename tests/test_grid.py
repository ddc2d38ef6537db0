"""bench/grid.py on a tiny dataset: runs, results (JSON, markdown, plots), skip on rerun, rerun of
exactly the runs whose definition changed, a failing run reported without stopping the grid."""
import importlib.util
import json
import os
import re
import statistics
import sys

import pytest

from tests.helpers import ROOT, make_labeled_dataset

spec = importlib.util.spec_from_file_location("bench_grid", os.path.join(ROOT, "bench", "grid.py"))
grid_mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = grid_mod          # dataclasses look their module up there
spec.loader.exec_module(grid_mod)

FAST = ["train.column=synthetic", "train.epochs=2", "train.batch_size=8", "train.eval_batch_size=16",
        "coreg.warm_up=1", "coreg.feature_start=0", "coreg.queue_size=32", "coreg.rampup_epochs=2",
        "train.lr_period=0", "data.streams=2", "data.shuffle_buffer=8", "data.image_size=16",
        "run.threads=1"]


def write_grid(path, root, coreg_extra=(), broken_cell=False):
    def flow(xs):
        return "[" + ", ".join(xs) + "]"
    text = f"""
name: tiny
scaling: "tiny test grid: 64 images, 2 epochs"
base:
  overrides: {flow([f"data.root={root}", *FAST])}
env: {{OMP_NUM_THREADS: "1", PYTHONWARNINGS: ignore}}
methods:
  pce: {{overrides: [train.method=pce], label: partial CE}}
  coreg: {{overrides: {flow(["train.method=coreg", *coreg_extra])}, label: Co-Reg}}
default_methods: [pce, coreg]
seeds: [0, 1]
cells:
  tiny_syn: {{label: "tiny synthetic", overrides: []}}
"""
    if broken_cell:   # a column that does not exist: the trainer fails at start-up
        text += "  broken: {label: broken, overrides: [train.column=nope], methods: [pce], seeds: [0]}\n"
    path.write_text(text)


def mtimes(wd):
    return {(m, s): os.stat(os.path.join(wd, "tiny_syn", m, f"seed{s}", "report.json")).st_mtime_ns
            for m in ("pce", "coreg") for s in (0, 1)}


def test_grid_runs_skips_and_reruns_changed(tmp_path, capsys):
    root = make_labeled_dataset(str(tmp_path / "data"), n_train=64, n_test=24)
    gy, wd = tmp_path / "grid.yaml", str(tmp_path / "wd")
    args = ["--grid", str(gy), "--workdir", wd]

    # 1. everything runs; the broken cell fails, is reported, and the grid goes on (exit 1)
    write_grid(gy, root, broken_cell=True)
    assert grid_mod.main(args) == 1
    out = capsys.readouterr().out
    assert "[5/5]" in out and out.count("    done ") == 4
    assert "FAILED broken/pce/seed0: exit" in out and "column 'nope'" in out
    assert "FAILED (1): broken/pce/seed0" in out

    res = json.load(open(os.path.join(wd, "results.json")))
    runs = {(r["cell"], r["method"], r["seed"]): r for r in res["runs"]}
    assert len(runs) == 5 and runs[("broken", "pce", 0)]["status"] == "failed"
    assert runs[("broken", "pce", 0)]["returncode"] != 0
    for m in ("pce", "coreg"):
        for s in (0, 1):
            r = runs[("tiny_syn", m, s)]
            rep = json.load(open(os.path.join(wd, "tiny_syn", m, f"seed{s}", "report.json")))
            assert r["status"] == "ok" and r["test_acc"] == rep["test_acc"] and r["report"]["method"] == m
            assert [p["epoch"] for p in r["curve"]] == [0, 1]
            assert abs(r["curve"][-1]["test_acc"] - r["test_acc"]) < 1e-9   # the final epoch's accuracy
            assert r["seconds"] > 0
    aggs = {(a["cell"], a["method"]): a for a in res["aggregate"]}
    for m in ("pce", "coreg"):
        accs = [runs[("tiny_syn", m, s)]["test_acc"] for s in (0, 1)]
        a = aggs[("tiny_syn", m)]
        assert a["n"] == 2 and abs(a["test_acc_mean"] - statistics.mean(accs)) < 1e-12
        assert abs(a["test_acc_std"] - statistics.stdev(accs)) < 1e-12
        assert len(a["curve_mean"]) == 2
    assert aggs[("broken", "pce")]["n"] == 0

    md = open(os.path.join(wd, "results.md")).read()
    assert "| tiny synthetic |" in md and "| broken |" in md
    assert "partial CE" in md and "Co-Reg" in md and "Failed runs: broken/pce/seed0" in md
    row = next(l for l in md.splitlines() if l.startswith("| tiny synthetic |"))
    cells = {}
    for m in ("pce", "coreg"):
        a = aggs[("tiny_syn", m)]
        cells[m] = f"{100 * a['test_acc_mean']:.2f} ± {100 * a['test_acc_std']:.2f} (2)"
        assert cells[m] in row
    best = max(("pce", "coreg"), key=lambda m: aggs[("tiny_syn", m)]["test_acc_mean"])
    assert f"**{cells[best]}**" in row and row.count("**") == 2
    assert re.search(r"\| 64 \| 2 \| - \| - \| 1\.\d{3} \| \d+\.\d\d \|", row)   # images, epochs, zero-shot, tmpl-avg, |S|, eta
    for png in ("curves.png", "bars.png"):
        with open(os.path.join(wd, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    before = mtimes(wd)

    # 2. a rerun (broken cell gone) skips every finished run: nothing retrains
    write_grid(gy, root)
    assert grid_mod.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped tiny_syn/") == 4 and "[1/" not in out
    assert "4/4 runs of the grid finished; this call ran 0" in out
    assert mtimes(wd) == before

    # 3. one method's definition changes: exactly its runs rerun, from scratch
    write_grid(gy, root, coreg_extra=["coreg.mixup_alpha=2.0"])
    assert grid_mod.main(args) == 0
    out = capsys.readouterr().out
    assert "2 changed" in out and "[2/2]" in out and "[3/" not in out
    assert out.count("(definition changed: old run deleted, rerun)") == 2
    assert "skipped tiny_syn/pce/seed0" in out and "skipped tiny_syn/pce/seed1" in out
    after = mtimes(wd)
    for s in (0, 1):
        assert after[("pce", s)] == before[("pce", s)]
        assert after[("coreg", s)] != before[("coreg", s)]
    rec = json.load(open(os.path.join(wd, "tiny_syn", "coreg", "seed0", "grid_run.json")))
    assert "coreg.mixup_alpha=2.0" in rec["argv"] and len(rec["attempts"]) == 1

    # 4. the plan now has nothing to do
    assert grid_mod.main(args + ["--dry-run"]) == 0
    assert capsys.readouterr().out.count("skip (finished)") == 4

    # 5. --methods adds a method the grid defines to every cell; an unknown one is named
    write_grid(gy, root, coreg_extra=["coreg.mixup_alpha=2.0"], broken_cell=True)  # broken: pce only
    assert grid_mod.main(args + ["--dry-run", "--only", "broken"]) == 0
    assert "broken/coreg" not in capsys.readouterr().out
    assert grid_mod.main(args + ["--dry-run", "--methods", "coreg", "--only", "broken"]) == 0
    out = capsys.readouterr().out
    assert "broken/pce/seed0" in out and "broken/coreg/seed0" in out
    with pytest.raises(SystemExit, match="--methods nope"):
        grid_mod.main(args + ["--dry-run", "--methods", "nope"])


def test_an_edited_preset_reruns_its_runs(tmp_path, capsys):
    """The command names a preset; what it says is part of the definition too (so is a changed
    default of the code): editing it reruns the runs that stack it, not the others."""
    gy, _ = write_fake_grid(tmp_path, bad_cell=False, seeds=(0,))
    preset = tmp_path / "preset.yaml"
    preset.write_text("train:\n  lr: 0.05\n")
    text = gy.read_text().replace("  coreg: [train.method=coreg]",
                                  f"  coreg: {{overrides: [train.method=coreg], config: [{preset}]}}")
    gy.write_text(text)
    wd = str(tmp_path / "wd")
    args = ["--grid", str(gy), "--workdir", wd]
    assert grid_mod.main(args) == 0
    rec = json.load(open(os.path.join(wd, "a", "coreg", "seed0", "grid_run.json")))
    assert len(rec["config_sha256"]) == 16
    assert grid_mod.main(args + ["--dry-run"]) == 0
    assert capsys.readouterr().out.count("skip (finished)") == 2
    preset.write_text("train:\n  lr: 0.01\n")
    assert grid_mod.main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 changed" in out and out.count("skip (finished)") == 1
    assert grid_mod.main(args) == 0
    out = capsys.readouterr().out
    assert "skipped a/pce/seed0" in out and "(definition changed: old run deleted, rerun)" in out


# ----------------------------------------------------------------------------- --jobs
# A stand-in trainer (no torch): takes the trainer's command line, sleeps through its epochs,
# writes metrics.jsonl and report.json whose numbers depend only on (method, seed, epochs), logs
# its start / end / stop to FAKE_TIMELINE, checkpoints-and-exits 75 on SIGTERM, fails when
# train.max_train_samples=13. As a prepare step (`fake.py prepare NAME`): sleeps and logs.
FAKE = r'''
import json, os, signal, sys, time
tl = os.environ["FAKE_TIMELINE"]
def note(*xs):
    with open(tl, "a") as f:
        f.write(" ".join(map(str, xs)) + "\n")
if sys.argv[1] == "prepare":
    note("pstart", sys.argv[2], time.time()); time.sleep(0.5); note("pend", sys.argv[2], time.time())
    sys.exit(0)
kv = {}
for a in sys.argv[1:]:
    if "=" in a:
        k, v = a.split("=", 1)
        kv[k] = v                                  # the last one wins, as in the trainer
out, seed, method = kv["run.out_dir"], int(kv["run.seed"]), kv["train.method"]
epochs, ep_s = int(kv.get("train.epochs", 2)), float(os.environ.get("FAKE_EPOCH_S", "0.5"))
rid = "/".join(out.split(os.sep)[-3:])
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
note("start", rid, time.time(), kv.get("run.threads"))
if kv.get("train.max_train_samples") == "13":
    print("boom: no such column"); sys.exit(3)
mpath = os.path.join(out, "metrics.jsonl")
done = len(open(mpath).read().splitlines()) if os.path.exists(mpath) else 0   # resume
acc = lambda e: round(0.3 + ((7 * seed + 3 * len(method) + 5 * e) % 40) / 100, 4)
for e in range(done, epochs):
    t_end = time.time() + ep_s
    while time.time() < t_end:
        if stop:
            note("stopped", rid, time.time()); sys.exit(75)
        time.sleep(0.02)
    with open(mpath, "a") as f:
        f.write(json.dumps({"epoch": e, "test_acc": acc(e), "epoch_s": 0.5}) + "\n")
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump({"method": method, "test_acc": acc(epochs - 1), "seconds": 1.0 * epochs,
               "train_samples": 64, "epochs": epochs}, f)
note("end", rid, time.time())
'''


def write_fake_grid(tmp_path, base_threads=2, seeds=(0, 1), bad_cell=True):
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE)
    timeline = tmp_path / "timeline.txt"
    text = f"""
name: fake
launcher: ["{{python}}", "{fake}"]
env: {{FAKE_TIMELINE: "{timeline}"}}
base:
  overrides: [run.threads={base_threads}, train.epochs=2]
prepare:
  cols: "{{python}} {fake} prepare cols"
methods:
  pce: [train.method=pce]
  coreg: [train.method=coreg]
seeds: [{", ".join(map(str, seeds))}]
cells:
  a: {{label: cell a, overrides: []}}
"""
    if bad_cell:
        text += "  bad: {label: bad, overrides: [train.max_train_samples=13], methods: [pce], seeds: [0]}\n"
    gy = tmp_path / "fake.yaml"
    gy.write_text(text)
    return gy, timeline


def read_timeline(path):
    ev = {}
    for line in open(path).read().splitlines():
        kind, rid, t, *rest = line.split()
        ev.setdefault(rid, {})[kind] = float(t)
        if kind == "start":
            ev[rid]["threads"] = rest[0]
    return ev


def comparable(wd):
    """results.json without what names the place or the moment."""
    res = json.load(open(os.path.join(wd, "results.json")))
    runs = []
    for r in res["runs"]:
        r = {k: v for k, v in r.items() if k not in ("run_dir", "log", "log_tail", "wall_s")}
        runs.append(r)
    return runs, res["aggregate"]


def test_jobs_runs_concurrently_same_results_and_skips(tmp_path, capsys):
    gy, timeline = write_fake_grid(tmp_path)
    wd1, wd2 = str(tmp_path / "wd1"), str(tmp_path / "wd2")

    # --jobs 1 (the default): one at a time, launched exactly as before (no run.threads added)
    assert grid_mod.main(["--grid", str(gy), "--workdir", wd1]) == 1      # the bad run fails
    out = capsys.readouterr().out
    assert out.count("    done a/") == 4 and "FAILED bad/pce/seed0: exit 3" in out
    assert "running " not in out and "--jobs" not in out
    ev = read_timeline(timeline)
    spans = sorted((e["start"], e["end"]) for rid, e in ev.items() if "end" in e)
    assert len(spans) == 4 and all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))
    assert {e["threads"] for rid, e in ev.items() if "start" in e} == {"2"}     # the base's, alone
    rec = json.load(open(os.path.join(wd1, "a", "pce", "seed0", "grid_run.json")))
    assert rec["argv"][-1] == "train.resume=latest" and "jobs" not in rec["attempts"][-1]
    os.remove(timeline)

    # --jobs 2: two at a time, run.threads=2//2 last, the prepare step before any run
    assert grid_mod.main(["--grid", str(gy), "--workdir", wd2, "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert out.count("    done a/") == 4 and "FAILED bad/pce/seed0: exit 3" in out   # did not stop the others
    assert "--jobs 2: up to 2 runs at a time, run.threads=1 each" in out
    assert re.search(r"\[2/5\] a/coreg/seed0 .*running 2/2: a/pce/seed0, a/coreg/seed0", out)
    assert re.search(r"      a/\w+/seed\d epoch 1/2  test_acc", out)      # epoch lines name their run
    ev = read_timeline(timeline)
    runs_ev = {rid: e for rid, e in ev.items() if "start" in e}
    assert {e["threads"] for e in runs_ev.values()} == {"1"}
    assert ev["cols"]["pend"] <= min(e["start"] for e in runs_ev.values())
    spans = [(e["start"], e["end"]) for e in runs_ev.values() if "end" in e]
    at_once = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert at_once == 2                                 # two overlapped, never three
    rec = json.load(open(os.path.join(wd2, "a", "pce", "seed0", "grid_run.json")))
    assert rec["argv"][-2:] == ["train.resume=latest", "run.threads=1"]
    assert rec["attempts"][-1]["jobs"] == 2 and rec["attempts"][-1]["threads"] == 1
    assert rec["hash"] == json.load(open(os.path.join(wd1, "a", "pce", "seed0", "grid_run.json")))["hash"]

    # the same results either way
    assert comparable(wd1) == comparable(wd2)
    md1, md2 = (open(os.path.join(w, "results.md")).read() for w in (wd1, wd2))
    assert md1 == md2

    # a rerun with another --jobs skips every finished run (the failed one runs again)
    for wd, jobs in ((wd1, "3"), (wd2, "1")):
        assert grid_mod.main(["--grid", str(gy), "--workdir", wd, "--jobs", jobs]) == 1
        out = capsys.readouterr().out
        assert out.count("skipped a/") == 4 and "this call ran 0" in out and "[1/1] bad/pce/seed0" in out


def test_jobs_sigterm_stops_every_run_and_they_resume(tmp_path):
    import signal
    import subprocess
    import time

    gy, timeline = write_fake_grid(tmp_path, seeds=(0,), bad_cell=False)
    wd = str(tmp_path / "wd")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "grid.py"), "--grid", str(gy), "--workdir", wd,
           "--jobs", "2"]
    env = dict(os.environ, FAKE_EPOCH_S="3")           # long epochs: the signal lands mid-run
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 20
    while time.time() < deadline:
        if os.path.exists(timeline) and sum(l.startswith("start ") for l in open(timeline)) == 2:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        raise AssertionError("the two runs did not start: " + proc.communicate()[0])
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 130, out
    assert "SIGTERM: stopping a/pce/seed0, a/coreg/seed0" in out
    assert "the interrupted runs (a/pce/seed0, a/coreg/seed0) continue" in out
    ev = read_timeline(timeline)
    assert "stopped" in ev["a/pce/seed0"] and "stopped" in ev["a/coreg/seed0"]   # both told, both waited for
    for m in ("pce", "coreg"):
        rec = json.load(open(os.path.join(wd, "a", m, "seed0", "grid_run.json")))
        assert rec["attempts"][-1]["stopped"] is True and rec["attempts"][-1]["exit"] == 75
    res = json.load(open(os.path.join(wd, "results.json")))
    assert {r["status"] for r in res["runs"]} == {"missing"}

    # the next call, with --jobs 1, continues both (status resume), not from scratch
    out = subprocess.run(cmd[:-2], capture_output=True, text=True).stdout
    assert "2 to resume" in out and out.count("(continuing a killed run: train.resume=latest)") == 2
    assert "2/2 runs of the grid finished; this call ran 2" in out
