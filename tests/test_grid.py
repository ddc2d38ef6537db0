"""bench/grid.py on a tiny dataset: runs, results (JSON, markdown, plots), skip on rerun, rerun of
exactly the runs whose definition changed, a failing run reported without stopping the grid."""
import importlib.util
import json
import os
import re
import statistics
import sys

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
    assert re.search(r"\| 64 \| 2 \| - \| 1\.\d{3} \| \d+\.\d\d \|", row)   # images, epochs, zero-shot, |S|, eta
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
