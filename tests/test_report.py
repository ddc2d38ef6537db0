"""train.report (report.json, plots, report.md) and train.metrics_log (metrics.jsonl, TensorBoard)."""
from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pytest

from train.metrics_log import MetricsLogger, read_metrics
from train.report import format_seconds, format_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def coreg_history(epochs: int = 5):
    rng = np.random.default_rng(0)
    hist = []
    for e in range(epochs):
        t = (e + 1) / epochs
        hist.append({
            "epoch": e,
            "test_acc_net1": 0.55 + 0.2 * t + 0.01 * rng.random(),
            "test_acc_net2": 0.54 + 0.2 * t + 0.01 * rng.random(),
            "test_acc_ensemble": 0.56 + 0.21 * t,
            "n_p_net1": int(30000 + 8000 * t), "n_p_net2": int(29500 + 8200 * t),
            "n_u_net1": int(29000 - 8000 * t), "n_u_net2": int(29500 - 8200 * t),
            "p_label_acc_net1": 0.80 + 0.1 * t, "p_label_acc_net2": 0.79 + 0.1 * t,
            "u_label_acc_net1": 0.40 + 0.1 * t, "u_label_acc_net2": 0.41 + 0.1 * t,
            "p_coverage_net1": 0.95, "u_coverage_net1": 0.6 + 0.05 * t,
            "loss/ce_net1": 2.0 / (e + 1), "loss/ce_net2": 2.1 / (e + 1),
            "loss_reg": 0.3 / (e + 1),
            "lr": 0.05 * (1 - t),
        })
    return hist


def coreg_report():
    return {"method": "coreg", "dataset": "fashion_mnist",
            "annotator_zero_shot_acc": 0.6146, "annotator_template_avg_acc": 0.5873,
            "avg_candidates": 1.5812, "eta": 0.2241,
            "test_acc_net1": 0.7612, "test_acc_net2": 0.7588, "test_acc_ensemble": 0.7733,
            "epochs": 5, "seconds": 754.2, "config_file": "configs/demo.yaml",
            "device": "cpu", "samples_per_s": 1234.56, "bad": float("nan")}


def confusion10():
    rng = np.random.default_rng(1)
    cm = rng.integers(0, 40, (10, 10))
    cm[np.arange(10), np.arange(10)] += 600
    return cm


def assert_png(path):
    assert os.path.exists(path), path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 5000, (path, os.path.getsize(path))


def test_write_report_coreg(tmp_path):
    run = str(tmp_path / "run")
    report = coreg_report()
    table = write_report(run, report, coreg_history(), confusion10(), CLASSES)

    for name in ("accuracy.png", "partition.png", "losses.png", "confusion.png"):
        assert_png(os.path.join(run, "plots", name))
    back = json.load(open(os.path.join(run, "report.json")))
    assert back["bad"] is None                       # NaN -> null, valid JSON
    assert {k: v for k, v in back.items() if k != "bad"} == \
        {k: v for k, v in report.items() if k != "bad"}

    for s in ("61.46%", "58.73%", "1.581", "22.41%", "76.12%", "75.88%", "77.33%",
              "12m 34s", "| 5 |"):
        assert s in table, (s, table)
    assert table == format_table(report)
    assert all(row.count("|") == 3 for row in table.splitlines())   # no stray pipes in cells
    assert "Test acc (the method" not in table                 # single-network key absent: no row

    md = open(os.path.join(run, "report.md")).read()
    assert md.startswith("# coreg - fashion_mnist")
    assert table.strip() in md
    assert "+15.87 points" in md                     # 77.33 - 61.46
    for name in ("accuracy", "partition", "losses", "confusion"):
        assert f"](plots/{name}.png)" in md
    assert "configs/demo.yaml" in md and "cpu" in md and "1,234.6" in md
    assert not glob.glob(os.path.join(run, "**", "*.tmp-*"), recursive=True)


