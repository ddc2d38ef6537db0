"""The baselines as methods of the one trainer: each trains end to end on real shards, keeps its
per-sample state where its rule says (per candidate, or a dense (C,) row for LWS), and a
baseline that writes its state after the optimizer step (LWS) resumes exactly."""
import json
import math
import os

import numpy as np
import pytest
import torch

from coreg_dist.config import load_config
from coreg_dist.methods.registry import get_method
from tests.helpers import common, latest, make_labeled_dataset, model, state_by_key
from train.trainer import RunKilled, image_transform, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_labeled_dataset(str(tmp_path_factory.mktemp("ds")), n_train=48, n_test=24)


def _cfg(root, out, method, *extra):
    # one stream, every epoch's samples from the same shuffled order
    return load_config(None, common(root, out, f"train.method={method}", "train.epochs=2",
                                    "data.streams=1", "run.threads=1", *extra))


@pytest.mark.parametrize("method", ["cc", "proden", "lws", "cr_dpll", "dividemix", "pico", "alim",
                                    "pico_plus"])
def test_baseline_trains_and_keeps_its_state(dataset, tmp_path, method):
    out = str(tmp_path / method)
    rep = train(_cfg(dataset, out, method, "dividemix.warm_up=1", "pico.queue_size=32",
                     "alim.queue_size=32", "pico_plus.queue_size=32"), "cpu")
    assert 0.0 <= rep["test_acc"] <= 1.0 and rep["epochs"] == 2
    logged = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [l["epoch"] for l in logged] == [0, 1]
    assert any(k.startswith("loss/") and np.isfinite(v) for k, v in logged[-1].items() if isinstance(v, float))
    if not get_method(method).step_state:
        return
    dense = get_method(method).dense
    conf = state_by_key(out, "conf", per_candidate=not dense)
    assert len(conf) == 48
    for row in conf.values():
        row = np.asarray(row)
        assert np.isfinite(row).all()                 # every sample was written
        if dense:                                     # LWS: S part and the rest each sum to ~1
            assert row.sum() == pytest.approx(2.0, abs=1e-4) or row.sum() == pytest.approx(1.0, abs=1e-4)
        else:
            assert row.sum() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("method", ["lws", "pico", "alim", "pico_plus"])
def test_stateful_baseline_resumes_exactly(dataset, tmp_path, method):
    """LWS writes its state after the optimizer step; PiCO also keeps a key encoder, a queue
    and prototypes; ALIM a lambda from the committed margins: a run killed mid-epoch and
    resumed ends where the uninterrupted one does."""
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    extra = ("train.epochs=3", "pico.queue_size=32", "alim.queue_size=32", "pico_plus.queue_size=32")
    train(_cfg(dataset, full, method, *extra), "cpu")
    with pytest.raises(RunKilled):        # 6 steps an epoch: killed in epoch 1, after step 8
        train(_cfg(dataset, cut, method, *extra, "train.stop_after_steps=10",
                   "train.checkpoint_every=4"), "cpu")
    assert json.load(open(os.path.join(latest(cut), "meta.json")))["mid_epoch"]
    train(_cfg(dataset, cut, method, *extra, "train.resume=latest", "train.checkpoint_every=4"), "cpu")
    dense = get_method(method).dense
    a, b = state_by_key(full, "conf", not dense), state_by_key(cut, "conf", not dense)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    A, B = model(full), model(cut)
    for name, t in A["nets"][0].items():
        assert (t == B["nets"][0][name]).all(), name
    if method in ("pico", "alim", "pico_plus"):
        assert torch.equal(A["prototypes"], B["prototypes"]) and A["prototypes"].abs().sum() > 0
        assert torch.equal(A["queue"]["feats"], B["queue"]["feats"])
    if method == "alim":
        assert A["lam"] == B["lam"] > 0                  # lambda from epoch 1's margins
    if method == "pico_plus":                            # the threshold from epoch 1's distances
        assert A["threshold"] == B["threshold"] < math.inf
        assert torch.equal(A["queue"]["is_p"], B["queue"]["is_p"]) and not A["queue"]["is_p"].all()


