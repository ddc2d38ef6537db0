"""Output alignment (coreg_dist/output_prior.py): the bias makes the pool's mean prediction the
prior, the images it is fitted on do not depend on the world size, and it changes the
predictions only, never the training."""
import json
import os

import numpy as np
import pytest
import torch

from coreg_dist.config import ConfigError
from coreg_dist.data.stream import sweep_shards
from coreg_dist.dist import Collectives
from coreg_dist.output_prior import fit_logit_bias, prior_shards, target_prior
from tests.helpers import make_labeled_dataset
from tests.test_train import cfg_for, final_model, assert_same_model
from train.trainer import train


def skewed_logits(n=4000, K=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, K, generator=g) * 2 + torch.linspace(2.0, -2.0, K)   # class 0 favoured


@pytest.mark.parametrize("kind", ["uniform", "candidates"])
def test_bias_makes_the_mean_prediction_the_prior(kind):
    logits = skewed_logits()
    mass = np.array([1.0, 2.0, 3.0, 1.0, 0.5, 0.5]) * 100
    prior = target_prior(kind, mass, 6)
    before = logits.softmax(1).mean(0).double()
    assert (before - prior).abs().max() > 0.1               # far from the prior to start with
    b = fit_logit_bias(logits, prior, Collectives())
    after = (logits + b).softmax(1).mean(0).double()
    assert (after - prior).abs().max() < 1e-3
    assert abs(float(b.mean())) < 1e-5                        # centred: only the differences matter


def test_a_class_never_predicted_still_reaches_its_share():
    logits = skewed_logits(K=4)
    logits[:, 3] -= 40.0                                       # softmax mass ~1e-17 before the fit
    b = fit_logit_bias(logits, target_prior("uniform", None, 4), Collectives(), max_iter=400)
    assert abs(float((logits + b).softmax(1).mean(0)[3]) - 0.25) < 1e-3


def test_priors_and_empty_sweeps_are_refused_clearly():
    with pytest.raises(ValueError, match="train.output_prior"):
        target_prior("balanced", None, 3)
    with pytest.raises(ValueError, match="no candidate set"):
        target_prior("candidates", np.zeros(3), 3)
    with pytest.raises(ValueError, match="no training image"):
        fit_logit_bias(torch.zeros(0, 3), target_prior("uniform", None, 3), Collectives())


def test_the_fitted_images_are_the_same_at_any_world_size():
    counts = {f"train-{i:06d}": n for i, n in enumerate([400, 250, 400, 100, 400, 300])}
    chosen = prior_shards(counts, 1000)
    assert list(chosen) == ["train-000000", "train-000001", "train-000002"]   # 1,050 >= 1,000
    assert prior_shards(counts, 10 ** 6) == counts
    for world in (1, 2, 3, 5):
        parts = [sweep_shards(chosen, r, world, seed=0) for r in range(world)]
        assert sorted(s for p in parts for s in p) == sorted(chosen)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_labeled_dataset(str(tmp_path_factory.mktemp("ds")), n_train=48, n_test=24)


def test_alignment_changes_predictions_not_training(dataset, tmp_path):
    aligned, plain = str(tmp_path / "aligned"), str(tmp_path / "plain")
    rep = train(cfg_for(dataset, aligned, "train.epochs=2", "train.output_prior=uniform",
                    "train.output_prior_samples=20"), "cpu")
    ref = train(cfg_for(dataset, plain, "train.epochs=2", "train.output_prior=none"), "cpu")
    assert_same_model(final_model(aligned), final_model(plain))
    assert rep["output_prior"] == "uniform" and len(rep["output_bias"]) == 4
    assert rep["raw_test_acc"] == ref["test_acc"] and "raw_test_acc" not in ref
    assert "without the output alignment" in open(os.path.join(aligned, "report.md")).read()
    assert "without the output alignment" not in open(os.path.join(plain, "report.md")).read()
    lines = [json.loads(l) for l in open(os.path.join(aligned, "metrics.jsonl"))]
    ref_lines = [json.loads(l) for l in open(os.path.join(plain, "metrics.jsonl"))]
    for a, b in zip(lines, ref_lines):
        for net in ("net1", "net2", "ensemble"):
            assert a[f"raw_test_acc_{net}"] == b[f"test_acc_{net}"]


def test_unknown_output_prior_names_the_key(dataset, tmp_path):
    with pytest.raises(ConfigError, match="train.output_prior"):
        train(cfg_for(dataset, str(tmp_path / "x"), "train.output_prior=balanced"), "cpu")
    with pytest.raises(ConfigError, match="train.output_prior_samples"):
        train(cfg_for(dataset, str(tmp_path / "y"), "train.output_prior=uniform",
                      "train.output_prior_samples=0"), "cpu")


def test_candidates_prior_for_a_one_network_method(dataset, tmp_path):
    rep = train(cfg_for(dataset, str(tmp_path / "pce"), "train.method=pce", "train.epochs=1",
                        "train.output_prior=candidates"), "cpu")
    assert rep["output_prior"] == "candidates" and len(rep["output_bias"]) == 4
    assert 0.0 <= rep["raw_test_acc"] <= 1.0 and 0.0 <= rep["test_acc"] <= 1.0
