"""Two ranks with torchrun (gloo, CPU) on tiny real shards: the same training as one process,
exact mid-epoch resume, world-size changes, bad input on many ranks, uneven shards."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from coreg_dist.shards.format import column_shard_path, image_shard_path
from coreg_dist.shards.reader import iter_tar
from coreg_dist.shards.writer import ShardWriter
from tests.helpers import (common, corrupt_images, latest, make_labeled_dataset, metrics, model,
                           state_by_key, torchrun)
from train.cli import main as train_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_labeled_dataset(str(tmp_path_factory.mktemp("ds")), n_train=64, n_test=24)


def test_two_ranks_train_as_one_process(dataset, tmp_path):
    """With data.streams fixed and sync_bn, 2 ranks see the same global batches, the same
    augmentations and the same contrast sets as 1 process: after warm-up and an epoch with
    co-divide (and one more), GMMs, splits, prototypes, queues and weights agree to float
    summation order, and both ranks hold identical parameters."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train_main(common(dataset, one, "model.sync_bn=true", "run.threads=1")) == 0
    torchrun(2, common(dataset, two, "model.sync_bn=true"))
    rep = json.load(open(os.path.join(two, "report.json")))
    assert rep["world_size"] == 2 and rep["ranks_in_sync"] is True and rep["engine"] == "ddp"
    for a, b in zip(metrics(one), metrics(two)):
        assert a["steps"] == b["steps"]
        for k in ("gmm_means_net1", "gmm_means_net2", "gmm_weights_net1", "gmm_vars_net2"):
            if k in a:
                assert np.allclose(a[k], b[k], atol=1e-4), (a["epoch"], k, a[k], b[k])
        for k in ("n_p_net1", "n_p_net2"):
            assert a.get(k) == b.get(k)
        for k in ("loss/x", "loss/cont", "loss/proto", "test_acc_ensemble"):
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-4), (a["epoch"], k)
    for field in ("w0", "w1"):
        w1, w2 = state_by_key(one, field), state_by_key(two, field)
        assert w1.keys() == w2.keys() and len(w1) == 64
        assert max(abs(w1[k] - w2[k]) for k in w1) < 1e-3
        assert {k for k in w1 if w1[k] > 0.5} == {k for k in w2 if w2[k] > 0.5}
    A, B = model(one), model(two)
    assert (A["prototypes"] - B["prototypes"]).abs().max() < 1e-4
    assert A["prototypes"].abs().sum() > 0
    for qa, qb in zip(A["queues"], B["queues"]):
        assert qa["ptr"] == qb["ptr"] and qa["filled"] == qb["filled"] > 0
        assert (qa["feats"] - qb["feats"]).abs().max() < 1e-4
        assert torch.equal(qa["labels"], qb["labels"])
    for k in range(2):
        for name, t in A["nets"][k].items():
            if t.is_floating_point():
                assert (t - B["nets"][k][name]).abs().max() < 1e-4, name


