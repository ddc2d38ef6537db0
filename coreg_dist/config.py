"""One typed config tree for every stage (omegaconf structured configs).

    cfg = load_config("configs/demo.yaml", ["train.epochs=3", "coreg.mixup=false"])

Each component owns one dataclass; `Config` composes them. A YAML preset is merged
over the dataclass defaults, then `key=value` overrides over that. Because the
schema is structured, an unknown key, a value of the wrong type or a missing
required value (`???`) stops the run with a `ConfigError` that names the key.
The resolved tree is saved in every run directory (`save_config`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The 27 prompt templates of the authors' code (no trailing period); each one is an annotator.
CLIP_TEMPLATES_27 = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]


@dataclass
class RunConfig:
    out_dir: str = "runs/default"     # run directory: config, logs, checkpoints, reports
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    threads: int = 0                  # torch intra-op threads on CPU; 0 = torch's default


@dataclass
class DataConfig:
    root: str = "data/fmnist"         # dataset directory: manifest.json, images/, columns/
    source: str = "fashion_mnist"     # fashion_mnist | folder | wds
    source_path: str = "/usr/share/datasets/fashion-mnist"
    name: str = ""                    # dataset name in the manifest; "" = from the source
    classes: List[str] = field(default_factory=list)  # class names, for sources without labels (wds)
    shard_size: int = 5000            # samples per image shard
    annotator_split: int = 1000       # reserved, disjoint split for building the embedded annotator
    train_pool: int = 0               # size of the training pool; 0 = everything left
    test_size: int = 0                # 0 = the source's own test set (or 10% of a folder/wds source)
    image_format: str = "png"         # encoding for sources that give raw pixels (IDX)


@dataclass
class EmbeddedClipConfig:
    """The tiny CLIP-architecture model the project trains itself when no real CLIP is at hand."""
    out_dir: str = "runs/demo/embedded_clip"
    image_size: int = 28
    patch_size: int = 7
    vision_width: int = 64
    vision_layers: int = 2
    text_width: int = 64
    text_layers: int = 2
    projection_dim: int = 64
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    augment_strength: float = 0.15    # template-specific augmentations ("dark photo" -> darkened, ...); 0 = off
    val_fraction: float = 0.3         # part of the reserved split that selects the checkpoint
    # The regime to aim at: the paper's Fashion-MNIST row for CLIP ViT-B/32.
    target_zero_shot_acc: float = 0.6146
    target_avg_candidates: float = 1.58
    target_eta: float = 0.2235


@dataclass
class AnnotatorConfig:
    model: str = "runs/demo/embedded_clip"  # HF model name or a local CLIPModel directory
    column: str = "clip"              # name of the label column written beside the image shards
    templates: List[str] = field(default_factory=lambda: list(CLIP_TEMPLATES_27))
    rule: str = "union_argmax"        # union_argmax | topk | ratio | soft
    topk: int = 5                     # for rule=topk and rule=ratio (candidates among the top k)
    ratio: float = 0.5                # rule=ratio: keep j if p_j >= ratio * p_top1
    soft_threshold: float = 0.05      # rule=soft: candidate set = classes whose averaged prob >= this
    store_topk: int = 10              # per-template probabilities stored (top few); >= C keeps them all
    logit_scale: float = 100.0        # CLIP's fixed zero-shot scale
    batch_size: int = 256
    splits: List[str] = field(default_factory=lambda: ["train", "test"])
    overwrite: bool = False           # re-annotate shards that already have their commit marker


@dataclass
class SyntheticConfig:
    """Synthetic NPLL (the q / eta flip protocol) for controlled studies."""
    column: str = "synthetic"
    q: float = 0.03                   # each wrong label joins the set with probability q
    eta: float = 0.2                  # then the true label is swapped out with probability eta
    seed: int = 0


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"       # small_cnn | preact_resnet18
    proj_dim: int = 128
    channels_last: bool = False
    bf16: bool = False                # bf16 autocast for forward passes


@dataclass
class CoRegConfig:
    """Every Co-Reg component, switchable for the paper's ablations. Defaults follow the authors' code."""
    warm_up: int = 10                 # epochs of partial-CE warm-up
    warmup_neg_entropy: bool = True
    # co-divide
    co_divide: bool = True            # false: every sample is P with w = 1
    distribution_alignment: bool = True
    minmax_normalize: bool = True
    loss_history: int = 5             # epochs of division loss averaged
    gmm_max_iter: int = 10
    gmm_tol: float = 1e-2
    gmm_reg_covar: float = 5e-4
    p_threshold: float = 0.5
    cross_use: bool = True            # false: each network trains on its own split
    # co-pseudo-labels
    co_pseudo_label: bool = True      # false: targets from the network's own predictions only
    refine_labeled: bool = True
    co_guess_unlabeled: bool = True
    sharpen_temperature: float = 0.5
    use_unlabeled: bool = True        # false: discard U (ablation)
    # label space
    mixup: bool = True
    mixup_alpha: float = 4.0
    lambda_u: float = 1.0
    rampup_epochs: int = 16
    # feature space
    feature_start: int = 10           # feature terms back-propagated after warm_up + this many epochs
    prototypes: bool = True
    proto_weight: float = 0.1
    proto_temperature: float = 0.3
    proto_momentum: float = 0.999
    contrastive: bool = True
    noisy_contrastive: bool = True    # false: plain SupCon masks (ablation)
    cont_weight: float = 0.1
    cont_temperature: float = 0.07
    queue_size: int = 8192
    moco_momentum: float = 0.999
    ensemble: bool = True             # predict with logits_1 + logits_2
    few_shot: int = 0                 # clean labels per class, forced into P with w = 1


@dataclass
class TrainConfig:
    method: str = "coreg"             # a name in the method registry
    column: str = "clip"              # which label column supplies the candidate sets
    epochs: int = 100
    batch_size: int = 256             # labeled batch (and unlabeled batch); warm-up uses 2x
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_period: int = 800              # cosine period in epochs ([C] 800 whatever the run); 0 = the run length
    lr_min_ratio: float = 1e-3
    max_train_samples: int = 0        # 0 = the whole training pool
    crop_pad: int = 4                 # weak augmentation: random crop with this much padding
    cutout: int = -1                  # strong augmentation: Cutout side; -1 = image_size // 2, 0 = off
    randaug_ops: int = 1              # strong augmentation: RandAugment ops per image
    eval_batch_size: int = 1024
    resume: str = ""                  # "" | latest | path to a checkpoint
    log_every: int = 20               # steps between progress-bar postfix updates
    deterministic: bool = True
    stop_after_steps: int = 0         # testing aid: stop (as if killed) after this many global steps


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embedded: EmbeddedClipConfig = field(default_factory=EmbeddedClipConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    coreg: CoRegConfig = field(default_factory=CoRegConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """A config problem, with the offending key and file in the message."""


def _explain(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    prefix = f"config key '{key}'" if key else "config"
    return ConfigError(f"{prefix} ({where}): {msg}")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (),
                required: Sequence[str] = ()) -> Config:
    """Defaults <- YAML preset <- `key=value` overrides, validated against the schema.

    `required`: dotted keys this command cannot run without (empty string or list = missing),
    on top of any `???` in the schema.
    """
    cfg = OmegaConf.structured(Config)
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise _explain(exc, path) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise _explain(exc, "command line") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    missing += [k for k in required if OmegaConf.select(cfg, k, default=None) in (None, "", [])]
    if missing:
        raise ConfigError(f"config key '{missing[0]}' is required but has no value"
                          + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""))
    return cfg  # type: ignore[return-value]


def save_config(cfg: Config, run_dir: str, name: str = "config.yaml") -> str:
    """Write the resolved config into the run directory (atomically)."""
    from coreg_dist.io import atomic_write_text

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, name)
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


__all__ = ["Config", "ConfigError", "load_config", "save_config", "to_dict", "MISSING",
           "CLIP_TEMPLATES_27"]
