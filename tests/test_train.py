"""Trainer runs in one process on tiny real shards: Co-Reg and PCE, every switch, few-shot,
per-sample state per shard, exact mid-epoch resume, no sample lost or seen twice."""
import glob
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from coreg_dist.config import ConfigError, load_config
from tests.helpers import corrupt_images, make_labeled_dataset
from train.trainer import RunKilled, train

ALL_OFF = ["coreg.warmup_neg_entropy=false", "coreg.co_divide=false",
           "coreg.distribution_alignment=false", "coreg.minmax_normalize=false",
           "coreg.loss_history=1", "coreg.cross_use=false", "coreg.co_pseudo_label=false",
           "coreg.refine_labeled=false", "coreg.co_guess_unlabeled=false", "coreg.use_unlabeled=false",
           "coreg.mixup=false", "coreg.prototypes=false", "coreg.contrastive=false",
           "coreg.noisy_contrastive=false", "coreg.ensemble=false", "coreg.divide_per_class=false",
           "coreg.pce_weight=0", "coreg.warmup_view=strong"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_labeled_dataset(str(tmp_path_factory.mktemp("ds")), n_train=48, n_test=24)


def cfg_for(root, out, *extra):
    return load_config(None, [f"data.root={root}", f"run.out_dir={out}", "train.column=synthetic",
                              "train.epochs=4", "train.batch_size=8", "train.eval_batch_size=16",
                              "coreg.warm_up=1", "coreg.feature_start=1", "coreg.queue_size=32",
                              "coreg.rampup_epochs=2", "train.lr_period=0", "run.threads=1",
                              "data.shuffle_buffer=8", *extra])


def latest(run_dir):
    base = os.path.join(run_dir, "checkpoints")
    return os.path.join(base, open(os.path.join(base, "latest")).read().strip())


def final_model(run_dir):
    return torch.load(os.path.join(latest(run_dir), "model.pt"), weights_only=True)


def assert_same_model(a, b):
    for k in range(len(a["method"]["nets"])):
        for name, t in a["method"]["nets"][k].items():
            assert torch.equal(t, b["method"]["nets"][k][name]), name
    if "prototypes" in a["method"]:
        assert torch.equal(a["method"]["prototypes"], b["method"]["prototypes"])
        for qa, qb in zip(a["method"]["queues"], b["method"]["queues"]):
            assert torch.equal(qa["feats"], qb["feats"])


def test_coreg_smoke_writes_report_logs_and_state(dataset, tmp_path):
    out = str(tmp_path / "run")
    report = train(cfg_for(dataset, out), "cpu")
    for key in ("test_acc_net1", "test_acc_net2", "test_acc_ensemble", "epochs", "seconds", "eta",
                "avg_candidates", "world_size", "streams", "data_wait_fraction"):
        assert key in report
    assert report["world_size"] == 1 and report["ranks_in_sync"] is True
    assert 0.0 <= report["test_acc_ensemble"] <= 1.0 and report["test_samples"] == 24
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [l["epoch"] for l in lines] == [0, 1, 2, 3]
    after = lines[-1]
    # co-divide ran and split the pool; the feature terms were back-propagated
    assert after["n_p_net1"] + after["n_u_net1"] == 48
    assert "loss/cont" in after and "loss/proto" in after and len(after["gmm_means_net1"]) == 2
    for f in ("report.json", "report.md", "plots/accuracy.png", "plots/confusion.png",
              "config.yaml", "checkpoints/latest"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert any(n.startswith("events") for n in os.listdir(os.path.join(out, "tb")))
    # per-sample state: one file per shard, keyed, predictions stored per candidate only
    meta = json.load(open(os.path.join(latest(out), "meta.json")))
    st = np.load(os.path.join(out, "state", f"v{meta['state_version']:05d}", "train-000000.npz"))
    assert st["__keys__"][0] == "train_00000" and len(st["__keys__"]) == 16
    assert st["pred0"].shape == (st["__ncand__"].sum(),) and st["w0"].shape == (16,)


def test_every_switch_off_still_completes(dataset, tmp_path):
    report = train(cfg_for(dataset, str(tmp_path / "off"), *ALL_OFF), "cpu")
    assert "test_acc_ensemble" not in report and 0 <= report["test_acc"] <= 1


@pytest.mark.parametrize("switch", ALL_OFF)
def test_each_switch_off_alone_completes(dataset, tmp_path, switch):
    report = train(cfg_for(dataset, str(tmp_path / "one"), switch, "train.epochs=3"), "cpu")
    assert 0 <= report["test_acc"] <= 1


def test_few_shot_samples_forced_into_p(dataset, tmp_path):
    out = str(tmp_path / "few")
    train(cfg_for(dataset, out, "train.few_shot=2", "train.epochs=2"), "cpu")
    meta = json.load(open(os.path.join(latest(out), "meta.json")))
    folder = os.path.join(out, "state", f"v{meta['state_version']:05d}")
    fixed, w, true, ncand = [], [], [], []
    for i in range(3):
        z = np.load(os.path.join(folder, f"train-00000{i}.npz"))
        fixed.append(z["fixed"]), w.append(z["w0"]), true.append(z["true"]), ncand.append(z["__ncand__"])
    fixed, w, true, ncand = map(np.concatenate, (fixed, w, true, ncand))
    chosen = fixed >= 0
    assert chosen.sum() == 8                                  # 2 per class, 4 classes
    assert Counter(fixed[chosen].tolist()) == {0: 2, 1: 2, 2: 2, 3: 2}
    assert (fixed[chosen] == true[chosen]).all() and (ncand[chosen] == 1).all()
    assert (w[chosen] == 1.0).all()


def test_max_train_samples_keeps_a_seeded_subset(dataset, tmp_path):
    out = str(tmp_path / "sub")
    report = train(cfg_for(dataset, out, "train.max_train_samples=24", "train.epochs=1"), "cpu")
    assert 12 <= report["train_samples"] <= 36
    again = train(cfg_for(dataset, str(tmp_path / "sub2"), "train.max_train_samples=24",
                          "train.epochs=1"), "cpu")
    assert again["train_samples"] == report["train_samples"]


def test_pce_baseline(dataset, tmp_path):
    report = train(cfg_for(dataset, str(tmp_path / "pce"), "train.method=pce"), "cpu")
    assert report["method"] == "pce" and "test_acc_net1" in report


def read_keys(run_dir):
    """[(epoch, pass, step, part, key), ...] in the order train.log_keys wrote them."""
    path = os.path.join(run_dir, "keys", "rank_0.txt")
    return [tuple(int(v) if i < 3 else v for i, v in enumerate(l.split())) for l in open(path)]


def keep_keys_before(run_dir, position):
    """Drop what a killed run logged after its last checkpoint (the resumed run redoes it)."""
    keys = read_keys(run_dir)
    kept = [k for k in keys if k[:3] < position]
    with open(os.path.join(run_dir, "keys", "rank_0.txt"), "w") as f:
        f.write("".join(" ".join(map(str, k)) + "\n" for k in kept))
    return len(keys) - len(kept)


# own_aligned: P's targets use the DA statistics of the epoch's co-divide, which the checkpoint
# must carry (a mid-epoch resume does not redo the co-divide); auto: its companion share too
@pytest.mark.parametrize("p_refine", ["all", "own_aligned", "auto"])
def test_resume_mid_epoch_equals_uninterrupted(dataset, tmp_path, p_refine):
    full = str(tmp_path / "full")
    # warm-up batch factor 2: the step arithmetic below
    extra = ("coreg.warmup_batch_factor=2", f"coreg.p_refine={p_refine}")
    ref = train(cfg_for(dataset, full, "train.log_keys=true", *extra), "cpu")
    cut = str(tmp_path / "cut")
    # warm-up: 2 passes x 3 steps; checkpoint every 4 steps; killed at step 10, inside epoch 1
    with pytest.raises(RunKilled):
        train(cfg_for(dataset, cut, "train.stop_after_steps=10", "train.checkpoint_every=4",
                      "train.log_keys=true", *extra), "cpu")
    meta = json.load(open(os.path.join(latest(cut), "meta.json")))
    assert meta["mid_epoch"] and meta["epoch"] == 1 and meta["global_step"] == 8
    redone = keep_keys_before(cut, (meta["epoch"], meta["pass_index"], meta["step"]))
    assert redone > 0                    # the killed run had gone past its checkpoint
    resumed = train(cfg_for(dataset, cut, "train.resume=latest", "train.checkpoint_every=4",
                            "train.log_keys=true", *extra), "cpu")
    assert resumed["test_acc_ensemble"] == ref["test_acc_ensemble"]
    assert_same_model(final_model(full), final_model(cut))
    a = [json.loads(l) for l in open(os.path.join(full, "metrics.jsonl"))]
    b = [json.loads(l) for l in open(os.path.join(cut, "metrics.jsonl"))]
    assert [l["epoch"] for l in b] == [0, 1, 2, 3]
    for la, lb in zip(a, b):
        for k in ("loss/x", "loss/u", "n_p_net1", "n_p_net2", "test_acc_ensemble", "steps"):
            assert la.get(k) == lb.get(k), (la["epoch"], k)
    # no sample lost and none seen twice: every step saw the same parts and keys, in order
    assert read_keys(full) == read_keys(cut)


def test_resume_of_finished_run_evaluates(dataset, tmp_path):
    out = str(tmp_path / "done")
    ref = train(cfg_for(dataset, out, "train.epochs=2"), "cpu")
    again = train(cfg_for(dataset, out, "train.epochs=2", "train.resume=latest"), "cpu")
    assert again["test_acc"] == ref["test_acc"]


def test_unknown_method_names_key(dataset, tmp_path):
    with pytest.raises(ValueError, match="train.method"):
        train(cfg_for(dataset, str(tmp_path / "x"), "train.method=nope"), "cpu")


def test_batch_must_split_over_streams(dataset, tmp_path):
    with pytest.raises(ValueError, match="data.streams"):
        train(cfg_for(dataset, str(tmp_path / "x"), "data.streams=3", "train.epochs=1"), "cpu")


def test_registry_lists_builtin_methods_without_building_one():
    from coreg_dist.methods import list_methods
    assert {"coreg", "pce"} <= set(list_methods())


def test_method_config_section_comes_from_the_registry():
    from coreg_dist.config import schema
    from coreg_dist.methods.coreg import CoRegConfig
    assert schema().coreg.warm_up == CoRegConfig().warm_up


def test_shards_through_a_url_train_exactly_as_local_files(dataset, tmp_path):
    """data.shard_url streams every shard through webdataset's gopen (here `pipe:cat`), with
    no seeking; local files are read by byte span. Same samples, same order, same result."""
    local = train(cfg_for(dataset, str(tmp_path / "local"), "train.epochs=3"), "cpu")
    piped = train(cfg_for(dataset, str(tmp_path / "pipe"), "train.epochs=3",
                          f"data.shard_url=pipe:cat {dataset}/{{path}}"), "cpu")
    assert piped["test_acc_ensemble"] == local["test_acc_ensemble"]
    assert_same_model(final_model(str(tmp_path / "local")), final_model(str(tmp_path / "pipe")))


@pytest.fixture(scope="module")
def one_shard_corrupt(tmp_path_factory):
    """Two shards; every image of the second one is garbage (a stream's own shards then hold
    nothing decodable)."""
    root = make_labeled_dataset(str(tmp_path_factory.mktemp("corrupt")), n_train=32, n_test=16)
    corrupt_images(root, "train-000001")
    return root


def test_shard_of_corrupt_images_is_reported_marked_bad_and_survived(one_shard_corrupt, tmp_path):
    out = str(tmp_path / "c")
    report = train(cfg_for(one_shard_corrupt, out, "data.streams=2", "train.epochs=3"), "cpu")
    assert report["data_errors"]["counts"] == {"corrupt_image": 16}
    ex = report["data_errors"]["examples"][0]
    assert ex["shard"] == "train-000001" and ex["key"].startswith("train_")
    meta = json.load(open(os.path.join(latest(out), "meta.json")))
    st = np.load(os.path.join(out, "state", f"v{meta['state_version']:05d}", "train-000001.npz"))
    assert (st["bad"] == 1).all() and len(st["bad"]) == 16     # the sweep marked them for good
    metrics = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert metrics[-1]["n_p_net1"] + metrics[-1]["n_u_net1"] == 16   # only decodable samples split


def test_epoch_boundary_resume_keeps_the_error_counts(one_shard_corrupt, tmp_path):
    out = str(tmp_path / "r")
    train(cfg_for(one_shard_corrupt, out, "data.streams=2", "train.epochs=2"), "cpu")
    again = train(cfg_for(one_shard_corrupt, out, "data.streams=2", "train.epochs=3",
                          "train.resume=latest"), "cpu")
    assert again["data_errors"]["counts"] == {"corrupt_image": 16}


def test_shard_names_that_could_reach_a_shell_are_refused(dataset, tmp_path):
    from coreg_dist.shards.format import FormatError, read_manifest
    import shutil
    root = str(tmp_path / "evil")
    shutil.copytree(dataset, root)
    man = json.load(open(os.path.join(root, "manifest.json")))
    man["splits"]["train"][0]["name"] = "x; touch /tmp/pwned; echo"
    json.dump(man, open(os.path.join(root, "manifest.json"), "w"))
    with pytest.raises(FormatError, match="shard name"):
        read_manifest(root)


def test_u_guess_outside_weight_from_the_split_totals():
    """coreg.u_guess: the weight of classes outside S in U's co-guesses. adaptive: the share of
    U whose prediction lies outside S, per network, from the committed totals."""
    from types import SimpleNamespace

    from coreg_dist.methods.coreg import CoReg

    totals = {"u0_in": 30, "u0_out": 10, "u1_in": 0, "u1_out": 0}
    weight = lambda mode, k: CoReg._u_outside_weight(SimpleNamespace(c=SimpleNamespace(u_guess=mode)), totals, k)
    assert weight("adaptive", 0) == 0.25 and weight("adaptive", 1) == 1.0     # empty U: as published
    assert weight("all", 0) == 1.0 and weight("candidates", 0) == 0.0


def test_divide_per_class_normalises_within_each_pseudo_class(dataset, tmp_path):
    """coreg.divide_per_class: the division loss entering the GMM is min-max normalised within
    each pseudo-class (masked argmax), so every class spans [0, 1]; U's co-guesses may be kept
    weighted toward the candidate sets (coreg.u_guess=adaptive)."""
    out = str(tmp_path / "pc")
    train(cfg_for(dataset, out, "coreg.divide_per_class=true", "coreg.u_guess=adaptive",
                  "train.epochs=2", "coreg.warm_up=1"), "cpu")
    meta = json.load(open(os.path.join(latest(out), "meta.json")))
    folder = os.path.join(out, "state", f"v{meta['state_version']:05d}")
    z = [np.load(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith(".npz")]
    for k in range(2):
        norm = np.concatenate([a[f"hist{k}"][:, 0] for a in z])      # the first co-divide epoch
        cls = np.concatenate([a[f"plab{k}"] for a in z])
        loss = np.concatenate([a[f"loss{k}"] for a in z])
        assert (cls >= 0).all()
        for c in np.unique(cls):
            m = cls == c
            if m.sum() >= 2 and np.ptp(loss[m]) > 1e-6:
                assert norm[m].min() == pytest.approx(0.0, abs=1e-6)
                assert norm[m].max() == pytest.approx(1.0, abs=1e-5)


def test_u_in_and_out_of_candidate_accuracy_add_up_to_u(dataset, tmp_path):
    """[C] the authors' per-epoch log of U: how many unrestricted guesses fall inside / outside
    the candidate set, and how often each is right; counted from the per-sample state."""
    out = str(tmp_path / "uio")
    train(cfg_for(dataset, out, "train.epochs=2", "coreg.warm_up=1"), "cpu")
    last = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))][-1]
    meta = json.load(open(os.path.join(latest(out), "meta.json")))
    folder = os.path.join(out, "state", f"v{meta['state_version']:05d}")
    z = [np.load(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith(".npz")]
    for k in range(2):
        n_in, n_out = last[f"u_in_cand_n_net{k + 1}"], last[f"u_out_cand_n_net{k + 1}"]
        assert n_in + n_out == last[f"n_u_net{k + 1}"]
        u = np.concatenate([a[f"w{k}"] <= 0.5 for a in z])
        uin = np.concatenate([a[f"uin{k}"] for a in z])
        uhit = np.concatenate([a[f"uhit{k}"] for a in z])
        assert set(np.unique(uin)) <= {0, 1} and set(np.unique(uhit)) <= {0, 1}
        assert int((u & (uin == 1)).sum()) == n_in
        if n_in:
            assert last[f"u_in_cand_acc_net{k + 1}"] == pytest.approx(
                (u & (uin == 1) & (uhit == 1)).sum() / n_in)


def test_da_prior_from_candidate_sets_with_temperature(dataset):
    """coreg.da_prior=candidates: DA aligns toward the class balance of the candidate sets
    (each set spread evenly over its classes), raised to da_prior_temperature and renormalised."""
    from coreg_dist.methods.coreg import CoReg
    from types import SimpleNamespace

    sums = np.array([30.0, 10.0, 0.0, 60.0])
    m = SimpleNamespace(c=SimpleNamespace(da_prior="candidates", da_prior_temperature=0.5),
                        device="cpu")
    prior = CoReg._da_prior(m, sums).numpy()
    want = np.sqrt(np.maximum(sums, 1e-12))
    np.testing.assert_allclose(prior, want / want.sum(), rtol=1e-6)
    m.c.da_prior = "uniform"
    assert CoReg._da_prior(m, sums) is None
    with pytest.raises(Exception, match="coreg.da_prior"):
        train(cfg_for(dataset, "/tmp/unused-da", "coreg.da_prior=clip"), "cpu")


def test_weak_warmup_with_single_batch_takes_twice_the_steps(dataset, tmp_path):
    """coreg.warmup_batch_factor=1: the warm-up batch is train.batch_size (the authors: 2x), so a
    warm-up epoch makes twice the optimizer steps; coreg.warmup_view=weak trains it on weak views."""
    steps = {}
    for f in (2, 1):
        out = str(tmp_path / f"wb{f}")
        train(cfg_for(dataset, out, "train.epochs=1", "coreg.warm_up=1", "coreg.warmup_view=weak",
                      f"coreg.warmup_batch_factor={f}"), "cpu")
        steps[f] = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))][0]["steps"]
    assert steps[1] == 2 * steps[2]


