"""Idempotent label columns with provenance (annotate/provenance.py, annotate/columns.py):
content hashes in the markers, skip / refuse / overwrite, totals derived from markers, status,
--redo-errors, and the SLURM array task ordinal of slurm/annotate.sbatch."""
import glob
import json
import os
import re
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from annotate.cli import annotate_clip, annotate_synthetic, array_task_from_env, column_status, main
from annotate.columns import write_column
from annotate.labelers import ClipLabeler, SyntheticLabeler
from annotate.provenance import (ColumnSpec, StaleColumnError, classify, column_lock,
                                 refresh_column_info)
from coreg_dist.config import CLIP_TEMPLATES_27, load_config
from coreg_dist.shards.format import (CAND, VOTES, FormatError, check_column_current,
                                      column_shard_path, image_shard_path, read_column_info,
                                      read_manifest, stats_path)
from coreg_dist.shards.reader import ErrorLog, iter_joined, iter_tar
from coreg_dist.shards.writer import ShardWriter
from tests.helpers import ROOT, make_dataset, make_tiny_clip

TEMPLATES = CLIP_TEMPLATES_27[:4]
SBATCH = os.path.join(ROOT, "slurm", "annotate.sbatch")
QUIET = dict(stream=open(os.devnull, "w"))


def templates(ts):
    return "annotator.templates=[" + ",".join(f"'{t}'" for t in ts) + "]"


@pytest.fixture()
def clip_ds(tmp_path):
    """5 train shards (16 images each), 1 test shard of 12, 4 classes, a tiny random CLIP."""
    root = str(tmp_path / "ds")
    m = make_dataset(root, n_train=80, n_test=12, num_classes=4, shard_size=16, size=28)
    clip = make_tiny_clip(str(tmp_path / "clip"), m.classes)
    ov = [f"data.root={root}", f"run.out_dir={tmp_path}/run", f"annotator.model={clip}",
          "annotator.batch_size=8", "annotator.store_topk=3", templates(TEMPLATES)]
    return root, ov, tmp_path


@pytest.fixture()
def syn_ds(tmp_path):
    root = str(tmp_path / "ds")
    make_dataset(root, n_train=48, n_test=8, num_classes=4, shard_size=16, size=16)
    return root, [f"data.root={root}", f"run.out_dir={tmp_path}/run"], tmp_path


def marker(root, column, shard):
    return json.load(open(stats_path(column_shard_path(root, column, shard))))


def snapshot(root, column):
    """Every tar and marker of the column: (bytes, mtime_ns)."""
    folder = os.path.join(root, "columns", column)
    return {n: (open(os.path.join(folder, n), "rb").read(), os.stat(os.path.join(folder, n)).st_mtime_ns)
            for n in sorted(os.listdir(folder)) if n.endswith((".tar", ".stats.json"))}


def recount(root, column, split, single=0):
    """Statistics recomputed from the column's records themselves (not from any marker)."""
    n = cands = covered = 0
    per_t = None
    for s in iter_joined(root, split, [column], errors=ErrorLog(**QUIET)):
        c, y = s[column], s["cls"]
        n += 1
        cands += len(c[CAND])
        covered += int(y in c[CAND].tolist())
        if VOTES in c:
            hit = (c[VOTES] == y).astype(int)
            per_t = hit if per_t is None else per_t + hit
    out = {"n_images": n, "avg_candidates": cands / n, "coverage": covered / n}
    if per_t is not None:
        out["zero_shot_acc"] = per_t[single] / n
        out["per_template_acc"] = [round(v / n, 5) for v in per_t]
    return out


