"""The launch paths users have, on 2 CPU processes: DeepSpeed ZeRO 0-3 (torchrun and the
`deepspeed` launcher) and `accelerate launch`, through the one trainer. Every engine trains the
same networks: their per-epoch metrics equal DDP's, and a ZeRO checkpoint resumes exactly.
The demo preset itself (Fashion-MNIST, the embedded annotator) runs one launch path each in the
slow tests (make test-all)."""
import json
import os

import pytest
import torch

from coreg_dist.dist import Collectives
from tests.helpers import (TORCHRUN, common, demo_overrides, launch, latest, make_labeled_dataset,
                           model, torchrun)
from train.kill_drill import epoch_metrics

deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is an install extra: pip install -e '.[deepspeed]'")
accelerate = pytest.importorskip("accelerate", reason="pip install -e '.[accelerate]'")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_labeled_dataset(str(tmp_path_factory.mktemp("ds")), n_train=64, n_test=24)


@pytest.fixture(scope="module")
def ddp_run(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    torchrun(2, common(dataset, out))
    return out


def zero(stage):
    return ["dist.engine=deepspeed", f"dist.deepspeed_config=configs/deepspeed/zero{stage}-fp32.json"]


def report(run_dir):
    return json.load(open(os.path.join(run_dir, "report.json")))


def same_training(a, b):
    """Equal to float summation order: ZeRO reduce-scatters where DDP all-reduces buckets."""
    for x, y in zip(epoch_metrics(a), epoch_metrics(b), strict=True):
        assert x.keys() == y.keys()
        for k, v in x.items():
            if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float)):
                assert y[k] == pytest.approx(v, rel=1e-3, abs=1e-5), (x["epoch"], k)
            else:
                assert y[k] == v, (x["epoch"], k)
    A, B = model(a), model(b)
    for k in range(2):
        for name, t in A["nets"][k].items():
            # as DDP against one process (test_distributed): summation-order drift over 3 epochs
            assert torch.allclose(t.float(), B["nets"][k][name].float(), atol=1e-4), name


@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_zero_trains_what_ddp_trains(dataset, ddp_run, tmp_path, stage):
    """ZeRO-1 (optimizer state sharded) and ZeRO-3 (parameters sharded: EMA key encoders,
    evaluation and co-divide sweeps read gathered parameters) give DDP's metrics."""
    out = str(tmp_path / "ds")
    torchrun(2, common(dataset, out, *zero(stage)))
    rep = report(out)
    assert rep["engine"] == "deepspeed" and rep["world_size"] == 2 and rep["ranks_in_sync"] is True
    same_training(ddp_run, out)
    # every rank wrote its ZeRO partition into the trainer's checkpoint
    parts = os.listdir(os.path.join(latest(out), "engine0", "deepspeed"))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(parts)


def test_deepspeed_zero3_mid_epoch_resume_is_exact(dataset, ddp_run, tmp_path):
    out = str(tmp_path / "z3")
    torchrun(2, common(dataset, out, *zero(3), "train.checkpoint_every=3", "train.stop_after_steps=10"),
             expect="killed")
    meta = json.load(open(os.path.join(latest(out), "meta.json")))
    assert meta["mid_epoch"] and meta["engine"] == "deepspeed"
    r = torchrun(2, common(dataset, out, *zero(3), "train.checkpoint_every=3", "train.resume=latest"))
    assert "continuing mid-epoch" in r.stdout
    same_training(ddp_run, out)


def test_deepspeed_checkpoint_refuses_another_engine(dataset, tmp_path):
    out = str(tmp_path / "z1")
    torchrun(2, common(dataset, out, *zero(1), "train.epochs=1"))
    r = launch([*TORCHRUN, "--nproc_per_node=2", "-m", "train.cli",
                *common(dataset, out, "train.epochs=2", "train.resume=latest")], expect=1)
    assert "written by the deepspeed engine" in r.stderr and "dist.engine=deepspeed" in r.stderr


def test_deepspeed_launcher(dataset, ddp_run, tmp_path):
    """`deepspeed --num_gpus 2 --module train.cli` (it passes --local_rank to the script)."""
    out = str(tmp_path / "launcher")
    launch(["deepspeed", "--num_gpus", "2", "--master_port", "29531", "--module", "train.cli",
            *common(dataset, out, *zero(2)), "run.threads=2"])
    assert report(out)["engine"] == "deepspeed" and report(out)["world_size"] == 2
    same_training(ddp_run, out)