def test_method_sections_are_typed(dataset, tmp_path):
    cfg = load_config(None, common(dataset, str(tmp_path), "train.method=cr_dpll", "cr_dpll.ramp_fraction=0.25",
                                   "lws.lw_weight=2"))
    assert cfg.cr_dpll.ramp_fraction == 0.25 and cfg.lws.lw_weight == 2.0
    from coreg_dist.config import ConfigError
    with pytest.raises(ConfigError, match="cr_dpll"):
        load_config(None, common(dataset, str(tmp_path), "cr_dpll.no_such_key=1"))


def test_dividemix_is_coreg_with_the_authors_switches(dataset, tmp_path, monkeypatch):
    """DivideMix's defaults are its authors' (Train_cifar.py), and its MixUp mixes the weak views
    its targets came from: no strong view is ever drawn; the prior penalty is logged."""
    from coreg_dist.methods.base import Method

    cfg = _cfg(dataset, str(tmp_path / "dm"), "dividemix", "dividemix.warm_up=1")
    c = cfg.dividemix
    assert (c.lambda_u, c.mixup_alpha, c.sharpen_temperature, c.p_threshold) == (25.0, 4.0, 0.5, 0.5)
    assert (c.warmup_batch_factor, c.rampup_epochs, c.loss_history) == (2, 16, 1)
    assert c.mixup and c.co_divide and c.cross_use and c.refine_labeled and c.co_guess_unlabeled
    assert not (c.distribution_alignment or c.prototypes or c.contrastive or c.divide_per_class)
    assert c.pce_weight == 0 and c.label_space_view == "weak" and c.divide_view == "none"
    assert c.p_refine == "all" and c.u_guess == "all"    # not Co-Reg's choice by the sets
    assert c.co_divide is True and c.co_pseudo_label is True

    def no_strong(*a, **k):
        raise AssertionError("DivideMix drew a strong view")
    monkeypatch.setattr(Method, "strong", no_strong)
    train(cfg, "cpu")
    last = [json.loads(l) for l in open(os.path.join(str(tmp_path / "dm"), "metrics.jsonl"))][-1]
    assert np.isfinite(last["loss/reg"]) and last["loss/reg"] >= 0     # KL(uniform || mean) >= 0


class TwoTemplateScores:
    """A labeler with scores: two 'templates' that put 0.7 / 0.9 on the true class and the rest on
    the next class; candidate set = both. Written through write_column, as the CLIP annotator."""
    needs_images = False

    def __init__(self, num_classes):
        self.C = num_classes

    def label(self, images, true, keys):
        other = (true + 1) % self.C
        Y = np.zeros((len(true), self.C), dtype=bool)
        Y[np.arange(len(true)), true] = Y[np.arange(len(true)), other] = True
        topi = np.stack([np.stack([true, other], 1)] * 2, 1).astype(np.int16)        # (B, 2, 2)
        topp = np.tile(np.array([[0.7, 0.3], [0.9, 0.1]], dtype=np.float16), (len(true), 1, 1))
        return {"Y": Y, "topi": topi, "topp": topp}

    def provenance(self):
        return {"annotator": "two-template test scores"}


@pytest.fixture(scope="module")
def scored(dataset):
    from annotate.columns import write_column
    from coreg_dist.shards.format import read_manifest
    manifest = read_manifest(dataset)
    write_column(dataset, manifest, "scored", ["train"], TwoTemplateScores(manifest.num_classes))
    return dataset


def test_soft_labels_are_the_annotators_mean_and_kd_trains_on_them(scored, tmp_path):
    from coreg_dist.data.stream import ShardSource, StreamContext, iterate_sweep
    from coreg_dist.shards.format import read_manifest

    cfg = _cfg(scored, str(tmp_path / "kd"), "kd", "train.column=scored")
    manifest = read_manifest(scored)
    source = ShardSource(scored, "")
    ctx = StreamContext(source=source, num_classes=manifest.num_classes, column="scored",
                        transform=image_transform(cfg, source, manifest), soft_labels=True)
    shards = [s.name for s in manifest.shards("train")]
    n = 0
    for b in iterate_sweep(ctx, shards, 16, image_shape=ctx.transform.shape):
        for row, t in zip(b.part.soft, b.part.true):
            # mean of (0.7, 0.3) and (0.9, 0.1) on (true, true + 1): 0.8 / 0.2 (float16 scores)
            assert row[t] == pytest.approx(0.8, abs=1e-3) and row[(t + 1) % 4] == pytest.approx(0.2, abs=1e-3)
            assert row.sum() == pytest.approx(1.0, abs=1e-5)
            n += 1
    assert n == 48
    rep = train(cfg, "cpu")
    assert rep["method"] == "kd" and 0 <= rep["test_acc"] <= 1


