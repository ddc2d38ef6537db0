"""CLIP as d annotators: per-template zero-shot probabilities for a batch of images.

    scorer = ClipScorer("runs/demo/embedded_clip", class_names, CLIP_TEMPLATES_27)
    probs = scorer.score(pil_images)          # (B, d, C) float32, rows sum to 1

For template t and class j the prompt is `t.format(class_name_j)`; the image is scored with
p_t = softmax(logit_scale * normalize(img_feat) . normalize(text_feat(t, j))) over j, with the
paper's fixed scale 100, not the model's learned `logit_scale` [P][C].

The model is anything `CLIPModel.from_pretrained` accepts: a hub name (with the hub cache when
offline) or a local directory in Hugging Face format, e.g. the embedded annotator that
`annotate.embedded_clip.train_embedded_clip` writes. Preprocessing is always the checkpoint's own
processor (resize, crop, normalisation), so a real checkpoint's pipeline is honoured.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


# Small files of a local checkpoint that change what it computes besides the weights.
CHECKPOINT_FILES = ("config.json", "preprocessor_config.json", "processor_config.json",
                    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json", "added_tokens.json")


class ClipLoadError(OSError):
    """A CLIP checkpoint (model or processor) could not be loaded; the message names the path."""


def _features(out) -> torch.Tensor:
    """`get_*_features` returns a tensor (transformers 4.x) or an output whose pooler is projected (5.x)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)):
        pooled = out[1] if len(out) > 1 else out[0]
    return pooled


def _load_processor(model: str):
    """CLIPProcessor when it loads; else the tokenizer and an image processor loaded separately.

    Without torchvision the fast (torchvision) image processor is unavailable; transformers falls
    back to `CLIPImageProcessorPil`, and so does the second path here explicitly.
    """
    from transformers import CLIPProcessor

    first_err: Optional[BaseException] = None
    try:
        proc = CLIPProcessor.from_pretrained(model)
        return proc.tokenizer, proc.image_processor
    except Exception as exc:  # noqa: BLE001 - fall back, report both errors if that fails too
        first_err = exc
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        try:
            from transformers import AutoImageProcessor

            img = AutoImageProcessor.from_pretrained(model)
        except Exception:  # noqa: BLE001
            from transformers import CLIPImageProcessorPil

            img = CLIPImageProcessorPil.from_pretrained(model)
        return tok, img
    except Exception as exc:  # noqa: BLE001
        raise ClipLoadError(
            f"cannot load the CLIP processor (tokenizer + image processor) from '{model}': "
            f"{type(first_err).__name__}: {first_err}; then {type(exc).__name__}: {exc}") from exc


