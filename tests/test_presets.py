"""The presets follow the Co-Reg authors' code: the PreAct ResNet-18, the per-dataset augmentation
presets (configs/data/), the Fashion-MNIST GPU run (configs/gpu.yaml), and the augmentation keys
(train.cutout_fill, train.randaug_list) reaching the strong view."""
import glob
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from coreg_dist.augment import RANDAUG_OPS, strong_augment
from coreg_dist.config import ConfigError, load_config
from coreg_dist.methods import base as method_base
from coreg_dist.methods.base import DataInfo, Method, make_generator
from coreg_dist.models import build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
GPU = os.path.join(ROOT, "configs", "gpu.yaml")
FMNIST = os.path.join(ROOT, "configs", "data", "fashion-mnist.yaml")
DATA_PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "data", "*.yaml")))


pytestmark = pytest.mark.usefixtures("one_thread_seeded")


# ----------------------------------------------------------------------------- the network
# The authors' encoder (Co-Reg utils/resnet.py resnet18 = DivideMix PreResNet.py ResNet18 without
# its linear layer), 3 input channels, "32x32" (layer1 stride 1). Weights + BN (weight, bias):
#   stem   conv3x3 3->64: 3*64*9 = 1,728; BN(64): 128                                  1,856
#   layer1 2 x [BN(64) 128 + conv 64*64*9 36,864 + BN(64) 128 + conv 36,864] = 2 x 73,984
#                                                                                    147,968
#   layer2 [BN(64) 128 + conv 64*128*9 73,728 + BN(128) 256 + conv 128*128*9 147,456
#           + 1x1 shortcut 64*128 8,192] 229,760 + [256 + 147,456 + 256 + 147,456] 295,424
#                                                                                    525,184
#   layer3 [256 + 294,912 + 512 + 589,824 + 32,768] 918,272 + [512 + 589,824 + 512 + 589,824]
#           1,180,672                                                              2,098,944
#   layer4 [512 + 1,179,648 + 1,024 + 2,359,296 + 131,072] 3,671,552
#           + [1,024 + 2,359,296 + 1,024 + 2,359,296] 4,720,640                    8,392,192
#   total                                                                         11,166,144
# (checked against their module: identical state-dict keys and outputs for the same weights).
# At 64 px layer1's first block has stride 2, so it gets a 1x1 shortcut of 64*64 = 4,096 more;
# one input channel has 2 * 64 * 9 = 1,152 fewer stem weights than three.
AUTHORS_PARAMS_3CH_32PX = 11_166_144


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("ch,size,expected", [
    (3, 32, AUTHORS_PARAMS_3CH_32PX),
    (1, 28, AUTHORS_PARAMS_3CH_32PX - 1_152),
    (3, 64, AUTHORS_PARAMS_3CH_32PX + 4_096),
])
def test_preact_parameter_count_is_the_authors(ch, size, expected):
    assert _n_params(build_backbone("preact_resnet18", in_channels=ch, image_size=size)) == expected


def test_preact_structure_is_the_authors():
    bb = build_backbone("preact_resnet18", in_channels=3, image_size=32)
    # stem: conv3x3 (stride 1, no bias) -> BN(64); then the four stages and nothing else
    assert [n for n, _ in bb.named_children()] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert isinstance(bb.conv1, nn.Conv2d) and bb.conv1.kernel_size == (3, 3)
    assert bb.conv1.stride == (1, 1) and bb.conv1.padding == (1, 1) and bb.conv1.bias is None
    assert isinstance(bb.bn1, nn.BatchNorm2d) and bb.bn1.num_features == 64
    # no BatchNorm after layer4 (no `bn` module, see the children above): the stem's BN and
    # two per block, nothing more; forward_map's output is layer4's (test below)
    assert not hasattr(bb, "bn")
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in bb.modules())
    assert n_bn == 1 + 8 * 2
    # projection shortcuts: a bias-free 1x1 conv alone (no BN), where stride or width changes
    for layer, stride in ((bb.layer2, 2), (bb.layer3, 2), (bb.layer4, 2)):
        sc = layer[0].shortcut
        assert len(sc) == 1 and isinstance(sc[0], nn.Conv2d) and sc[0].kernel_size == (1, 1)
        assert sc[0].stride == (stride, stride) and sc[0].bias is None
        assert len(layer[1].shortcut) == 0
    assert len(bb.layer1[0].shortcut) == 0 and len(bb.layer1[1].shortcut) == 0
    # 64 px: layer1 strided, as the authors' input_size "64x64"
    assert build_backbone("preact_resnet18", in_channels=3, image_size=64).layer1[0].conv1.stride == (2, 2)