def test_kd_refuses_a_column_without_scores(dataset, tmp_path):
    with pytest.raises(ValueError, match="no topi.npy/topp.npy .* column 'synthetic'"):
        train(_cfg(dataset, str(tmp_path / "kd"), "kd"), "cpu")


def test_kd_loss_by_hand():
    """T = 1: CE with the soft target; T = 2: 4 * CE(sharpen(q, 2), softmax(z / 2))."""
    import torch
    from coreg_dist.rules.pll import proden_loss
    from coreg_dist.losses import sharpen
    z = torch.tensor([[0.0, np.log(3.0)]])          # softmax = (1/4, 3/4)
    q = torch.tensor([[0.5, 0.5]])
    # -(0.5 ln 1/4 + 0.5 ln 3/4) = ln 4 - 0.5 ln 3
    assert proden_loss(z, q).item() == pytest.approx(np.log(4) - 0.5 * np.log(3), abs=1e-6)
    q2 = torch.tensor([[0.2, 0.8]])                  # sharpen T=2: sqrt -> (0.447, 0.894)/1.342
    s = np.sqrt([0.2, 0.8]) / np.sqrt([0.2, 0.8]).sum()
    p = np.exp(np.array([0.0, np.log(3) / 2]))
    p = p / p.sum()
    want = 4 * -(s * np.log(p)).sum()
    assert (proden_loss(z / 2, sharpen(q2, 2.0)) * 4).item() == pytest.approx(want, abs=1e-5)


def committed_at_epoch_1(out, name):
    """The sorted, written values of a scalar state field in the version epoch 1 started from."""
    base = os.path.join(out, "checkpoints")
    version = json.load(open(os.path.join(base, "e0001-p00-s000000", "meta.json")))["state_version"]
    folder = os.path.join(out, "state", f"v{version:05d}")
    values = np.sort(np.concatenate([np.load(os.path.join(folder, f))[name]
                                     for f in os.listdir(folder) if f.endswith(".npz")]))
    return values[np.isfinite(values)]


def test_alim_lambda_is_the_noise_quantile_of_the_committed_margins(dataset, tmp_path):
    """ALIM's lambda at the start of epoch 1 = the int(N * noise_rate)-th smallest margin the
    steps of epoch 0 committed, capped at 1 (N: the samples written; the shuffle buffer leaves a
    few for the next epoch)."""
    out = str(tmp_path / "alim")
    train(_cfg(dataset, out, "alim", "train.epochs=2", "alim.queue_size=32", "alim.noise_rate=0.3",
               "alim.lambda_start_fraction=0", "train.keep_checkpoints=5"), "cpu")
    logged = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert logged[0]["alim_lambda"] == 0.0 and logged[1]["alim_noise_rate"] == 0.3
    margins = committed_at_epoch_1(out, "margin")
    assert len(margins) >= 40
    want = min(float(margins[int(len(margins) * 0.3)]), 1.0)
    assert logged[1]["alim_lambda"] == pytest.approx(want, rel=1e-6)


def test_pico_plus_reliable_set_is_the_closest_share_of_the_committed_distances(dataset, tmp_path):
    """PiCO+'s threshold at the start of epoch 1 = the int(N * pure_ratio)-th smallest distance
    the steps of epoch 0 committed; the steps of epoch 1 then see that share as reliable."""
    out = str(tmp_path / "pico_plus")
    train(_cfg(dataset, out, "pico_plus", "pico_plus.queue_size=32", "pico_plus.pure_ratio=0.5",
               "train.keep_checkpoints=5"), "cpu")
    logged = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert "pico_plus_threshold" not in logged[0]         # every sample reliable in epoch 0
    dist = committed_at_epoch_1(out, name="dist")
    assert len(dist) >= 40 and np.all(dist >= -1 - 1e-5) and np.all(dist <= 1 + 1e-5)
    assert logged[1]["pico_plus_threshold"] == pytest.approx(float(dist[int(len(dist) * 0.5) - 1]), rel=1e-6)
    assert logged[1]["pico_plus_reliable_share"] == pytest.approx(0.5, abs=0.05)
    assert 0.0 < logged[1]["pico_plus/reliable"] < 1.0
