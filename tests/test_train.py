"""Trainer smoke runs, switches, resume equality: Co-Reg and PCE on tiny real shards."""
import json
import os

import numpy as np
import pytest
import torch

from annotate.cli import annotate_synthetic
from coreg_dist.config import load_config
from tests.helpers import make_dataset
from train.trainer import RunKilled, train

ALL_OFF = ["coreg.warmup_neg_entropy=false", "coreg.co_divide=false",
           "coreg.distribution_alignment=false", "coreg.minmax_normalize=false",
           "coreg.loss_history=1", "coreg.cross_use=false", "coreg.co_pseudo_label=false",
           "coreg.refine_labeled=false", "coreg.co_guess_unlabeled=false", "coreg.use_unlabeled=false",
           "coreg.mixup=false", "coreg.prototypes=false", "coreg.contrastive=false",
           "coreg.noisy_contrastive=false", "coreg.ensemble=false"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ds"))
    make_dataset(root, n_train=48, n_test=24, num_classes=4, shard_size=16, size=16)
    cfg = load_config(None, [f"data.root={root}", f"run.out_dir={root}/ann", "synthetic.q=0.2",
                             "synthetic.eta=0.2"])
    annotate_synthetic(cfg)
    return root


def cfg_for(root, out, *extra):
    return load_config(None, [f"data.root={root}", f"run.out_dir={out}", "train.column=synthetic",
                              "train.epochs=4", "train.batch_size=8", "train.eval_batch_size=16",
                              "coreg.warm_up=1", "coreg.feature_start=1", "coreg.queue_size=32",
                              "coreg.rampup_epochs=2", "train.lr_period=0", "run.threads=1",
                              *extra])


def final_weights(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints", open(os.path.join(run_dir, "checkpoints", "latest")).read().strip())
    return torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)["method_state"]


def test_coreg_smoke_writes_report_and_logs(dataset, tmp_path):
    out = str(tmp_path / "run")
    report = train(cfg_for(dataset, out), "cpu")
    for key in ("test_acc_net1", "test_acc_net2", "test_acc_ensemble", "epochs", "seconds", "eta",
                "avg_candidates"):
        assert key in report
    assert 0.0 <= report["test_acc_ensemble"] <= 1.0
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [l["epoch"] for l in lines] == [0, 1, 2, 3]
    after = lines[-1]
    # co-divide ran and split the pool; the feature terms were back-propagated
    assert after["n_p_net1"] + after["n_u_net1"] == 48
    assert "loss/cont" in after and "loss/proto" in after
    for f in ("report.json", "report.md", "plots/accuracy.png", "plots/confusion.png",
              "config.yaml", "checkpoints/latest"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert any(n.startswith("events") for n in os.listdir(os.path.join(out, "tb")))
    # per-sample state saved per shard, keyed
    ck = os.path.join(out, "checkpoints", "epoch_0003", "samples")
    z = np.load(os.path.join(ck, "train-000000.npz"))
    assert z["__keys__"][0] == "train_00000" and z["pred0"].shape == (16, 4)


def test_every_switch_off_still_completes(dataset, tmp_path):
    report = train(cfg_for(dataset, str(tmp_path / "off"), *ALL_OFF), "cpu")
    assert "test_acc_ensemble" not in report and 0 <= report["test_acc"] <= 1


@pytest.mark.parametrize("switch", ALL_OFF)
def test_each_switch_off_alone_completes(dataset, tmp_path, switch):
    report = train(cfg_for(dataset, str(tmp_path / "one"), switch, "train.epochs=3"), "cpu")
    assert 0 <= report["test_acc"] <= 1


def test_few_shot_samples_forced_into_p(dataset, tmp_path):
    out = str(tmp_path / "few")
    train(cfg_for(dataset, out, "coreg.few_shot=2", "train.epochs=2"), "cpu")
    ck = os.path.join(out, "checkpoints", "epoch_0001")
    state = torch.load(os.path.join(ck, "state.pt"), weights_only=False)["method_state"]
    few = state["few_shot_idx"]
    assert len(few) == 8                     # 2 per class, 4 classes
    w = np.concatenate([np.load(os.path.join(ck, "samples", f"train-00000{i}.npz"))["w0"]
                        for i in range(3)])
    assert (w[few] == 1.0).all()


def test_pce_baseline(dataset, tmp_path):
    report = train(cfg_for(dataset, str(tmp_path / "pce"), "train.method=pce"), "cpu")
    assert report["method"] == "pce" and "test_acc_net1" in report


def test_resume_mid_epoch_equals_uninterrupted(dataset, tmp_path):
    full = str(tmp_path / "full")
    ref = train(cfg_for(dataset, full), "cpu")
    cut = str(tmp_path / "cut")
    # 4 warm-up steps in epoch 0 (2 nets x 48/16); stop inside epoch 2
    with pytest.raises(RunKilled):
        train(cfg_for(dataset, cut, "train.stop_after_steps=17"), "cpu")
    assert open(os.path.join(cut, "checkpoints", "latest")).read().strip() in ("epoch_0001", "epoch_0000")
    resumed = train(cfg_for(dataset, cut, "train.resume=latest"), "cpu")
    assert resumed["test_acc_ensemble"] == ref["test_acc_ensemble"]
    a, b = final_weights(full), final_weights(cut)
    for k in range(2):
        for name, t in a["nets"][k].items():
            assert torch.equal(t, b["nets"][k][name]), name
    assert torch.equal(a["prototypes"], b["prototypes"])
    hist = [json.loads(l)["epoch"] for l in open(os.path.join(cut, "metrics.jsonl"))]
    assert hist == [0, 1, 2, 3]


def test_unknown_method_names_key(dataset, tmp_path):
    with pytest.raises(ValueError, match="train.method"):
        train(cfg_for(dataset, str(tmp_path / "x"), "train.method=nope"), "cpu")


def test_registry_lists_builtin_methods_without_building_one():
    from coreg_dist.methods import list_methods
    assert {"coreg", "pce"} <= set(list_methods())
