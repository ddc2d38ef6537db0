"""The embedded default annotator: a tiny CLIP-architecture model the project trains itself.

When no real CLIP checkpoint is at hand (no downloads, no weights), the project builds one on a
small reserved split of the dataset and saves it in exactly the Hugging Face format of a real
checkpoint (`CLIPModel` + `CLIPProcessor`), so the annotation stage loads it through the same code
path (`annotate.clip_scorer.ClipScorer`).

    summary = train_embedded_clip(images, labels, class_names, CLIP_TEMPLATES_27, cfg.embedded,
                                  out_dir=cfg.embedded.out_dir, seed=cfg.run.seed)

Design
- Tokenizer: a CLIP-style byte-level BPE built offline: the 256 byte symbols and their `</w>`
  end-of-word variants (as in OpenAI's vocabulary), plus merges that build every word of the
  templates and class names, then `<|startoftext|>` / `<|endoftext|>`. It is a plain
  `CLIPTokenizer` (normaliser and pre-tokeniser of the real one), so any text still tokenises
  (unknown words fall back to byte symbols) and it round-trips through `save_pretrained`.
- Image processor: `CLIPImageProcessorPil` (no torchvision), resize/center-crop to
  `cfg.image_size`, mean/std measured on the reserved split. Training images go through the
  processor once; augmentations act on its output mapped back to [0, 1] and are re-normalised
  with the same mean/std, so un-augmented training inputs are exactly what annotation sees.
- Model: `CLIPModel` from a tiny `CLIPConfig` (sizes from `cfg`), trained from scratch with
  CLIP's own contrastive loss on (image, caption) pairs; caption = a random template filled
  with the image's class name.
- Regime levers (the paper's Fashion-MNIST row for CLIP ViT-B/32 is the target: zero-shot acc
  61.5%, 1.58 candidates, eta 22.4%): a small reserved split, few epochs, template-specific
  augmentations that give templates a visual meaning ("dark photo" -> darkened image, "small"
  -> shrunk, "rendition" -> posterised/blurred, ...) so the 27 annotators disagree the way
  real prompts do, and checkpoint selection: after every epoch the ClipScorer statistics on a
  validation part of the split are measured and the epoch closest to the targets is kept.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from annotate.clip_scorer import ClipScorer, weights_sha256
from coreg_dist.labels import candidate_stats, union_argmax, zero_shot_stats

FORMAT = "coreg_dist.embedded_clip/1"
META_FILE = "embedded_annotator.json"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# tokenizer
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode symbol table."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_clip_tokenizer(texts: Sequence[str], model_max_length: int = 77):
    """A CLIPTokenizer whose BPE merges spell every word of `texts` as one token.

    Vocabulary layout as in OpenAI CLIP: 256 byte symbols, the same with `</w>`, then one token per
    merge, then <|startoftext|>, <|endoftext|>. Words are found with the CLIPTokenizer's own
    normaliser and pre-tokeniser, so training and annotation tokenise identically.
    """
    from transformers import CLIPTokenizer

    base = list(bytes_to_unicode().values())
    vocab: List[str] = base + [c + "</w>" for c in base]
    probe = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab + [BOS, EOS])}, merges=[])
    backend = probe.backend_tokenizer
    words: List[str] = []
    for text in texts:
        for w, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            if w not in words:
                words.append(w)
    known = set(vocab)
    merges: List[tuple] = []
    for w in words:
        symbols = list(w)
        symbols[-1] += "</w>"
        cur = symbols[0]
        for s in symbols[1:]:
            new = cur + s
            if new not in known:
                merges.append((cur, s))
                vocab.append(new)
                known.add(new)
            cur = new
    vocab += [BOS, EOS]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                         model_max_length=model_max_length)


def write_bpe_files(tokenizer, folder: str) -> None:
    """Also write vocab.json / merges.txt (the slow-tokenizer files older transformers read)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in model["merges"]:
            f.write((" ".join(m) if isinstance(m, (list, tuple)) else m) + "\n")