def test_two_rank_kill_mid_epoch_and_resume_is_exact(dataset, tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    torchrun(2, common(dataset, full, "train.log_keys=true"))
    # warm-up: 2 nets x 4 steps; then epoch 1 with co-divide; checkpoint every 5 steps; killed
    # at step 11, one step after the checkpoint inside epoch 1's first pass
    torchrun(2, common(dataset, cut, "train.checkpoint_every=5", "train.stop_after_steps=11",
                       "train.log_keys=true"), expect="killed")
    meta = json.load(open(os.path.join(latest(cut), "meta.json")))
    assert meta["mid_epoch"] and meta["world_size"] == 2 and meta["global_step"] == 10
    assert meta["epoch"] == 1 and meta["state_version"] == 1
    assert sorted(f for f in os.listdir(latest(cut)) if f.startswith("rank_")) == \
        ["rank_00000.pt", "rank_00001.pt"]
    position = (meta["epoch"], meta["pass_index"], meta["step"])
    for r in range(2):      # drop what the killed run logged after its checkpoint
        path = os.path.join(cut, "keys", f"rank_{r}.txt")
        lines = [l for l in open(path) if tuple(map(int, l.split()[:3])) < position]
        assert len(lines) < len(open(path).readlines())
        open(path, "w").writelines(lines)
    torchrun(2, common(dataset, cut, "train.checkpoint_every=5", "train.resume=latest",
                       "train.log_keys=true"))
    A, B = model(full), model(cut)
    for k in range(2):
        for name, t in A["nets"][k].items():
            assert torch.equal(t, B["nets"][k][name]), name
    assert torch.equal(A["prototypes"], B["prototypes"])
    for r in range(2):
        assert open(os.path.join(full, "keys", f"rank_{r}.txt")).read() == \
            open(os.path.join(cut, "keys", f"rank_{r}.txt")).read()
    for a, b in zip(metrics(full), metrics(cut)):
        assert a["test_acc_ensemble"] == b["test_acc_ensemble"] and a.get("loss/x") == b.get("loss/x")


def test_world_size_change_at_epoch_boundary_only(dataset, tmp_path):
    out = str(tmp_path / "ws")
    torchrun(2, common(dataset, out, "train.checkpoint_every=3", "train.stop_after_steps=10"),
             expect="killed")
    # mid-epoch on 1 process: refused, with what to do instead
    r = subprocess.run([sys.executable, "-m", "train.cli", *common(dataset, out, "train.resume=latest")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "mid-epoch" in r.stderr and "2 rank(s)" in r.stderr
    # the epoch-boundary checkpoint (after warm-up) resumes on 1 process
    boundary = os.path.join(out, "checkpoints", "e0001-p00-s000000")
    assert os.path.isdir(boundary)
    assert train_main(common(dataset, out, f"train.resume={boundary}", "run.threads=1",
                             "data.streams=1")) == 0
    assert [m["epoch"] for m in metrics(out)] == [0, 1, 2]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """Four shards: a corrupt image in one, one truncated, a label column that misses a key and
    holds a key with no image in another, one healthy."""
    root = make_labeled_dataset(str(tmp_path_factory.mktemp("bad")), n_train=64, n_test=16)
    corrupt_images(root, "train-000000", rows={5})          # train-000000: one corrupt PNG
    # train-000001: truncated in the middle
    path = image_shard_path(root, "train-000001")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    # train-000002: the label column lacks one key and has one key without an image
    cpath = column_shard_path(root, "synthetic", "train-000002")
    rows = list(iter_tar(cpath))
    with ShardWriter(cpath) as w:
        for i, (key, fields) in enumerate(rows):
            if i == 3:
                continue
            w.write(key, fields)
        w.write("orphan_key", rows[0][1])
    return root


def test_bad_input_on_two_ranks_is_named_counted_and_survived(damaged, tmp_path):
    out = str(tmp_path / "bad")
    r = torchrun(2, common(damaged, out, "train.epochs=2"))
    rep = json.load(open(os.path.join(out, "report.json")))
    counts = rep["data_errors"]["counts"]
    assert counts.get("corrupt_image") == 1
    assert counts.get("truncated_shard") == 1
    assert counts.get("missing_label") == 1 and counts.get("orphan_label") == 1
    ex = {e["kind"]: e for e in rep["data_errors"]["examples"]}
    assert ex["corrupt_image"]["shard"] == "train-000000" and ex["corrupt_image"]["key"]
    assert "train-000001" in ex["truncated_shard"]["error"]
    assert ex["missing_label"]["key"] and "synthetic" in ex["missing_label"]["error"]
    assert rep["ranks_in_sync"] is True
    assert "data problems (all ranks)" in r.stdout


def test_uneven_shards_give_every_rank_the_same_steps(tmp_path):
    root = make_labeled_dataset(str(tmp_path / "uneven"), n_train=56, n_test=16, shard_size=40)  # 40 + 16
    out = str(tmp_path / "run")
    # The output alignment is fitted on the first shard only: rank 1 holds no row of it.
    torchrun(2, common(root, out, "train.epochs=2", "train.log_keys=true", "train.output_prior=uniform",
                       "train.output_prior_samples=30"))
    steps = []
    for r in range(2):
        seen = {}
        for line in open(os.path.join(out, "keys", f"rank_{r}.txt")):
            e, p, s = map(int, line.split()[:3])
            seen[(e, p)] = max(seen.get((e, p), -1), s)
        steps.append(seen)
    assert steps[0] == steps[1]
    assert all("raw_test_acc_ensemble" in m for m in metrics(out))


def test_dataloader_workers_change_nothing_on_two_ranks(dataset, tmp_path):
    """Each rank's streams split over its DataLoader worker processes: the batches, and so the
    run, are the same as decoding in the training processes."""
    a, b = str(tmp_path / "w0"), str(tmp_path / "w2")
    torchrun(2, common(dataset, a, "train.epochs=2", "data.streams=4", "data.num_workers=0"))
    torchrun(2, common(dataset, b, "train.epochs=2", "data.streams=4", "data.num_workers=2"))
    for x, y in zip(metrics(a), metrics(b)):
        assert x["test_acc_ensemble"] == y["test_acc_ensemble"] and x.get("loss/x") == y.get("loss/x")
    A, B = model(a), model(b)
    for k in range(2):
        for name, t in A["nets"][k].items():
            assert torch.equal(t, B["nets"][k][name]), name
