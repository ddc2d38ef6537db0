"""Per-sample state written by training steps (train/step_writes.py) and the first method that
uses it (PRODEN): rows land on their (shard, key), per candidate; the last write of a key wins
by (pass, step, stream), not by arrival; a resumed epoch drops the chunks its checkpoint did
not see; a killed and resumed PRODEN run equals the uninterrupted one; 2 ranks equal 1."""
import json
import os

import numpy as np
import pytest
import torch

from coreg_dist.config import load_config
from coreg_dist.dist import Collectives
from coreg_dist.state import FieldSpec, ShardState, StateStore
from tests.helpers import common, latest, make_labeled_dataset, model, state_by_key, torchrun
from train.step_writes import StepWrites
from train.trainer import RunKilled, train

FIELDS = {"conf": FieldSpec(dtype="float32", fill=float("nan"), per_candidate=True),
          "seen": FieldSpec(dtype="int32", fill=-1)}


def _store(tmp_path):
    store = StateStore(str(tmp_path), FIELDS)
    store.write(0, ShardState("a", ["k0", "k1"], [2, 1], FIELDS))
    store.write(0, ShardState("b", ["k0"], [3], FIELDS))
    index = {"version": 0, "shards": {"a": {"n": 2}, "b": {"n": 1}}, "totals": {"n": 3}}
    store.commit(0, index)
    return store, index


def test_rows_land_per_candidate_and_the_latest_order_wins(tmp_path):
    store, index = _store(tmp_path)
    w = StepWrites(store, ["conf", "seen"], rank=0, buffer_rows=2)     # flushes every 2 rows
    w.begin_epoch(0)
    Y = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0]])
    dense = np.array([[0.25, 9, 0.75, 9], [9, 1.0, 9, 9], [0.2, 0.3, 0.5, 9]], dtype=np.float32)
    # a/k0 written twice: the row of step 5 arrives first, the step-3 row later; step 5 wins
    w.add(np.array([[0, 5, 1]]), ["a"], ["k0"], Y[:1], {"conf": dense[:1], "seen": np.array([5])})
    w.add(np.array([[0, 1, 0], [0, 2, 0]]), ["a", "b"], ["k1", "k0"], Y[1:],
          {"conf": dense[1:], "seen": np.array([1, 2])})
    w.add(np.array([[0, 3, 0]]), ["a"], ["k0"], Y[:1], {"conf": dense[:1] * 0 + 0.5, "seen": np.array([3])})
    assert w.seq == 1 and len(os.listdir(w.folder(0))) == 1      # the 4th row waits in the buffer
    new = w.apply(Collectives(), 0, index, ["a", "b"])
    assert new["version"] == 1 and new["totals"] == {"n": 3} and store.is_complete(1)
    a, b = store.read(1, "a"), store.read(1, "b")
    np.testing.assert_array_equal(a.arrays["conf"], [0.25, 0.75, 1.0])     # k0: {0, 2}, k1: {1}
    np.testing.assert_array_equal(a.arrays["seen"], [5, 1])
    np.testing.assert_allclose(b.arrays["conf"], [0.2, 0.3, 0.5])
    assert not os.path.exists(w.folder(0))                                  # applied: log removed


def test_unwritten_rows_keep_the_previous_version(tmp_path):
    store, index = _store(tmp_path)
    w = StepWrites(store, ["conf", "seen"], rank=0)
    w.begin_epoch(0)
    w.add(np.array([[0, 0, 0]]), ["a"], ["k1"], np.array([[0, 1, 0, 0]]),
          {"conf": np.array([[0, 1.0, 0, 0]]), "seen": np.array([7])})
    w.apply(Collectives(), 0, index, ["a", "b"])
    a, b = store.read(1, "a"), store.read(1, "b")
    assert np.isnan(a.arrays["conf"][:2]).all() and a.arrays["conf"][2] == 1.0
    assert a.arrays["seen"].tolist() == [-1, 7] and np.isnan(b.arrays["conf"]).all()


def test_a_resumed_epoch_drops_the_chunks_its_checkpoint_did_not_see(tmp_path):
    store, index = _store(tmp_path)
    w = StepWrites(store, ["conf", "seen"], rank=0, buffer_rows=1)
    w.begin_epoch(0)
    Y = np.array([[0, 1, 0, 0]])
    for step, v in enumerate((0.1, 0.2, 0.3)):
        w.add(np.array([[0, step, 0]]), ["a"], ["k1"], Y, {"conf": Y * v, "seen": np.array([step])})
    assert w.seq == 3
    w2 = StepWrites(store, ["conf", "seen"], rank=0, buffer_rows=1)
    w2.begin_epoch(0, resume_seq=1)          # the checkpoint saw chunk 0 only
    assert w2.seq == 1 and len(os.listdir(w2.folder(0))) == 1
    w2.apply(Collectives(), 0, index, ["a", "b"])
    a = store.read(1, "a")
    assert a.arrays["seen"].tolist() == [-1, 0] and a.arrays["conf"][2] == pytest.approx(0.1)