# ---------------------------------------------------------------------------------------------
# image processor and model
def build_image_processor(image_size: int, mean: Sequence[float], std: Sequence[float]):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": int(image_size)},
                                 crop_size={"height": int(image_size), "width": int(image_size)},
                                 image_mean=[float(m) for m in mean], image_std=[float(s) for s in std],
                                 resample=3, do_convert_rgb=True)


def _heads(width: int) -> int:
    for h in (8, 4, 2):
        if width % h == 0 and width // h >= 16:
            return h
    return 1


def build_clip_model(cfg, tokenizer, max_text_len: int = 77):
    from transformers import CLIPConfig, CLIPModel

    vocab = tokenizer.get_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
                num_hidden_layers=cfg.text_layers, num_attention_heads=_heads(cfg.text_width),
                max_position_embeddings=max_text_len, projection_dim=cfg.projection_dim,
                bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS])
    vision = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3,
                  hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                  num_hidden_layers=cfg.vision_layers, num_attention_heads=_heads(cfg.vision_width),
                  projection_dim=cfg.projection_dim)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)
    return CLIPModel(config)


# ---------------------------------------------------------------------------------------------
# template-specific augmentations
AUGMENTATIONS = ("plain", "render", "crop", "closeup", "dark", "bright", "dirty", "cool", "weird",
                 "small", "large")
_KEYWORDS = [("rendering", "render"), ("rendition", "render"), ("cropped", "crop"),
             ("close-up", "closeup"), ("dark", "dark"), ("bright", "bright"), ("dirty", "dirty"),
             ("cool", "cool"), ("weird", "weird"), ("small", "small"), ("large", "large")]


def template_augmentation(template: str) -> str:
    """The image transformation that gives a template its visual meaning ('plain' for none)."""
    t = template.lower()
    for word, kind in _KEYWORDS:
        if word in t:
            return kind
    return "plain"