@pytest.mark.parametrize("mode", ["all", "candidates"])
def test_p_refine_keeps_p_targets_in_the_candidate_sets(dataset, tmp_path, monkeypatch, mode):
    """coreg.p_refine=candidates: P's refined targets w p_masked + (1 - w) p_B take network B's
    prediction restricted to S, so they carry no mass outside S; the published `all` does."""
    import coreg_dist.methods.coreg as coreg_mod
    seen = []
    real = coreg_mod.refine_labeled

    def spy(p_masked, w, views, T=0.5):
        out = real(p_masked, w, views, T=T)
        seen.append((p_masked > 0, out))
        return out

    monkeypatch.setattr(coreg_mod, "refine_labeled", spy)
    train(cfg_for(dataset, str(tmp_path / mode), "train.epochs=2", f"coreg.p_refine={mode}"), "cpu")
    assert seen
    outside = max(float(out[~inside].max()) if (~inside).any() else 0.0 for inside, out in seen)
    # p_masked > 0 exactly on S (a softmax is never 0): the mass the targets put outside S
    assert (outside < 1e-6) if mode == "candidates" else (outside > 1e-3)


@pytest.mark.parametrize("mode", ["own", "own_aligned"])
def test_p_refine_own_is_the_no_co_pseudo_label_target_on_p_only(dataset, tmp_path, monkeypatch, mode):
    """coreg.p_refine=own: P's targets are network B's own prediction restricted to S (no
    refinement by A's committed prediction) while U keeps its co-guesses; with U's co-guesses
    off too it is exactly co_pseudo_label=false, step for step (own_aligned: after DA, so not)."""
    import coreg_dist.methods.coreg as coreg_mod
    calls = {"refine": 0, "co_guess": 0}
    real_refine, real_guess = coreg_mod.refine_labeled, coreg_mod.co_guess_unlabeled

    def refine(*a, **k):
        calls["refine"] += 1
        return real_refine(*a, **k)

    def guess(*a, **k):
        calls["co_guess"] += 1
        return real_guess(*a, **k)

    monkeypatch.setattr(coreg_mod, "refine_labeled", refine)
    monkeypatch.setattr(coreg_mod, "co_guess_unlabeled", guess)
    train(cfg_for(dataset, str(tmp_path / "own"), "train.epochs=2", f"coreg.p_refine={mode}"), "cpu")
    assert calls["refine"] == 0 and calls["co_guess"] > 0
    monkeypatch.undo()
    common = ("train.epochs=3",)
    train(cfg_for(dataset, str(tmp_path / "a"), *common, f"coreg.p_refine={mode}",
                  "coreg.co_guess_unlabeled=false"), "cpu")
    train(cfg_for(dataset, str(tmp_path / "b"), *common, "coreg.co_pseudo_label=false"), "cpu")
    if mode == "own":
        assert_same_model(final_model(str(tmp_path / "a")), final_model(str(tmp_path / "b")))
    else:
        with pytest.raises(AssertionError):
            assert_same_model(final_model(str(tmp_path / "a")), final_model(str(tmp_path / "b")))