def _looks_local(model: str) -> bool:
    """A filesystem path rather than a hub name ("org/name")."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") > 1
            or os.path.exists(model))


def weights_sha256(folder: str) -> Optional[str]:
    """sha256 over the weight files of a local checkpoint (sorted by name); None when there are none."""
    names = sorted(n for n in os.listdir(folder)
                   if n in WEIGHT_FILES or (n.endswith(".safetensors") or n.endswith(".bin")))
    if not names:
        return None
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode())
        with open(os.path.join(folder, n), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_files_sha256(folder: str) -> Optional[str]:
    """sha256 over the config, tokenizer and processor files of a local checkpoint (names +
    bytes, sorted); None when there are none."""
    names = sorted(n for n in CHECKPOINT_FILES if os.path.isfile(os.path.join(folder, n)))
    if not names:
        return None
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0")
        with open(os.path.join(folder, n), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()


def _preprocessing_sha256(image_processor) -> Optional[str]:
    """sha256 of the image processor's settings (resize, crop, mean/std, resample, ...)."""
    try:
        d = image_processor.to_dict()
    except Exception:  # noqa: BLE001 - a processor without to_dict: not hashed
        return None
    d = {k: v for k, v in d.items() if not k.startswith("_") and k != "processor_class"}
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ClipScorer:
    """Per-template zero-shot probabilities of a CLIP model (eval mode, no grad)."""

    def __init__(self, model: str, class_names: List[str], templates: List[str], device: str = "cpu",
                 logit_scale: float = 100.0, batch_size: int = 256):
        from transformers import CLIPModel

        model = os.fspath(model)
        path = os.path.expanduser(model)
        if _looks_local(model) and not os.path.isdir(path):
            raise ClipLoadError(f"CLIP model directory not found: '{model}'")
        try:
            net = CLIPModel.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001
            raise ClipLoadError(f"cannot load a CLIPModel from '{model}': {type(exc).__name__}: {exc}") from exc
        tokenizer, image_processor = _load_processor(path)
        self._setup(net, tokenizer, image_processor, class_names, templates, device=device,
                    logit_scale=logit_scale, batch_size=batch_size, name=model,
                    local_dir=path if os.path.isdir(path) else None)

    @classmethod
    def from_loaded(cls, model, tokenizer, image_processor, class_names: List[str], templates: List[str],
                    device: str = "cpu", logit_scale: float = 100.0, batch_size: int = 256,
                    name: str = "<in-memory>") -> "ClipScorer":
        """Wrap an already loaded CLIPModel + processor parts (used during training for model selection).

        The model is put in eval mode; the caller restores train mode if it keeps training.
        """
        self = cls.__new__(cls)
        self._setup(model, tokenizer, image_processor, class_names, templates, device=device,
                    logit_scale=logit_scale, batch_size=batch_size, name=name, local_dir=None)
        return self

    # ------------------------------------------------------------------ setup
    def _setup(self, net, tokenizer, image_processor, class_names, templates, *, device, logit_scale,
               batch_size, name, local_dir):
        if not class_names:
            raise ValueError("ClipScorer needs at least one class name")
        if not templates:
            raise ValueError("ClipScorer needs at least one prompt template")
        self.model_name = name
        self.local_dir = local_dir
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.device = torch.device(device)
        self.logit_scale = float(logit_scale)
        self.batch_size = int(batch_size)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model = net.to(self.device).eval()
        self._weights_hash: Optional[str] = None
        self.prompts = [t.format(c) for t in self.templates for c in self.class_names]
        self.text_features = self._encode_text(self.prompts).reshape(
            len(self.templates), len(self.class_names), -1)                     # (d, C, D), unit norm

    @property
    def num_templates(self) -> int:
        return len(self.templates)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _max_text_len(self) -> int:
        n = int(getattr(self.model.config.text_config, "max_position_embeddings", 77))
        m = getattr(self.tokenizer, "model_max_length", None)
        return min(n, int(m)) if isinstance(m, int) and 0 < m < 1_000_000 else n

    @torch.no_grad()
    def _encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(list(prompts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self._max_text_len(), return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out.append(_features(self.model.get_text_features(**enc)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    # ------------------------------------------------------------------ scoring
    def pixel_values(self, images) -> torch.Tensor:
        """The checkpoint's own preprocessing of PIL images (converted to RGB first)."""
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def score_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        """(B, d, C) probabilities from already preprocessed pixel values."""
        feats = _features(self.model.get_image_features(pixel_values=pixel_values.to(self.device))).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        logits = self.logit_scale * torch.einsum("bk,tck->btc", feats, self.text_features)
        return torch.softmax(logits, dim=-1).cpu().numpy().astype(np.float32, copy=False)

    def score(self, images) -> np.ndarray:
        """Per-template class probabilities, (B, d, C) float32; images are PIL ('L', 'RGB', ...)."""
        images = list(images)
        if not images:
            return np.zeros((0, self.num_templates, self.num_classes), dtype=np.float32)
        out = [self.score_pixels(self.pixel_values(images[i:i + self.batch_size]))
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out, axis=0)

    # ------------------------------------------------------------------ provenance
    def provenance(self) -> Dict[str, object]:
        cfg = self.model.config
        vis = cfg.vision_config
        crop = getattr(self.image_processor, "crop_size", None)
        prov: Dict[str, object] = {
            "model": self.model_name,
            "model_class": type(self.model).__name__,
            "image_processor_class": type(self.image_processor).__name__,
            "tokenizer_class": type(self.tokenizer).__name__,
            "image_size": int(vis.image_size),
            "patch_size": int(vis.patch_size),
            "processor_crop_size": dict(crop) if crop else None,
            "projection_dim": int(cfg.projection_dim),
            "num_templates": self.num_templates,
            "num_classes": self.num_classes,
            "logit_scale": self.logit_scale,
            "revision": getattr(cfg, "_commit_hash", None),
            "preprocessing_sha256": _preprocessing_sha256(self.image_processor),
        }
        if self.local_dir:
            prov["path"] = os.path.abspath(self.local_dir)
            if self._weights_hash is None:
                self._weights_hash = weights_sha256(self.local_dir)
            prov["weights_sha256"] = self._weights_hash
            prov["checkpoint_files_sha256"] = checkpoint_files_sha256(self.local_dir)
        return prov


__all__ = ["ClipScorer", "ClipLoadError", "checkpoint_files_sha256", "weights_sha256"]