def test_write_report_pce_skips_absent_plots(tmp_path):
    run = str(tmp_path / "pce")
    # An earlier run in the same folder left a partition plot: it must not survive.
    os.makedirs(os.path.join(run, "plots"))
    open(os.path.join(run, "plots", "partition.png"), "wb").write(PNG_MAGIC)
    hist = [{"epoch": e + 1, "test_acc": 0.5 + 0.05 * e, "loss": {"pce": 1.5 - 0.2 * e}}
            for e in range(5)]
    hist[2]["test_acc"] = float("nan")               # a missing evaluation is skipped
    report = {"method": "pce", "dataset": {"name": "fashion_mnist"},
              "annotator_zero_shot_acc": 0.6146, "test_acc": 0.7, "seconds": 3725}
    table = write_report(run, report, hist, None, [])
    assert_png(os.path.join(run, "plots", "accuracy.png"))
    assert_png(os.path.join(run, "plots", "losses.png"))   # nested {"loss": {...}} -> loss/pce
    assert not os.path.exists(os.path.join(run, "plots", "partition.png"))
    assert not os.path.exists(os.path.join(run, "plots", "confusion.png"))
    assert "| Test acc (the method's prediction) | 70.00% |" in table and "1h 02m 05s" in table
    assert "net1" not in table
    md = open(os.path.join(run, "report.md")).read()
    assert "partition.png" not in md and "confusion.png" not in md
    assert "+8.54 points" in md
    assert "- samples/s: -" in md


def test_write_report_empty_history(tmp_path):
    table = write_report(str(tmp_path), {}, [], None, [])
    assert table.startswith("| Metric | Value |")
    assert os.listdir(tmp_path / "plots") == []
    assert os.path.exists(tmp_path / "report.md")


def test_format_seconds():
    assert format_seconds(754.2) == "12m 34s"
    assert format_seconds(5) == "0m 05s"
    assert format_seconds(3725) == "1h 02m 05s"


def test_metrics_logger_resume(tmp_path):
    run = str(tmp_path / "run")
    log = MetricsLogger(run)
    for rec in coreg_history(5):
        log.log_epoch(rec)
    log.log_epoch({"epoch": 5, "loss": {"ce": float("inf"), "n": np.int64(3)},
                   "test_acc": np.float32(0.5)})
    log.close()
    hist = read_metrics(run)
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3, 4, 5]
    assert hist[5]["loss"] == {"ce": None, "n": 3} and math.isclose(hist[5]["test_acc"], 0.5)
    assert hist[0]["n_p_net1"] == coreg_history(5)[0]["n_p_net1"]
    assert glob.glob(os.path.join(run, "tb", "events.out.tfevents.*"))
    for line in open(os.path.join(run, "metrics.jsonl")):
        json.loads(line)                              # strict JSON: no NaN / Infinity

    log = MetricsLogger(run, resume_epoch=3)          # epochs 3, 4, 5 are dropped
    assert [r["epoch"] for r in log.history()] == [0, 1, 2]
    log.log_epoch({"epoch": 3, "test_acc_net1": 0.9})
    assert [r["epoch"] for r in log.history()] == [0, 1, 2, 3]
    assert log.history()[3] == {"epoch": 3, "test_acc_net1": 0.9}
    log.close()
    assert len(open(os.path.join(run, "metrics.jsonl")).read().splitlines()) == 4

    # TensorBoard got the scalars, nested ones as "group/key".
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(os.path.join(run, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"test_acc_net1", "n_p_net1", "loss/ce_net1", "loss/n", "test_acc"} <= tags
    assert "loss/ce" not in tags                      # inf is not written to TensorBoard
    steps = [e.step for e in acc.Scalars("test_acc_net1")]
    assert steps == [0, 1, 2, 3]                      # the purge hid the old step 3 and 4


def test_metrics_logger_rejects_bad_epoch(tmp_path):
    with MetricsLogger(str(tmp_path), tensorboard=False) as log:
        with pytest.raises(ValueError):
            log.log_epoch({"loss": 1.0})
        with pytest.raises(ValueError):
            log.log_epoch({"epoch": 1.5})
        log.log_epoch({"epoch": 0, "x": 1})
    assert read_metrics(str(tmp_path)) == [{"epoch": 0, "x": 1}]


def test_metrics_logger_without_tensorboard(tmp_path, monkeypatch):
    import builtins
    import train.metrics_log as ml

    real_import = builtins.__import__

    def no_tb(name, *args, **kw):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard here")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    monkeypatch.setattr(ml, "_TB_WARNED", False)
    with pytest.warns(RuntimeWarning, match="TensorBoard unavailable"):
        log = MetricsLogger(str(tmp_path))
    log.log_epoch({"epoch": 0, "test_acc": 0.5})
    log.close()
    assert log.history() == [{"epoch": 0, "test_acc": 0.5}]
    assert not os.path.exists(tmp_path / "tb")