def column_pairs(dataset):
    """The candidate-pair counts of the test column, as it is on disk."""
    from coreg_dist.labels import CandidatePairs
    from coreg_dist.shards.reader import decode_field, iter_tar
    pairs = CandidatePairs(4)
    for path in sorted(glob.glob(os.path.join(dataset, "columns", "synthetic", "train-*.tar"))):
        for _, fields in iter_tar(path):
            Y = np.zeros((1, 4), dtype=bool)
            Y[0, decode_field("cand.npy", fields["cand.npy"])] = True
            pairs.add(Y)
    return pairs


# key: {auto_share: (the value auto resolves to, what it logs)}
@pytest.mark.parametrize("key,resolved,logged", [
    ("p_refine", {0.0: ("all", 0), 1.01: ("own_aligned", 1)}, "p_refine_own"),
    ("co_pseudo_label", {0.0: ("true", 1), 1.01: ("false", 0)}, "co_pseudo_label"),
    ("co_divide", {0.0: ("false", 0), 1.01: ("true", 1)}, "co_divide")])
def test_auto_switches_follow_the_candidate_sets_companion_share(dataset, tmp_path, key, resolved,
                                                                 logged):
    """coreg.p_refine / co_pseudo_label / co_divide = auto measure the sets' companion share at
    the first co-divide (over the column as it is on disk), log it, and then train exactly as
    the value they resolve to: at or above coreg.auto_share (habitual groups) the published
    targets without the division, below it the division with the network's own targets."""
    want = column_pairs(dataset).companion_share()
    assert 0.0 < want < 1.0
    common = ("train.epochs=3",)
    for share, (value, flag) in resolved.items():
        auto, fixed = str(tmp_path / f"auto{share}"), str(tmp_path / value)
        # the same threshold in both runs: the default co_divide=auto reads it too
        train(cfg_for(dataset, auto, *common, f"coreg.{key}=auto", f"coreg.auto_share={share}"), "cpu")
        train(cfg_for(dataset, fixed, *common, f"coreg.{key}={value}", f"coreg.auto_share={share}"), "cpu")
        assert_same_model(final_model(auto), final_model(fixed))
        lines = [json.loads(l) for l in open(os.path.join(auto, "metrics.jsonl"))]
        assert "companion_share" not in lines[0]                 # warm-up: not measured yet
        for l in lines[1:]:
            assert l["companion_share"] == pytest.approx(want)
            assert l[logged] == flag