def test_preact_forward_is_the_authors():
    bb = build_backbone("preact_resnet18", in_channels=3, image_size=32).eval()
    with torch.no_grad():
        for m in bb.modules():        # non-trivial BN statistics and affine parameters
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)

    def block(b, t):                  # the shortcut is taken from relu(bn1(t)), also for identity
        pre = F.relu(b.bn1(t))
        sc = b.shortcut[0](pre) if len(b.shortcut) else pre
        return b.conv2(F.relu(b.bn2(b.conv1(pre)))) + sc

    with torch.no_grad():
        t = F.relu(bb.bn1(bb.conv1(x)))
        for layer in (bb.layer1, bb.layer2, bb.layer3, bb.layer4):
            for b in layer:
                t = block(b, t)
        fmap = bb.forward_map(x)
        torch.testing.assert_close(fmap, t)
        assert fmap.shape == (2, 512, 4, 4) and (fmap < 0).any()   # no final BN-ReLU
        torch.testing.assert_close(bb(x), F.avg_pool2d(t, 4).flatten(1))   # their avg_pool2d(out, 4)


# ----------------------------------------------------------------------------- the presets
@pytest.mark.parametrize("path", DATA_PRESETS, ids=os.path.basename)
def test_data_presets_load(path):
    alone = load_config(path)
    stacked = load_config([DEMO, path])
    for cfg in (alone, stacked):
        assert cfg.data.image_size in (28, 32, 64) and cfg.data.channels in (1, 3)
        assert 0.0 <= cfg.train.cutout_fill <= 1.0
        assert all(op in RANDAUG_OPS for op in cfg.train.randaug_list)


def test_authors_dataset_presets():
    want = {  # name: (size, channels, crop_pad, flip, cutout, fill, randaug ops)
        "fashion-mnist": (28, 1, 4, True, 16, 0.0, 0),
        "fer2013": (64, 1, 8, True, 16, 0.0, 0),
        "cifar10": (32, 3, 4, True, 10, 0.473, 1),
        "cifar100": (32, 3, 4, True, 10, 0.473, 1),
        "svhn": (32, 3, 4, False, 10, 0.473, 1),
        "gtsrb": (64, 3, 8, False, 19, 0.473, 1),
        "eurosat": (64, 3, 8, True, 19, 0.473, 1),
    }
    for name, (size, ch, pad, flip, cut, fill, ops) in want.items():
        cfg = load_config(os.path.join(ROOT, "configs", "data", f"{name}.yaml"))
        t = cfg.train
        got = (cfg.data.image_size, cfg.data.channels, t.crop_pad, t.flip, t.cutout, t.cutout_fill,
               t.randaug_ops)
        assert got == (size, ch, pad, flip, cut, pytest.approx(fill), ops), name
        assert list(t.randaug_list) == [], name


def test_fashion_mnist_preset_is_the_authors():
    cfg = load_config([DEMO, FMNIST])
    t = cfg.train
    assert t.flip is True and t.crop_pad == 4
    assert t.cutout == 16 and t.cutout_fill == 0.0 and t.randaug_ops == 0


def test_gpu_preset_is_the_authors_fmnist_run():
    cfg = load_config(GPU)
    fm = load_config(FMNIST)
    keys = ("crop_pad", "flip", "cutout", "cutout_fill", "randaug_ops", "randaug_list")
    assert {k: cfg.train[k] for k in keys} == {k: fm.train[k] for k in keys}   # inline = the preset
    assert (cfg.data.image_size, cfg.data.channels) == (fm.data.image_size, fm.data.channels)
    t, c = cfg.train, cfg.coreg
    assert (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay) == (101, 256, 0.01, 0.9, 5e-4)
    assert (t.lr_period, t.lr_min_ratio) == (800, pytest.approx(1e-3))
    assert (c.warm_up, c.feature_start, c.rampup_epochs, c.loss_history) == (50, 11, 16, 5)
    assert (c.sharpen_temperature, c.mixup_alpha, c.lambda_u, c.p_threshold) == (0.5, 4.0, 1.0, 0.5)
    assert (c.proto_weight, c.proto_temperature, c.proto_momentum) == (0.1, 0.3, 0.999)
    assert (c.cont_weight, c.cont_temperature, c.queue_size, c.moco_momentum) == (0.1, 0.07, 8192, 0.999)
    assert c.distribution_alignment and not c.divide_per_class and c.u_guess == "all"
    assert cfg.model.backbone == "preact_resnet18" and cfg.model.proj_dim == 128
    assert cfg.model.bf16 and cfg.model.channels_last and cfg.train.deterministic is False
    assert cfg.annotator.rule == "union_argmax" and len(cfg.annotator.templates) == 27