def test_accelerate_launch(dataset, ddp_run, tmp_path):
    out = str(tmp_path / "acc")
    launch(["accelerate", "launch", "--config_file", "configs/accelerate/cpu-2proc.yaml",
            "--main_process_port", "29532", "-m", "train.cli", *common(dataset, out), "run.threads=2"])
    rep = report(out)
    assert rep["engine"] == "accelerate" and rep["world_size"] == 2 and rep["ranks_in_sync"] is True
    same_training(ddp_run, out)


# ---------------------------------------------------------------------- configuration errors
class Cfg:
    """The slice of the config deepspeed_config reads."""

    def __init__(self, path, batch=8, clip=0.0):
        self.dist = type("D", (), {"deepspeed_config": path})()
        self.train = type("T", (), {"batch_size": batch, "grad_clip": clip})()


def test_deepspeed_config_is_completed_and_checked(tmp_path):
    from coreg_dist.engines.deepspeed_engine import deepspeed_config

    ds = deepspeed_config(Cfg("configs/deepspeed/zero2-fp32.json", batch=64, clip=5.0), 2, "cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["train_batch_size"] == 64
    assert ds["gradient_clipping"] == 5.0 and ds["zero_optimization"]["stage"] == 2
    gpu = deepspeed_config(Cfg("auto"), 1, "cuda:0")      # ZeRO-2, bf16 autocast
    assert gpu["zero_optimization"]["stage"] == 2 and gpu["torch_autocast"]["dtype"] == "bfloat16"
    assert deepspeed_config(Cfg("auto"), 1, "cpu")["bf16"]["enabled"] is False
    bad = tmp_path / "bad.json"
    bad.write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(ValueError, match="remove 'optimizer'"):
        deepspeed_config(Cfg(str(bad)), 1, "cpu")
    bad.write_text('{"train_batch_size": 7}')
    with pytest.raises(ValueError, match="train_batch_size.*remove it"):
        deepspeed_config(Cfg(str(bad)), 1, "cpu")
    bad.write_text('{"zero_optimization": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        deepspeed_config(Cfg(str(bad)), 1, "cpu")
    with pytest.raises(FileNotFoundError, match="dist.deepspeed_config"):
        deepspeed_config(Cfg(str(tmp_path / "none.json")), 1, "cpu")


def test_engine_choice(monkeypatch):
    from coreg_dist.engines import engine_name

    cfg = type("C", (), {"dist": type("D", (), {"engine": "auto"})()})()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert engine_name(cfg, Collectives()) == "local"
    assert engine_name(cfg, Collectives(0, 2)) == "ddp"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert engine_name(cfg, Collectives(0, 2)) == "accelerate"
    cfg.dist.engine = "horovod"
    with pytest.raises(ValueError, match="dist.engine"):
        engine_name(cfg, Collectives())


# ---------------------------------------------------------------------- the demo preset
# (demo_data: tests/conftest.py)
DEMO_LAUNCHERS = {
    "torchrun": [*TORCHRUN, "--nproc_per_node=2", "-m", "train.cli"],
    "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", "29533", "--module", "train.cli"],
    "accelerate": ["accelerate", "launch", "--config_file", "configs/accelerate/cpu-2proc.yaml",
                   "--main_process_port", "29534", "-m", "train.cli"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(DEMO_LAUNCHERS))
def test_demo_preset_on_two_processes(demo_data, launcher, tmp_path):
    """configs/demo.yaml (4,000 of its images, warm-up then a Co-Reg epoch) on 2 processes."""
    out = str(tmp_path / launcher)
    extra = ["dist.engine=deepspeed"] if launcher == "deepspeed" else []
    launch([*DEMO_LAUNCHERS[launcher], "--config", "configs/demo.yaml",
            *demo_overrides(demo_data, f"run.out_dir={out}", *extra)], timeout=900)
    rep = report(out)
    assert rep["world_size"] == 2 and rep["ranks_in_sync"] is True
    assert rep["engine"] == {"torchrun": "ddp"}.get(launcher, launcher)
    assert [m["epoch"] for m in epoch_metrics(out)] == [0, 1]
    assert rep["test_acc"] > 0.15       # 10 classes: above chance (measured 25.4% for all three)