def test_co_divide_auto_does_not_divide_large_sets(dataset, tmp_path):
    """co_divide=auto also keeps every sample in P where the sets hold coreg.auto_set_size
    candidates or more on average (measured on the column on disk, logged), whatever the share."""
    size = column_pairs(dataset).mean_set_size()
    assert 1.0 < size < 2.5
    common = ("train.epochs=3", "coreg.auto_share=1.01")
    for threshold, divides in ((size - 0.01, False), (size + 0.01, True)):
        auto, fixed = str(tmp_path / f"auto{threshold}"), str(tmp_path / f"fixed{divides}")
        train(cfg_for(dataset, auto, *common, f"coreg.auto_set_size={threshold}"), "cpu")
        train(cfg_for(dataset, fixed, *common, f"coreg.co_divide={str(divides).lower()}"), "cpu")
        assert_same_model(final_model(auto), final_model(fixed))
        for l in [json.loads(l) for l in open(os.path.join(auto, "metrics.jsonl"))][1:]:
            assert l["mean_set_size"] == pytest.approx(size) and l["co_divide"] == int(divides)


def test_divide_start_separated_waits_for_the_gmm_to_separate(dataset, tmp_path):
    """coreg.divide_start=separated fits the GMM and logs its separation (Ashman's D) at every
    co-divide, but keeps every sample in P (w = 1), training exactly as co_divide=false, until D
    reaches coreg.divide_separation; from a separation already met it trains exactly as the
    published start."""
    common = ("train.epochs=3", "coreg.co_divide=true", "coreg.divide_start=separated")
    for threshold, same_as in ((1e9, "coreg.co_divide=false"), (0.0, "coreg.divide_start=epoch")):
        run, ref = str(tmp_path / f"sep{threshold}"), str(tmp_path / f"ref{threshold}")
        train(cfg_for(dataset, run, *common, f"coreg.divide_separation={threshold}"), "cpu")
        train(cfg_for(dataset, ref, *common, same_as), "cpu")
        assert_same_model(final_model(run), final_model(ref))
        lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))][1:]
        assert lines
        for l in lines:
            for k in (1, 2):
                assert l[f"gmm_separation_net{k}"] > 0
                assert l[f"divided_net{k}"] == int(threshold == 0.0)
                if threshold:
                    assert l[f"n_u_net{k}"] == 0


@pytest.mark.parametrize("key", ["p_refine", "co_pseudo_label", "co_divide", "divide_start"])
def test_unknown_target_switch_value_is_named(dataset, tmp_path, key):
    with pytest.raises(ConfigError, match=f"coreg.{key}"):
        train(cfg_for(dataset, str(tmp_path / "bad"), f"coreg.{key}=some"), "cpu")


