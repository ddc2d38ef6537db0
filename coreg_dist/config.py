"""One typed config tree for every stage (omegaconf structured configs).

    cfg = load_config("configs/demo.yaml", ["train.epochs=3", "coreg.mixup=false"])

Each component owns one dataclass; `Config` composes them, and every registered method adds
its own section (`coreg`, ...) from the dataclass it registered with (coreg_dist/methods/):
adding a method edits no list here. YAML presets are merged over the defaults in the order
given (`--config a.yaml --config b.yaml`), then `key=value` overrides over that. Because the
schema is structured, an unknown key, a value of the wrong type or a missing
required value (`???`) stops the run with a `ConfigError` that names the key.
The resolved tree is saved in every run directory (`save_config`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Sequence, Union

from omegaconf import MISSING, OmegaConf, open_dict
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
    threads: int = 0                  # torch intra-op threads on CPU (shared by the ranks of one
                                      # machine); 0 = torch's default


@dataclass
class DataConfig:
    root: str = "data/fmnist"         # dataset directory: manifest.json, images/, columns/
    source: str = "fashion_mnist"     # fashion_mnist | folder | wds
    source_path: str = "/usr/share/datasets/fashion-mnist"
    name: str = ""                    # dataset name in the manifest; "" = from the source
    classes: List[str] = field(default_factory=list)  # class names, for sources without labels (wds)
    shard_size: int = 5000            # samples per image shard (wds sources: one shard per source shard)
    annotator_split: int = -1         # reserved, disjoint split for building the embedded annotator;
                                      # -1 = 1000 (0 for a wds source: it has no labels)
    train_pool: int = 0               # size of the training pool; 0 = everything left
    test_size: int = 0                # 0 = the source's own test set (or 10% of a folder source)
    image_format: str = "png"         # encoding for sources that give raw pixels (IDX)
    # --- ingest (coreg_dist/data/ingest.py) ---
    ingest_workers: int = 0           # processes that read, verify and write shards; 0 = in-process
    keep_broken: bool = False         # keep undecodable images in the shards (named and counted either way)
    allow_empty_classes: bool = False # a class folder without a decodable image: warn instead of stopping
    wds_shard_in_key: bool = False    # wds keys `<source shard>_<__key__>`: for sources whose keys
                                      # repeat across shards (img2dataset's never do)
    # --- training-time reading (coreg_dist/data/stream.py) ---
    shard_url: str = ""               # where shards are opened: "" = files under data.root; else a template
                                      # with {path} (relative to the dataset root) that webdataset's gopen
                                      # opens, e.g. "pipe:aws s3 cp s3://bucket/fmnist/{path} -" or
                                      # "https://host/fmnist/{path}"; manifest and column.json stay in data.root
    image_size: int = 0               # training resolution (size x size); 0 = the first training image's
    channels: int = 0                 # 1 or 3; 0 = from the first training image's mode
    resize: str = "center_crop"       # center_crop | stretch | pad: how any image size becomes image_size
    interpolation: str = "bilinear"   # nearest | bilinear | bicubic | lanczos | box
    streams: int = 0                  # logical data streams; the sample order of an epoch depends on this
                                      # (and the seed), not on the number of ranks: 0 = world x max(1, workers)
    num_workers: int = 0              # DataLoader worker processes per rank (decode in parallel)
    shuffle_buffer: int = 1000        # samples (as bytes) each stream's shuffle buffer holds
    prefetch: int = 4                 # chunks each worker prepares ahead


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
    overwrite: bool = False           # relabel stale shards (content hash differs: other model,
                                      # templates, rule, input); without it a rerun refuses them.
                                      # Shards whose hash matches are always kept
    redo_errors: bool = False         # relabel the error records (undecodable images, labeler
                                      # failures) of done shards; the other records are kept


@dataclass
class SyntheticConfig:
    """Synthetic NPLL (the q / eta flip protocol) for controlled studies."""
    column: str = "synthetic"
    q: float = 0.03                   # each wrong label joins the set with probability q
    eta: float = 0.2                  # then the true label is swapped out with probability eta
    seed: int = 0


# Several phrasings of the question, each one annotator (as CLIP's templates are).
VLM_PROMPTS = [
    "What is in this image? Answer with one of the given class names.",
    "Which of these best describes the main object in the photo?",
    "Name the category of this image.",
]


@dataclass
class VllmServerConfig:
    """A vLLM OpenAI-compatible server started by the annotation task itself (one per SLURM
    task/node, annotate/vllm_server.py): started, waited for (GET /health), stopped at the end."""
    launch: bool = False              # start a server for this run; else use vlm.urls as they are
    python: str = "python"            # the interpreter that has vllm installed (may be a venv's)
    module: str = "vllm.entrypoints.openai.api_server"  # what `python -m` runs (tests: a fake)
    model: str = ""                   # weights folder or hub name served (required with launch)
    host: str = "127.0.0.1"
    port: int = 8000
    gpus: int = 1                     # --tensor-parallel-size (0 on a CPU build)
    dtype: str = "auto"
    max_model_len: int = 4096
    extra_args: List[str] = field(default_factory=list)   # appended to the server's command line
    startup_timeout_s: int = 900      # model download/compile included
    log: str = ""                     # server log; "" = RUN/vllm-server-<task>.log


@dataclass
class VlmConfig:
    """A vision chat model (LLaVA, ...) served by vLLM's OpenAI-compatible API as annotators:
    each prompt is one annotator; answers constrained to the class names (structured_outputs)."""
    column: str = "llava"             # the label column written
    model: str = ""                   # the served model name (as /v1/models lists it)
    urls: List[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    api_key: str = "EMPTY"
    prompts: List[str] = field(default_factory=lambda: list(VLM_PROMPTS))
    mode: str = "all"                 # all: choose among every class | topk: among the top-k of
                                      # vlm.candidates_column ("CLIP proposes, the VLM chooses")
    candidates_column: str = "clip"   # mode=topk: the column whose candidates/scores give the choices
    topk: int = 5
    image_size: int = 336             # longest side sent (resized, never enlarged)
    image_format: str = "png"         # png | jpeg (base64 data URL)
    temperature: float = 0.0
    max_tokens: int = 0               # 0 = not sent (a too-small limit truncates a choice)
    logprobs: bool = True             # the chosen answer's probability, stored as its score
    max_concurrency: int = 64         # requests in flight per server URL
    timeout_s: float = 60.0           # per request
    max_retries: int = 5              # on timeouts, connection errors, 429 and 5xx
    backoff_base_s: float = 0.5       # exponential backoff with full jitter
    backoff_max_s: float = 30.0
    batch_size: int = 256             # images per write batch (requests flow across batches)
    splits: List[str] = field(default_factory=lambda: ["train", "test"])
    server: VllmServerConfig = field(default_factory=VllmServerConfig)


@dataclass
class LabelImportConfig:
    """Candidate sets from a file: `coreg-annotate import` (annotate/importer.py; the section is
    not called `import`, a Python keyword)."""
    path: str = ""                    # JSONL, CSV/TSV or parquet, one row per sample (required)
    column: str = "imported"          # the label column written
    format: str = "auto"              # auto (from the extension) | jsonl | csv | parquet
    match: str = "key"                # what identifies a row's sample: key (__key__) | path | url
                                      # (the image sample's json) | json.FIELD (any json field)
    key_column: str = ""              # the file's identifier column; "" = named like the match
    labels_column: str = "candidates" # the file's candidate-set column (= votes_column: their union)
    votes_column: str = ""            # optional: one class per annotator, stored as votes.npy
    labels_as: str = "auto"           # auto (ints are indices, strings names) | names | indices
    list_separator: str = "|"         # CSV: "Coat|Shirt" (a cell starting with "[" is JSON)
    csv_delimiter: str = ""           # "" = "," (tab for .tsv)
    strip_prefix: str = ""            # removed from the file's identifiers before matching
    duplicates: str = "error"         # error (name the rows) | union (join their sets)
    on_bad_row: str = "error"         # error (stop, naming file and rows) | error_record
    splits: List[str] = field(default_factory=lambda: ["train"])


@dataclass
class MergeConfig:
    """Combine candidate columns: `coreg-annotate merge` (annotate/merge.py)."""
    column: str = "merged"            # the label column written
    inputs: List[str] = field(default_factory=list)   # the columns merged (required)
    rule: str = "union"               # union | intersection | vote
    min_votes: int = 2                # vote: a class needs this many annotators' votes
    vote_fraction: float = 0.0        # vote: > 0 = this fraction of the sample's annotators instead
    fallback: str = "union"           # the rule gives no class: union | first (input) | error
    splits: List[str] = field(default_factory=lambda: ["train"])


@dataclass
class ModelConfig:
    backbone: str = "small_cnn"       # small_cnn | preact_resnet18
    proj_dim: int = 128
    channels_last: bool = False
    bf16: bool = False                # bf16 autocast for forward passes
    sync_bn: bool = False             # BatchNorm over the global batch in multi-rank runs (world-size
                                      # invariant training; an all-reduce per BN layer and forward)


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
    max_train_samples: int = 0        # 0 = the whole pool; else keep each sample with probability
                                      # max/N by a hash of (seed, key): about this many, world-size invariant
    crop_pad: int = 4                 # weak augmentation: random crop with this much padding
    flip: bool = True                 # horizontal flips (off for classes whose mirror image is another class)
    cutout: int = -1                  # strong augmentation: Cutout side; -1 = image_size // 2, 0 = off
    cutout_fill: float = 0.5          # Cutout's fill, a pixel value in [0, 1] before the network's
                                      # normalisation (0.5 = mid grey; 0 = black, as the authors'
                                      # Cutout for Fashion-MNIST / FER2013)
    randaug_ops: int = 1              # strong augmentation: RandAugment ops per image (0 = none)
    randaug_list: List[str] = field(default_factory=list)  # ops RandAugment draws from (names in
                                      # coreg_dist.augment.RANDAUG_OPS, drawn uniformly in the order
                                      # given); empty = all 14, in RANDAUG_OPS order
    eval_batch_size: int = 1024       # per-rank batch of the sweeps (co-divide, evaluation)
    # The class prior predictions are aligned to (coreg_dist/output_prior.py): a per-class logit
    # bias, fitted before each evaluation so that the mean prediction on unlabelled training images
    # is this prior. none (the networks' own argmax; the default: a collection's class balance is
    # not known) | uniform (balanced classes, the prior Co-Reg's DA assumes; the Fashion-MNIST
    # presets) | candidates (the candidate sets' class balance). Every method gets it; the metrics
    # keep the accuracy without it (raw_test_acc_*). Measured (README, "Output alignment").
    output_prior: str = "none"
    output_prior_samples: int = 10000  # images it is fitted on: the first training shards, in name
                                      # order, that hold this many (the same set at any world size);
                                      # their logits stay on the device while it fits: this / ranks
                                      # x classes x 3 outputs floats (1e4 x 21k classes: 2.5 GB / ranks)
    grad_clip: float = 0.0            # clip each network's gradient norm to this (0 = off)
    checkpoint_every: int = 0         # also checkpoint every this many optimizer steps (0 = per epoch only)
    keep_checkpoints: int = 2         # how many complete checkpoints to keep
    resume: str = ""                  # "" | latest | path to a checkpoint
    log_every: int = 20               # steps between progress-bar postfix updates
    deterministic: bool = True
    stop_after_steps: int = 0         # testing aid: stop (as if killed) after this many global steps
    few_shot: int = 0                 # [D] clean labels per class (from the image shards' cls): S = {label},
                                      # and Co-Reg keeps them in P with w = 1
    log_keys: bool = False            # testing aid: write the keys of every step to RUN/keys/rank_R.txt


@dataclass
class DistConfig:
    """Multi-process runs (torchrun, deepspeed, accelerate launch and srun wrappers set RANK /
    WORLD_SIZE / LOCAL_RANK; nothing to set for one process)."""
    backend: str = "auto"             # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_s: int = 600              # a collective that waits longer than this fails the run
                                      # (a dead rank makes the others exit after at most this)
    engine: str = "auto"              # auto (local / ddp; accelerate under `accelerate launch`)
                                      # | local | ddp | deepspeed | accelerate
    deepspeed_config: str = "auto"    # JSON for dist.engine=deepspeed (configs/deepspeed/);
                                      # auto: zero2-bf16 on CUDA, zero2-fp32 on CPU


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embedded: EmbeddedClipConfig = field(default_factory=EmbeddedClipConfig)
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    vlm: VlmConfig = field(default_factory=VlmConfig)
    label_import: LabelImportConfig = field(default_factory=LabelImportConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)


class ConfigError(ValueError):
    """A config problem, with the offending key and file in the message."""


def _explain(exc: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    prefix = f"config key '{key}'" if key else "config"
    return ConfigError(f"{prefix} ({where}): {msg}")


def schema():
    """The structured defaults: the fixed sections plus one section per registered method."""
    from coreg_dist.methods.registry import method_config_sections

    cfg = OmegaConf.structured(Config)
    with open_dict(cfg):
        for name, section in method_config_sections().items():
            cfg[name] = OmegaConf.structured(section)
    return cfg


def load_config(path: Union[None, str, Sequence[str]] = None, overrides: Sequence[str] = (),
                required: Sequence[str] = ()) -> Config:
    """Defaults <- YAML preset(s) <- `key=value` overrides, validated against the schema.

    `path`: one YAML file or several, merged in order. `required`: dotted keys this command
    cannot run without (empty string or list = missing), on top of any `???` in the schema.
    """
    cfg = schema()
    paths = [path] if isinstance(path, str) else list(path or [])
    for p in paths:
        if not os.path.isfile(p):
            raise ConfigError(f"config file not found: {p}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(p))
        except OmegaConfBaseException as exc:
            raise _explain(exc, p) from None
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
    validate_augmentation(cfg)
    return cfg  # type: ignore[return-value]


def validate_augmentation(cfg) -> None:
    """The `train` augmentation keys, checked before any data is read: a `ConfigError` naming the
    key. `load_config` calls it; call it too on a config built or edited in code."""
    from coreg_dist.augment import RANDAUG_OPS  # local: keeps `import coreg_dist.config` torch-free

    t = cfg.train
    if t.crop_pad < 0:
        raise ConfigError(f"config key 'train.crop_pad' is {t.crop_pad}: must be >= 0")
    if t.cutout < -1:
        raise ConfigError(f"config key 'train.cutout' is {t.cutout}: must be -1 (image_size // 2), "
                          f"0 (off) or a side in pixels")
    if not 0.0 <= float(t.cutout_fill) <= 1.0:
        raise ConfigError(f"config key 'train.cutout_fill' is {t.cutout_fill}: must be a pixel value "
                          f"in [0, 1] (before normalisation)")
    if t.randaug_ops < 0:
        raise ConfigError(f"config key 'train.randaug_ops' is {t.randaug_ops}: must be >= 0")
    ops = list(t.randaug_list)
    unknown = [o for o in ops if o not in RANDAUG_OPS]
    if unknown:
        raise ConfigError(f"config key 'train.randaug_list' has unknown RandAugment op(s) "
                          f"{unknown}; known: {list(RANDAUG_OPS)}")
    dup = sorted({o for o in ops if ops.count(o) > 1})
    if dup:
        raise ConfigError(f"config key 'train.randaug_list' names {dup} more than once")


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
           "CLIP_TEMPLATES_27", "validate_augmentation"]