# ---------------------------------------------------------------------- skip / refuse / overwrite
def test_rerun_skips_shards_whose_hash_matches(clip_ds):
    root, ov, _ = clip_ds
    annotate_clip(load_config(None, ov), "cpu")
    m = marker(root, "clip", "train-000001")
    assert re.fullmatch(r"[0-9a-f]{64}", m["content_hash"])
    inputs = m["content_inputs"]
    assert inputs["labeler"]["templates"] == TEMPLATES and inputs["labeler"]["rule"] == "union_argmax"
    assert "topk" not in inputs["labeler"]            # a parameter union_argmax does not read
    assert "path" not in inputs["labeler"] and len(inputs["labeler"]["weights_sha256"]) == 64
    img = json.load(open(stats_path(image_shard_path(root, "train-000001"))))
    assert inputs["image_shard"] == {"name": "train-000001", "n": 16, "first_key": "train_00016",
                                     "last_key": "train_00031", "sha256": img["sha256"],
                                     "bytes": os.path.getsize(image_shard_path(root, "train-000001"))}
    before, info = snapshot(root, "clip"), read_column_info(root, "clip")
    annotate_clip(load_config(None, ov), "cpu")
    assert snapshot(root, "clip") == before           # no tar or marker rewritten
    assert read_column_info(root, "clip") == info
    # an unused rule parameter changes nothing either
    annotate_clip(load_config(None, ov + ["annotator.topk=2"]), "cpu")
    assert snapshot(root, "clip") == before
    # another process computes the same hashes (sorted JSON, no volatile fields)
    r = subprocess.run([sys.executable, "-m", "annotate.cli", "status", *ov, "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-2000:]
    st = json.loads(r.stdout)
    assert st["complete"] and st["hash_checked"]
    assert (st["splits"]["train"]["done"], st["splits"]["test"]["done"]) == (5, 1)


def test_changed_templates_are_refused_naming_shard_column_and_change(clip_ds, capsys):
    root, ov, _ = clip_ds
    annotate_clip(load_config(None, ov), "cpu")
    before, info = snapshot(root, "clip"), read_column_info(root, "clip")
    other = ov + [templates(TEMPLATES[:2])]
    with pytest.raises(StaleColumnError) as e:
        annotate_clip(load_config(None, other), "cpu")
    msg = str(e.value)
    assert "column 'clip'" in msg and "shard train-000000" in msg
    assert "labeler.templates" in msg and "labeler.num_templates (was 4, now 2)" in msg
    assert "annotator.overwrite=true" in msg and "annotator.column" in msg and "vlm.column" in msg
    assert "5 more shard(s)" in msg                    # 4 more train shards and the test shard
    assert snapshot(root, "clip") == before and read_column_info(root, "clip") == info
    # the command line: exit status 1 and the same message, nothing written
    assert main(["clip", *other]) == 1
    assert "labeler.templates" in capsys.readouterr().err
    # another rule is refused too, naming the rule and the parameter it now reads
    with pytest.raises(StaleColumnError, match=r"labeler\.rule \(was \"union_argmax\", now \"topk\"\)"):
        annotate_clip(load_config(None, ov + ["annotator.rule=topk", "annotator.topk=2"]), "cpu")
    assert snapshot(root, "clip") == before


class Probe:
    """Wraps a labeler: records whether the shard's marker exists while it is being relabeled,
    and raises (a simulated crash) at the crash_at-th batch."""

    def __init__(self, inner, root, crash_at=None):
        self.inner, self.root, self.crash_at = inner, root, crash_at
        self.needs_images = inner.needs_images
        self.marker_seen = []

    def provenance(self):
        return self.inner.provenance()

    def content_provenance(self):
        return self.inner.content_provenance()

    def label(self, images, true, keys):
        split, idx = keys[0].split("_")
        shard = f"{split}-{int(idx) // 16:06d}"
        self.marker_seen.append(os.path.exists(stats_path(column_shard_path(self.root, "clip", shard))))
        if len(self.marker_seen) == self.crash_at:
            raise RuntimeError("simulated crash")
        return self.inner.label(images, true, keys)


def test_overwrite_removes_the_marker_first_and_a_crash_leaves_the_shard_pending(clip_ds):
    root, ov, _ = clip_ds
    annotate_clip(load_config(None, ov), "cpu")
    old_tar1 = open(column_shard_path(root, "clip", "train-000001"), "rb").read()
    cfg = load_config(None, ov + [templates(TEMPLATES[:2]), "annotator.overwrite=true"])
    manifest = read_manifest(root)
    probe = Probe(ClipLabeler(cfg.annotator, manifest.classes), root, crash_at=3)
    # batches of 8: shard 0 is batches 1-2, the crash comes in shard 1's first batch
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_column(root, manifest, "clip", ["train", "test"], probe, batch_size=8, overwrite=True)
    assert probe.marker_seen == [False, False, False]   # never labeling beside a marker
    spec = ColumnSpec(root, manifest, "clip", probe)
    states = [classify(root, "clip", f"train-{i:06d}", "train", spec).state for i in range(5)]
    assert states == ["done", "pending", "stale", "stale", "stale"]
    # the crashed shard: old tar still there, no marker, no temporary file left
    assert open(column_shard_path(root, "clip", "train-000001"), "rb").read() == old_tar1
    assert not os.path.exists(stats_path(column_shard_path(root, "clip", "train-000001")))
    assert not glob.glob(column_shard_path(root, "clip", "train-000001") + ".tmp-*")
    st = column_status(cfg)
    assert (st["splits"]["train"]["done"], st["splits"]["train"]["pending"],
            st["splits"]["train"]["stale"]) == (1, 1, 3) and not st["complete"]
    assert st["splits"]["train"]["not_done"]["pending"]["shards"] == ["train-000001"]
    # the requeued / rerun task: the shard done with the new hash is kept, the rest relabeled
    t0 = os.stat(column_shard_path(root, "clip", "train-000000")).st_mtime_ns
    annotate_clip(cfg, "cpu")
    assert os.stat(column_shard_path(root, "clip", "train-000000")).st_mtime_ns == t0
    info = read_column_info(root, "clip")
    assert info["complete"] and info["provenance"]["templates"] == TEMPLATES[:2]
    for s in iter_joined(root, "train", ["clip"]):
        assert s["clip"][VOTES].shape == (2,)
    assert marker(root, "clip", "train-000004")["content_inputs"]["labeler"]["templates"] == TEMPLATES[:2]


# ---------------------------------------------------------------------- totals from the markers
def test_column_totals_from_markers_equal_a_full_recount(clip_ds):
    root, ov, _ = clip_ds
    report = annotate_clip(load_config(None, ov), "cpu")
    info = read_column_info(root, "clip")
    assert info["derived_from"] == "shard markers" and info["complete"]
    for split in ("train", "test"):
        got, want = info["splits"][split], recount(root, "clip", split)
        assert got["shards_done"] == got["shards"] and got["shards_stale"] == 0
        for k, v in want.items():
            assert got[k] == pytest.approx(v), (split, k)
        assert report["splits"][split]["n_images"] == want["n_images"]
    # column.json is only ever derived: a damaged one is rewritten by the next (no-op) run
    path = os.path.join(root, "columns", "clip", "column.json")
    json.dump({"splits": {"train": {"n_images": 999}}, "complete": False}, open(path, "w"))
    annotate_clip(load_config(None, ov), "cpu")
    assert read_column_info(root, "clip") == info


def test_two_processes_on_disjoint_shards_leave_a_correct_column_json(tmp_path):
    root = str(tmp_path / "ds")
    make_dataset(root, n_train=96, n_test=0, num_classes=4, shard_size=4, size=8)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-m", "annotate.cli", "synthetic", "--task-index", str(i),
                               "--num-tasks", "2", f"data.root={root}", f"run.out_dir={tmp_path}/run",
                               "synthetic.q=0.2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for out in outs:
        assert "labeled 48 images in 12 shards" in out, out
    # one run directory, one report per task (neither overwrites the other)
    for i in (0, 1):
        rep = json.load(open(tmp_path / "run" / f"synthetic_stats.task-{i}-of-2.json"))
        assert rep["task"] == {"index": i, "count": 2}
    assert not os.path.exists(tmp_path / "run" / "synthetic_stats.json")
    info = read_column_info(root, "synthetic")
    train = info["splits"]["train"]
    assert info["complete"] and train["shards_done"] == 24 and train["n_images"] == 96
    want = recount(root, "synthetic", "train")
    assert train["avg_candidates"] == pytest.approx(want["avg_candidates"])
    assert train["coverage"] == pytest.approx(want["coverage"])


def test_column_json_is_written_under_the_column_lock(syn_ds):
    root, ov, _ = syn_ds
    cfg = load_config(None, ov)
    annotate_synthetic(cfg)
    path = os.path.join(root, "columns", "synthetic", "column.json")
    want = json.load(open(path))
    os.unlink(path)
    spec = ColumnSpec(root, read_manifest(root), "synthetic", SyntheticLabeler(cfg.synthetic, 4))
    with column_lock(root, "synthetic"):
        t = threading.Thread(target=refresh_column_info, args=(spec, ["train"]))
        t.start()
        time.sleep(0.3)
        assert t.is_alive() and not os.path.exists(path)    # waits for the other task's write
    t.join(30)
    assert json.load(open(path)) == want


# ---------------------------------------------------------------------- status
def test_status_counts_done_pending_stale_failed_and_errors(clip_ds, capsys):
    root, ov, _ = clip_ds
    from tests.helpers import corrupt_images
    corrupt_images(root, "train-000004", rows={5})          # one undecodable image
    annotate_clip(load_config(None, ov), "cpu")
    col = lambda s: column_shard_path(root, "clip", s)
    os.unlink(stats_path(col("train-000001")))                                # pending,
    dead_marker = stats_path(col("train-000001")) + ".tmp-crashed"            # killed while
    open(dead_marker, "wb").write(b"{")                                       # committing
    os.utime(dead_marker, (os.path.getmtime(dead_marker) - 60,) * 2)
    os.unlink(stats_path(col("train-000002")))                                # failed:
    open(col("train-000002") + ".tmp-crashed", "wb").write(b"partial")        # a dead writer's file
    old = os.path.getmtime(col("train-000002") + ".tmp-crashed") - 60
    os.utime(col("train-000002") + ".tmp-crashed", (old, old))
    m = marker(root, "clip", "train-000003")                                  # stale
    m["content_hash"] = "0" * 64
    m["content_inputs"]["labeler"]["templates"] = ["a sketch of a {}"]
    json.dump(m, open(stats_path(col("train-000003")), "w"))
    capsys.readouterr()
    assert main(["status", *ov, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    tr = st["splits"]["train"]
    assert {k: tr[k] for k in ("shards", "done", "pending", "stale", "failed", "error_records")} == \
        {"shards": 5, "done": 2, "pending": 1, "stale": 1, "failed": 1, "error_records": 1}
    assert tr["not_done"]["pending"]["shards"] == ["train-000001"]
    assert tr["not_done"]["failed"]["shards"] == ["train-000002"]
    assert tr["not_done"]["stale"]["shards"] == ["train-000003"]
    assert "labeler.templates" in tr["not_done"]["stale"]["first_reason"]
    assert tr["not_done"]["with_errors"]["shards"] == ["train-000004"]
    assert tr["stats"]["n_images"] == 16 + 15                    # shards 0 and 4 (one error record)
    assert st["splits"]["test"]["done"] == 1 and st["complete"] is False
    assert main(["status", *ov]) == 0
    text = capsys.readouterr().out
    for line in ("train pending: train-000001", "train failed: train-000002",
                 "train stale: train-000003", "train with errors: train-000004", "complete: no"):
        assert line in text, text
    # a run refuses because of the stale shard; with overwrite everything ends done
    assert main(["clip", *ov]) == 1
    assert "train-000003" in capsys.readouterr().err
    assert main(["clip", *ov, "annotator.overwrite=true"]) == 0
    assert not glob.glob(col("train-000002") + ".tmp-*")       # the dead writer's file is gone
    assert not os.path.exists(dead_marker)                     # and the dead commit's
    capsys.readouterr()
    assert main(["status", *ov, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["complete"] and st["splits"]["train"]["done"] == 5


# ---------------------------------------------------------------------- --redo-errors
def test_redo_errors_on_a_corrupt_image_keeps_every_other_record(clip_ds, capsys):
    root, ov, _ = clip_ds
    from tests.helpers import corrupt_images
    corrupt_images(root, "train-000000", rows={2})
    annotate_clip(load_config(None, ov), "cpu")
    before, m0 = snapshot(root, "clip"), marker(root, "clip", "train-000000")
    assert m0["error_records"] == 1 and m0["sums"]["n"] == 15
    assert main(["clip", *ov, "--redo-errors"]) == 0
    after = snapshot(root, "clip")
    m = marker(root, "clip", "train-000000")
    assert m["redo_errors"] == {"retried": 1, "still_failing": 1} and m["error_records"] == 1
    # still undecodable: the rewritten shard is byte-identical, aligned 1:1, error record kept
    assert after["train-000000.tar"][0] == before["train-000000.tar"][0]
    keys = [k for k, _ in iter_tar(column_shard_path(root, "clip", "train-000000"))]
    assert keys == [k for k, _ in iter_tar(image_shard_path(root, "train-000000"))]
    # the other shards were not touched
    assert {k: v for k, v in after.items() if not k.startswith("train-000000")} == \
        {k: v for k, v in before.items() if not k.startswith("train-000000")}
    assert m["sums"] == m0["sums"] and m["content_hash"] == m0["content_hash"]


class KeyLabeler:
    """A labeler whose sets follow from the key and the true class; `fail` keys get a per-sample
    error (a server timeout) instead of labels."""
    needs_images = False

    def __init__(self, fail=()):
        self.fail, self.calls = set(fail), []

    def label(self, images, true, keys, **extra):
        self.calls.extend(keys)
        Y = np.zeros((len(keys), 4), bool)
        for i, k in enumerate(keys):
            Y[i, zlib.crc32(k.encode()) % 4] = Y[i, true[i]] = True
        return {"Y": Y, "errors": ["server timeout" if k in self.fail else "" for k in keys]}

    def provenance(self):
        return {"annotator": "key-test", "version": 1}


def test_redo_errors_relabels_only_the_failed_records(syn_ds):
    root, _, _ = syn_ds
    m = read_manifest(root)
    errors = ErrorLog(**QUIET)
    write_column(root, m, "clean", ["train"], KeyLabeler())
    flaky = KeyLabeler(fail={"train_00003", "train_00020"})
    write_column(root, m, "flaky", ["train"], flaky, errors=errors)
    assert errors.counts == {"label_error": 2}
    assert [marker(root, "flaky", f"train-00000{i}")["error_records"] for i in range(3)] == [1, 1, 0]
    records = [s["flaky"] for s in iter_joined(root, "train", ["flaky"], errors=ErrorLog(**QUIET))]
    assert len(records) == 48 and sum(CAND in r for r in records) == 46      # aligned, 2 errors
    assert read_column_info(root, "flaky")["splits"]["train"]["error_records"] == 2
    retry = KeyLabeler()
    write_column(root, m, "flaky", ["train"], retry, redo_errors=True)
    assert sorted(retry.calls) == ["train_00003", "train_00020"]     # only the error records
    for i in range(3):
        shard = f"train-00000{i}"
        assert open(column_shard_path(root, "flaky", shard), "rb").read() == \
            open(column_shard_path(root, "clean", shard), "rb").read()
        assert marker(root, "flaky", shard)["sums"] == marker(root, "clean", shard)["sums"]
        assert marker(root, "flaky", shard)["error_records"] == 0
    again = KeyLabeler()
    write_column(root, m, "flaky", ["train"], again, redo_errors=True)
    assert again.calls == []                                           # nothing left to retry


# ---------------------------------------------------------------------- other inputs of the hash
def test_markers_from_before_hashing_are_adopted_when_their_provenance_matches(syn_ds, capsys):
    root, ov, _ = syn_ds
    annotate_synthetic(load_config(None, ov))
    new_fields = ("content_hash", "content_inputs", "provenance_hash", "error_records", "kind",
                  "label_errors")

    def make_legacy():
        for i in range(3):
            p = stats_path(column_shard_path(root, "synthetic", f"train-00000{i}"))
            m = json.load(open(p))
            json.dump({k: v for k, v in m.items() if k not in new_fields}, open(p, "w"))

    make_legacy()
    tars = {n: v for n, v in snapshot(root, "synthetic").items() if n.endswith(".tar")}
    st = column_status(load_config(None, ov), "synthetic")
    assert st["splits"]["train"]["done"] == 3 and st["splits"]["train"]["legacy"] == 3
    annotate_synthetic(load_config(None, ov))
    assert "marker upgraded" in capsys.readouterr().out
    m = marker(root, "synthetic", "train-000000")
    assert m["adopted_legacy_marker"] is True and len(m["content_hash"]) == 64
    assert {n: v for n, v in snapshot(root, "synthetic").items() if n.endswith(".tar")} == tars
    make_legacy()
    with pytest.raises(StaleColumnError, match=r"before provenance hashing.*provenance\.q \(was 0\.03, now 0\.5\)"):
        annotate_synthetic(load_config(None, ov + ["synthetic.q=0.5"]))


def test_a_reingested_image_shard_makes_its_column_shard_stale(syn_ds):
    root, ov, _ = syn_ds
    annotate_synthetic(load_config(None, ov))
    path = image_shard_path(root, "train-000001")
    samples = list(iter_tar(path))
    with ShardWriter(path) as w:            # same keys and count, one image's bytes changed
        for i, (k, f) in enumerate(samples):
            w.write(k, dict(f, png=f["png"] + b"\0") if i == 0 else f)
    w.commit({"split": "train"})
    with pytest.raises(StaleColumnError, match=r"shard train-000001 .*image_shard\.sha256"):
        annotate_synthetic(load_config(None, ov))
    st = column_status(load_config(None, ov), "synthetic")
    assert st["splits"]["train"]["stale"] == 1 and st["splits"]["train"]["done"] == 2


def test_an_input_columns_content_enters_the_hash(syn_ds):
    """A labeler that reads another column (a VLM prompted with CLIP's candidates) is stale
    once that column is relabeled."""
    root, ov, _ = syn_ds
    annotate_synthetic(load_config(None, ov))
    m = read_manifest(root)

    class Reader(KeyLabeler):
        input_columns = ("synthetic",)

    spec = ColumnSpec(root, m, "vlm", Reader())
    before = spec.hash("train-000000")
    assert spec.inputs("train-000000")["input_columns"] == {
        "synthetic": marker(root, "synthetic", "train-000000")["content_hash"]}
    annotate_synthetic(load_config(None, ov + ["synthetic.q=0.5", "annotator.overwrite=true"]))
    assert ColumnSpec(root, m, "vlm", Reader()).hash("train-000000") != before
    with pytest.raises(FormatError, match="input column 'nothing' has no committed shard train-000000"):
        ColumnSpec(root, m, "vlm2", type("R2", (KeyLabeler,), {"input_columns": ("nothing",)})()
                   ).hash("train-000000")


def test_a_labeler_reads_its_input_columns_and_the_image_json_joined_by_key(syn_ds):
    root, ov, _ = syn_ds
    annotate_synthetic(load_config(None, ov))
    m = read_manifest(root)
    want = {s["key"]: s["synthetic"] for s in iter_joined(root, "train", ["synthetic"],
                                                          errors=ErrorLog(**QUIET))}

    class Reader(KeyLabeler):
        input_columns, needs_meta = ("synthetic",), True
        seen = {}

        def label(self, images, true, keys, inputs=None, metas=None):
            assert metas is not None and len(metas) == len(keys)
            for k, inp in zip(keys, inputs):
                self.seen[k] = inp["synthetic"]
            return super().label(images, true, keys)

    r = Reader()
    write_column(root, m, "derived", ["train"], r, batch_size=5)
    assert sorted(r.seen) == sorted(want) and len(want) == 48
    assert all(np.array_equal(r.seen[k][CAND], want[k][CAND]) for k in want)


def test_training_refuses_a_mixed_or_outdated_column(syn_ds):
    """check_column_current (train/trainer.py calls it): one labeler configuration per column,
    labeled from the image shards there now, derived from the input columns as they are."""
    root, ov, _ = syn_ds
    shards = [f"train-00000{i}" for i in range(3)]
    annotate_synthetic(load_config(None, ov))
    check_column_current(root, "synthetic", shards)
    m = read_manifest(root)

    class Reader(KeyLabeler):
        input_columns = ("synthetic",)

    write_column(root, m, "derived", ["train"], Reader())
    check_column_current(root, "derived", shards)
    # an overwrite with another q, only task 0 of 2 done: two configurations in one column
    annotate_synthetic(load_config(None, ov + ["synthetic.q=0.5", "annotator.overwrite=true"]),
                       task_index=0, num_tasks=2)
    with pytest.raises(FormatError, match=r"column 'synthetic' mixes two labeler configurations: "
                                          r"shard train-000000 .* shard train-000001"):
        check_column_current(root, "synthetic", shards)
    with pytest.raises(FormatError, match=r"column 'derived' shard train-000000 was derived from "
                                          r"input column 'synthetic' as it was before"):
        check_column_current(root, "derived", shards)
    annotate_synthetic(load_config(None, ov + ["synthetic.q=0.5", "annotator.overwrite=true"]))
    check_column_current(root, "synthetic", shards)
    path = image_shard_path(root, "train-000002")
    samples = list(iter_tar(path))
    with ShardWriter(path) as w:             # the images re-ingested after labeling
        for i, (k, f) in enumerate(samples):
            w.write(k, dict(f, png=f["png"] + b"\0") if i == 0 else f)
    w.commit({"split": "train"})
    with pytest.raises(FormatError, match=r"column 'synthetic' shard train-000002 was labeled from "
                                          r"another version of image shard .*sha256"):
        check_column_current(root, "synthetic", shards)


# ---------------------------------------------------------------------- SLURM array ordinal
ARRAYS = {  # --array spec -> the SLURM_ARRAY_TASK_* SLURM sets (ID varies)
    "1-5": ([1, 2, 3, 4, 5], dict(MIN=1, MAX=5, STEP=1, COUNT=5)),
    "0-8:2": ([0, 2, 4, 6, 8], dict(MIN=0, MAX=8, STEP=2, COUNT=5)),
    "3-3": ([3], dict(MIN=3, MAX=3, STEP=1, COUNT=1)),
}


def shell_array_task(env):
    r = subprocess.run(["bash", "-c", 'COREG_SBATCH_LIB=1 source "$0" && array_task', SBATCH],
                       env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True)
    return r.returncode, r.stdout.strip(), r.stderr


@pytest.mark.parametrize("spec", sorted(ARRAYS))
def test_array_task_ordinal_from_the_slurm_variables(spec):
    ids, fixed = ARRAYS[spec]
    for ordinal, tid in enumerate(ids):
        env = {f"SLURM_ARRAY_TASK_{k}": str(v) for k, v in fixed.items()}
        env["SLURM_ARRAY_TASK_ID"] = str(tid)
        assert shell_array_task(env)[:2] == (0, f"{ordinal} {len(ids)}")
        assert array_task_from_env(env) == (ordinal, len(ids))


@pytest.mark.parametrize("tid,hi,count", [(4, 10, 3), (3, 5, 3)])
def test_array_task_outside_an_array_and_index_lists(tid, hi, count):
    assert shell_array_task({})[:2] == (0, "0 1") and array_task_from_env({}) == (0, 1)
    # --array=1,4,10 and --array=1,3,5: SLURM 22.05 sets STEP=1 for any list (measured on the
    # local cluster), so neither is one range; both refuse instead of leaving shards to no task
    env = {"SLURM_ARRAY_TASK_ID": str(tid), "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_MAX": str(hi), "SLURM_ARRAY_TASK_STEP": "1",
           "SLURM_ARRAY_TASK_COUNT": str(count)}
    rc, out, err = shell_array_task(env)
    assert rc == 2 and out == "" and "not one range" in err
    with pytest.raises(ValueError, match="not one range"):
        array_task_from_env(env)


def test_sbatch_script_parses_and_explains_its_usage():
    assert subprocess.run(["bash", "-n", SBATCH]).returncode == 0
    r = subprocess.run(["bash", SBATCH], capture_output=True, text=True, cwd=ROOT,
                       env={"PATH": os.environ["PATH"]})
    assert r.returncode == 2 and "usage: sbatch --array" in r.stderr


# ---------------------------------------------------------------------- the array on real SLURM
@pytest.mark.slow
def test_annotation_array_on_the_local_slurm_cluster(cluster, clip_ds):
    """sbatch --array=1-3 (an offset array): 3 tasks annotate disjoint shards with the tiny CLIP;
    column.json ends complete; a second submission (a requeue or rerun) rewrites nothing."""
    root, ov, tmp = clip_ds
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def submit(tag):
        r = subprocess.run(["sbatch", "--wait", "--array=1-3", f"--output={tmp}/{tag}_%A_%a.out",
                            "--cpus-per-task=1", "--time=10", "--job-name=coreg-annotate-test",
                            SBATCH, "configs/demo.yaml", *ov],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        logs = "".join(p.read_text(errors="replace") for p in sorted(tmp.glob(f"{tag}_*.out")))
        assert r.returncode == 0, (r.stderr, logs[-4000:])
        return logs

    logs = submit("first")
    for ordinal in range(3):
        assert f"-> ordinal {ordinal} of 3" in logs, logs[-4000:]
    info = read_column_info(root, "clip")
    assert info["complete"], info
    assert info["splits"]["train"]["shards_done"] == 5 and info["splits"]["test"]["shards_done"] == 1
    # the task of ordinal 1 (array index 2) labeled shards 1 and 4 of train
    assert re.search(r"clip train: labeled 32 images in 2 shards", logs), logs[-4000:]
    before = snapshot(root, "clip")
    logs = submit("second")
    assert "labeled" not in logs and snapshot(root, "clip") == before, logs[-4000:]
    assert read_column_info(root, "clip") == info


from tests.test_slurm import cluster  # noqa: E402,F401  (the module-scoped local SLURM fixture)