def test_bad_writes_are_named(tmp_path):
    store, _ = _store(tmp_path)
    with pytest.raises(ValueError, match="not state fields"):
        StepWrites(store, ["nope"], rank=0)
    w = StepWrites(store, ["conf", "seen"], rank=0)
    w.begin_epoch(0)
    with pytest.raises(ValueError, match="missing .'seen'."):
        w.add(np.array([[0, 0, 0]]), ["a"], ["k1"], np.array([[0, 1, 0, 0]]), {"conf": np.ones((1, 4))})


# ---------------------------------------------------------------------------- PRODEN end to end
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_labeled_dataset(str(tmp_path_factory.mktemp("ds")), n_train=48, n_test=24)


def _cfg(root, out, *extra):
    # one stream, every epoch's samples from the same shuffled order
    return load_config(None, common(root, out, "train.method=proden", "data.streams=1",
                                    "run.threads=1", *extra))


def conf_by_key(run_dir):
    return state_by_key(run_dir, "conf", per_candidate=True)


def test_proden_confidences_move_and_resume_exactly(dataset, tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train(_cfg(dataset, full), "cpu")
    conf = conf_by_key(full)
    assert len(conf) == 48
    for c in conf.values():                  # after 3 epochs every sample was written
        assert np.isfinite(c).all() and c.sum() == pytest.approx(1.0, abs=1e-5)
    multi = [c for c in conf.values() if len(c) > 1]
    assert multi and any(abs(c.max() - 1 / len(c)) > 0.01 for c in multi)   # no longer uniform
    # 6 steps per epoch; checkpoint every 4 steps; killed at step 10 (epoch 1, after step 8)
    with pytest.raises(RunKilled):
        train(_cfg(dataset, cut, "train.stop_after_steps=10", "train.checkpoint_every=4"), "cpu")
    meta = json.load(open(os.path.join(latest(cut), "meta.json")))
    assert meta["mid_epoch"] and meta["epoch"] == 1
    train(_cfg(dataset, cut, "train.resume=latest", "train.checkpoint_every=4"), "cpu")
    resumed = conf_by_key(cut)
    assert resumed.keys() == conf.keys()
    for k in conf:
        np.testing.assert_array_equal(conf[k], resumed[k])
    A, B = model(full), model(cut)
    for name, t in A["nets"][0].items():
        assert (t == B["nets"][0][name]).all(), name


@pytest.mark.parametrize("method", ["proden", "pico", "alim", "pico_plus"])
def test_step_writing_methods_on_two_ranks_equal_one_process(tmp_path, method):
    """PRODEN: the step writes of two ranks; PiCO: also its gathered contrast set, queue and
    prototypes."""
    root = make_labeled_dataset(str(tmp_path / "ds"), n_train=64, n_test=24)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = [f"train.method={method}", "train.epochs=3", "model.sync_bn=true", "pico.queue_size=32",
            "alim.queue_size=32", "pico_plus.queue_size=32"]
    from train.cli import main as train_main
    assert train_main(common(root, one, *args, "run.threads=1")) == 0
    torchrun(2, common(root, two, *args))
    dense = method == "alim"
    a, b = state_by_key(one, "conf", not dense), state_by_key(two, "conf", not dense)
    assert a.keys() == b.keys() and len(a) == 64
    assert max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a) < 1e-4
    if method in ("pico", "alim", "pico_plus"):
        A, B = model(one), model(two)
        assert (A["prototypes"] - B["prototypes"]).abs().max() < 1e-4
        assert A["queue"]["filled"] == B["queue"]["filled"] > 0
        assert (A["queue"]["feats"] - B["queue"]["feats"]).abs().max() < 1e-4
    if method == "alim":
        assert A["lam"] == pytest.approx(B["lam"], abs=1e-4) and A["lam"] > 0
    if method == "pico_plus":     # the reliable split and its flags in the queue
        assert A["threshold"] == pytest.approx(B["threshold"], abs=1e-4)
        assert torch.equal(A["queue"]["is_p"], B["queue"]["is_p"]) and not A["queue"]["is_p"].all()
