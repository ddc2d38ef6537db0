import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from coreg_dist.config import ConfigError, load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_preset_and_overrides():
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), ["train.epochs=3", "coreg.mixup=false"])
    assert cfg.run.out_dir == "runs/demo" and cfg.train.epochs == 3 and cfg.coreg.mixup is False
    assert len(cfg.annotator.templates) == 27


@pytest.mark.parametrize("override,needle", [
    (["train.epochz=3"], "train.epochz"),
    (["nosuch.key=1"], "nosuch"),
    (["train.epochs=abc"], "train.epochs"),
    (["coreg.mixup=maybe"], "coreg.mixup"),
    (["justakey"], "justakey"),
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, override)


def test_bad_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "train.lrr" in str(e.value) and str(p) in str(e.value)


def test_missing_required_value(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("annotator:\n  model: ''\n")
    with pytest.raises(ConfigError, match="annotator.model.*required"):
        load_config(str(p), required=["annotator.model"])


def test_saved_config_reloads(tmp_path):
    cfg = load_config(None, ["train.lr=0.05"])
    path = save_config(cfg, str(tmp_path))
    again = load_config(path)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_cli_unknown_key_exits_with_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "coreg_dist.data_cli", "inspect", "data.rooot=x"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "data.rooot" in r.stderr


def test_several_presets_merge_in_order(tmp_path):
    cfg = load_config([os.path.join(ROOT, "configs", "demo.yaml"),
                       os.path.join(ROOT, "configs", "data", "photos-64.yaml")], ["data.channels=1"])
    assert cfg.run.out_dir == "runs/demo" and cfg.data.image_size == 64 and cfg.data.channels == 1
    assert cfg.train.crop_pad == 8          # the later preset wins