# ----------------------------------------------------------------------------- the keys reach the augmentation
def _strong(overrides, x, seed=3):
    cfg = load_config(None, overrides)
    method = Method(cfg, DataInfo(num_classes=10, in_channels=x.shape[1], image_size=x.shape[-1],
                                  flip=cfg.train.flip), "cpu", None)
    batch = SimpleNamespace(parts={"x": SimpleNamespace(x=x)}, sizes={"x": [len(x)]},
                            rng=SimpleNamespace(gens=[make_generator(seed)]))
    return method.strong(batch, "x")


PLAIN = ["train.crop_pad=0", "train.flip=false", "train.randaug_ops=0"]


@pytest.mark.parametrize("fill", [0.0, 0.25])
def test_cutout_fill_reaches_the_strong_view(fill):
    B, S = 64, 48
    out = _strong(PLAIN + ["train.cutout=16", f"train.cutout_fill={fill}"], torch.ones(B, 1, S, S))
    hole = out[:, 0] != 1.0
    assert torch.all(out[:, 0][hole] == fill)
    unclipped = 0
    for h in hole:
        rows, cols = h.any(1).nonzero().flatten(), h.any(0).nonzero().flatten()
        assert len(rows) and len(cols)
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        assert int(h.sum()) == (r1 - r0) * (c1 - c0)          # one axis-aligned rectangle
        assert r1 - r0 <= 16 and c1 - c0 <= 16
        if 0 < r0 and r1 < S and 0 < c0 and c1 < S:           # centre away from the border
            assert int(h.sum()) == 16 * 16
            unclipped += 1
    assert unclipped > B // 4


def test_randaug_list_reaches_the_strong_view():
    x = torch.ones(16, 3, 8, 8)
    # Solarize inverts every pixel >= 1 - m: a white image turns black whatever m is.
    only_solarize = _strong(PLAIN[:2] + ["train.randaug_ops=1", "train.cutout=0",
                                         "train.randaug_list=[Solarize]"], x)
    assert torch.all(only_solarize == 0)
    only_identity = _strong(PLAIN[:2] + ["train.randaug_ops=1", "train.cutout=0",
                                         "train.randaug_list=[Identity]"], x)
    assert torch.all(only_identity == 1)


def test_keys_are_passed_to_strong_augment(monkeypatch):
    seen = {}

    def spy(c, **kw):
        seen.update(kw)
        return c

    monkeypatch.setattr(method_base, "strong_augment", spy)
    _strong(["train.cutout_fill=0.125", "train.randaug_list=[Rotate,Equalize]"], torch.ones(2, 1, 8, 8))
    assert seen["cutout_fill"] == 0.125 and seen["ops"] == ("Rotate", "Equalize")
    _strong([], torch.ones(2, 1, 8, 8))
    assert seen["cutout_fill"] == 0.5 and seen["ops"] == RANDAUG_OPS


def test_defaults_leave_the_strong_view_unchanged():
    x = torch.rand(6, 3, 16, 16)
    got = _strong([], x, seed=11)
    ref = strong_augment(x, pad=4, flip=True, n_ops=1, cutout=None, generator=make_generator(11))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("override,key", [
    ("train.randaug_list=[Rotate,Twirl]", "train.randaug_list"),
    ("train.randaug_list=[Rotate,Rotate]", "train.randaug_list"),
    ("train.cutout_fill=1.5", "train.cutout_fill"),
    ("train.cutout_fill=-0.1", "train.cutout_fill"),
    ("train.randaug_ops=-1", "train.randaug_ops"),
    ("train.cutout=-2", "train.cutout"),
    ("train.crop_pad=-1", "train.crop_pad"),
])
def test_bad_augmentation_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as exc:
        load_config(DEMO, [override])
    assert key in str(exc.value)
    if "Twirl" in override:
        assert "Twirl" in str(exc.value)


def test_bad_op_in_a_yaml_fails_at_load(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  randaug_list: [Rotate, Posterise]\n")
    with pytest.raises(ConfigError, match=r"train\.randaug_list.*Posterise"):
        load_config([DEMO, str(p)])


def test_published_preset_is_the_authors_method():
    """configs/coreg-published.yaml sets back every Co-Reg default the project changed: with it,
    every coreg key equals the authors' run (configs/gpu.yaml) except the schedule, which gpu.yaml
    sizes for 100 epochs of 60,000 images."""
    from omegaconf import OmegaConf

    schedule = {"warm_up", "feature_start", "queue_size", "rampup_epochs"}
    published = load_config("configs/coreg-published.yaml").coreg
    authors = OmegaConf.load("configs/gpu.yaml").coreg
    defaults = load_config(None).coreg
    changed = []
    for key in published:
        if key in schedule:
            continue
        want = authors[key] if key in authors else defaults[key]
        assert published[key] == want, key
        if defaults[key] != want:
            changed.append(key)
    # the project's robustness defaults differ from the published method (README)
    assert {"divide_per_class", "warmup_view", "warmup_batch_factor", "pce_weight",
            "mixup"} <= set(changed)