def _affine(x: torch.Tensor, scale: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
            rot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Resample x (B,3,H,W) with grid = rot(scale * out) + t; scale < 1 zooms in, > 1 shrinks."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, dtype=x.dtype)
    cos = torch.ones(b) if rot is None else torch.cos(rot)
    sin = torch.zeros(b) if rot is None else torch.sin(rot)
    theta[:, 0, 0] = scale * cos
    theta[:, 0, 1] = -scale * sin
    theta[:, 1, 0] = scale * sin
    theta[:, 1, 1] = scale * cos
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment(x: torch.Tensor, kind: str, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Apply one template's transformation to images in [0, 1], (B, 3, H, W)."""
    b = x.shape[0]
    if b == 0 or kind == "plain" or strength <= 0:
        return x

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    def toward(value_at_full, neutral=1.0):
        # interpolate a parameter between its neutral value and the full-strength draw
        return neutral + strength * (value_at_full - neutral)

    if kind == "dark":
        return x * toward(u(0.25, 0.5)).view(b, 1, 1, 1)
    if kind == "bright":
        return 1.0 - (1.0 - x) * toward(u(0.35, 0.65)).view(b, 1, 1, 1)
    if kind == "cool":
        tint = torch.tensor([0.55, 0.8, 1.0]).view(1, 3, 1, 1)
        return x * (1.0 + strength * (tint - 1.0))
    if kind == "dirty":
        noise = torch.randn(x.shape[0], 1, *x.shape[2:], generator=gen) * 0.18
        spots = (torch.rand(x.shape[0], 1, *x.shape[2:], generator=gen) < 0.06).float() * 0.6
        return (x + strength * (noise + spots)).clamp(0, 1)
    if kind == "render":
        levels = 3.0
        post = torch.round(x * levels) / levels
        blur = F.avg_pool2d(post, 3, stride=1, padding=1, count_include_pad=False)
        return (1 - strength) * x + strength * blur
    if kind == "crop":
        s = toward(u(0.55, 0.8))
        room = (1 - s).clamp(min=0)
        return _affine(x, s, (2 * torch.rand(b, generator=gen) - 1) * room,
                       (2 * torch.rand(b, generator=gen) - 1) * room)
    if kind == "closeup":
        s = toward(u(0.5, 0.7))
        return _affine(x, s, u(-0.1, 0.1) * strength, u(-0.1, 0.1) * strength)
    if kind == "large":
        s = toward(u(0.7, 0.85))
        return _affine(x, s, torch.zeros(b), torch.zeros(b))
    if kind == "small":
        s = toward(u(1.5, 2.2))
        return _affine(x, s, u(-0.25, 0.25) * strength, u(-0.25, 0.25) * strength)
    if kind == "weird":
        rot = (torch.randint(1, 4, (b,), generator=gen).float() * (math.pi / 2)) * strength
        return _affine(x, torch.ones(b), torch.zeros(b), torch.zeros(b), rot)
    raise ValueError(f"unknown augmentation '{kind}'; known: {', '.join(AUGMENTATIONS)}")


# ---------------------------------------------------------------------------------------------
# helpers
def to_pil(images: np.ndarray):
    """uint8 (N,H,W) or (N,H,W,3) -> PIL images ('L' or 'RGB')."""
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        return [Image.fromarray(im) for im in images]
    if images.ndim == 4 and images.shape[-1] == 3:
        return [Image.fromarray(im) for im in images]
    raise ValueError(f"images must be (N,H,W) or (N,H,W,3) uint8, got shape {images.shape}")


def _cfg_dict(cfg) -> dict:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001
        return dict(cfg)


def _cfg_get(cfg, key: str, default):
    try:
        v = getattr(cfg, key)
    except Exception:  # noqa: BLE001 - an OmegaConf node without the key
        return default
    return default if v is None else v


def regime_stats(probs: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Zero-shot acc (template 0), template-average acc, avg candidates and eta of union-argmax sets."""
    zs = zero_shot_stats(probs, labels, single_template=0)
    cs = candidate_stats(union_argmax(probs), labels)
    return {"zero_shot_acc": zs["zero_shot_acc"], "template_avg_acc": zs["template_avg_acc"],
            "avg_candidates": cs["avg_candidates"], "eta": cs["eta"],
            "per_template_acc": zs["per_template_acc"]}


def regime_distance(stats: Dict[str, float], cfg) -> float:
    """How far (acc, avg candidates, eta) is from the targets, each in units of a tolerance."""
    return float(math.sqrt(((stats["zero_shot_acc"] - cfg.target_zero_shot_acc) / 0.05) ** 2
                           + ((stats["avg_candidates"] - cfg.target_avg_candidates) / 0.25) ** 2
                           + ((stats["eta"] - cfg.target_eta) / 0.05) ** 2))


def _replace_dir(tmp: str, out_dir: str) -> None:
    """Move the finished folder over out_dir (the old one is moved aside first, then removed)."""
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
def train_embedded_clip(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                        templates: Sequence[str], cfg, out_dir: str, seed: int = 0,
                        log: Callable[[str], None] = print) -> dict:
    """Train the tiny CLIP on the reserved split, keep the epoch nearest the target regime, save it.

    Returns the summary also written to `out_dir/embedded_annotator.json`.
    """
    from transformers import CLIPProcessor

    t_start = time.time()
    labels = np.asarray(labels, dtype=np.int64)
    class_names, templates = list(class_names), list(templates)
    n, c, d = len(labels), len(class_names), len(templates)
    if len(images) != n:
        raise ValueError(f"{len(images)} images but {n} labels")
    if n < 4:
        raise ValueError("train_embedded_clip needs at least 4 images")
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must lie in [0, {c})")
    strength = float(_cfg_get(cfg, "augment_strength", 0.15))
    weight_decay = float(_cfg_get(cfg, "weight_decay", 0.1))

    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    # Subnormal floats (tiny AdamW moments, tiny activations) stall CPU training of a model this
    # small by 10x or more at random epochs; flush them to zero while training.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    try:
        # ---- split
        perm = rng.permutation(n)
        n_val = int(round(float(cfg.val_fraction) * n))
        n_val = min(max(n_val, 1), n - 2)
        val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])

        # ---- processor, tokenizer, model
        pil = to_pil(images)
        arr = np.asarray(images, dtype=np.float32) / 255.0
        if arr.ndim == 3:
            mean = [round(float(arr[tr_idx].mean()), 4)] * 3
            std = [round(float(arr[tr_idx].std()), 4)] * 3
        else:
            mean = [round(float(v), 4) for v in arr[tr_idx].mean(axis=(0, 1, 2))]
            std = [round(float(v), 4) for v in arr[tr_idx].std(axis=(0, 1, 2))]
        std = [max(s, 1e-3) for s in std]
        del arr
        image_processor = build_image_processor(cfg.image_size, mean, std)
        prompts = [t.format(name) for t in templates for name in class_names]
        tokenizer = build_clip_tokenizer(prompts)
        model = build_clip_model(cfg, tokenizer)
        n_params = sum(p.numel() for p in model.parameters())

        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in pil]
        pixels = image_processor(images=[rgb[i] for i in tr_idx], return_tensors="pt")["pixel_values"]
        mean_t = torch.tensor(mean, dtype=pixels.dtype).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=pixels.dtype).view(1, 3, 1, 1)
        x01 = pixels * std_t + mean_t                     # the processor's output, back in [0, 1]
        y_tr = torch.from_numpy(labels[tr_idx])
        enc = tokenizer(prompts, padding=True, return_tensors="pt")
        prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
        kinds = [template_augmentation(t) for t in templates]
        val_pil = [pil[i] for i in val_idx]
        val_y = labels[val_idx]

        # ---- optimisation
        epochs, bs = int(cfg.epochs), int(cfg.batch_size)
        steps_per_epoch = max(1, math.ceil(len(tr_idx) / bs))
        total = epochs * steps_per_epoch
        warm = min(steps_per_epoch, max(1, total // 10))
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "embedding" in name or name == "logit_scale" else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=float(cfg.lr))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / warm if s < warm
            else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))

        log(f"[embedded-clip] {len(tr_idx)} train / {len(val_idx)} val images, {d} templates x {c} classes, "
            f"{n_params / 1e3:.0f}k params, vocab {len(tokenizer.get_vocab())}, mean/std {mean[0]}/{std[0]}")
        history: List[dict] = []
        best = None
        for epoch in range(1, epochs + 1):
            t0 = time.time()
            model.train()
            order = torch.from_numpy(rng.permutation(len(tr_idx)))
            tmpl = torch.from_numpy(rng.integers(0, d, size=len(tr_idx)))
            loss_sum, seen = 0.0, 0
            for s in range(0, len(order), bs):
                idx = order[s:s + bs]
                if len(idx) < 2:
                    continue
                xb, tb = x01[idx].clone(), tmpl[idx]
                for j in torch.unique(tb).tolist():
                    sel = (tb == j).nonzero(as_tuple=True)[0]
                    xb[sel] = augment(xb[sel], kinds[j], gen, strength)
                xb = (xb - mean_t) / std_t
                pid = tb * c + y_tr[idx]
                out = model(input_ids=prompt_ids[pid], attention_mask=prompt_mask[pid], pixel_values=xb,
                            return_loss=True)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                loss_sum += float(out.loss.detach()) * len(idx)
                seen += len(idx)
            train_s = time.time() - t0
            scorer = ClipScorer.from_loaded(model, tokenizer, image_processor, class_names, templates)
            stats = regime_stats(scorer.score(val_pil), val_y)
            dist = regime_distance(stats, cfg)
            rec = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "images_per_s": seen / max(train_s, 1e-9),
                   "eval_s": time.time() - t0 - train_s, "distance": dist,
                   **{k: v for k, v in stats.items() if k != "per_template_acc"}}
            history.append(rec)
            if best is None or dist < best["distance"]:
                best = {"epoch": epoch, "distance": dist, "stats": stats,
                        "state": copy.deepcopy(model.state_dict())}
            log(f"[embedded-clip] epoch {epoch}/{epochs} loss {rec['loss']:.3f} | val acc {stats['zero_shot_acc']:.3f} "
                f"avg-tmpl {stats['template_avg_acc']:.3f} cand {stats['avg_candidates']:.2f} eta {stats['eta']:.3f} "
                f"| dist {dist:.2f}{' *' if best['epoch'] == epoch else ''} | {rec['images_per_s']:.0f} img/s")

        # ---- save the selected epoch (temporary folder beside out_dir, then renamed over it)
        model.load_state_dict(best["state"])
        model.eval()
        train_wall = time.time() - t_start
        out_dir = os.path.abspath(out_dir)
        parent = os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{out_dir}.tmp-{os.getpid()}-{time.time_ns()}"
        try:
            model.save_pretrained(tmp)
            CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
            write_bpe_files(tokenizer, tmp)
            # reload through the annotation path: what is saved must score like what was selected
            check = ClipScorer(tmp, class_names, templates)
            reloaded = regime_stats(check.score(val_pil), val_y)
            sel = best["stats"]
            if any(abs(reloaded[k] - sel[k]) > 1e-6 for k in ("zero_shot_acc", "avg_candidates", "eta")):
                raise RuntimeError(f"the saved embedded CLIP scores differently after reloading: "
                                   f"{reloaded} vs {sel}")
            summary = {
                "format": FORMAT,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seed": int(seed),
                "class_names": class_names,
                "templates": templates,
                "template_augmentations": dict(zip(templates, kinds)),
                "augment_strength": strength,
                "weight_decay": weight_decay,
                "config": _cfg_dict(cfg),
                "n_reserved": int(n), "n_train": int(len(tr_idx)), "n_val": int(len(val_idx)),
                "image_mean": mean, "image_std": std,
                "vocab_size": len(tokenizer.get_vocab()),
                "num_parameters": int(n_params),
                "selection": {
                    "rule": "epoch minimising sqrt(((acc-ta)/.05)^2 + ((cand-tc)/.25)^2 + ((eta-te)/.05)^2) "
                            "on the validation part (ClipScorer, logit scale 100, union of per-template argmax)",
                    "targets": {"zero_shot_acc": float(cfg.target_zero_shot_acc),
                                "avg_candidates": float(cfg.target_avg_candidates),
                                "eta": float(cfg.target_eta)},
                    "epoch": best["epoch"], "distance": best["distance"],
                    "val_stats": sel,
                },
                "history": history,
                "train_wall_s": train_wall,
                "weights_sha256": weights_sha256(tmp),
                "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
            }
            with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
                f.write("\n")
            for name in os.listdir(tmp):               # save_pretrained may leave weights 0600
                os.chmod(os.path.join(tmp, name), 0o644)
            _replace_dir(tmp, out_dir)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        summary["out_dir"] = out_dir
        log(f"[embedded-clip] kept epoch {best['epoch']} (val acc {sel['zero_shot_acc']:.3f}, cand "
            f"{sel['avg_candidates']:.2f}, eta {sel['eta']:.3f}); {train_wall:.1f}s; saved {out_dir}")
        return summary
    finally:
        torch.set_num_threads(threads_before)
        torch.set_flush_denormal(False)


__all__ = ["train_embedded_clip", "build_clip_tokenizer", "build_image_processor", "build_clip_model",
           "template_augmentation", "augment", "regime_stats", "regime_distance", "to_pil", "META_FILE",
           "AUGMENTATIONS", "bytes_to_unicode", "write_bpe_files"]
