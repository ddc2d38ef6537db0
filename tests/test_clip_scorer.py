"""ClipScorer on a tiny random CLIP saved in Hugging Face format, and the embedded annotator builder."""
import gzip
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from annotate.clip_scorer import ClipLoadError, ClipScorer
from annotate.embedded_clip import (META_FILE, augment, build_clip_model, build_clip_tokenizer,
                                    build_image_processor, template_augmentation, train_embedded_clip)
from coreg_dist.config import CLIP_TEMPLATES_27, EmbeddedClipConfig

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
TEMPLATES = CLIP_TEMPLATES_27[:5]
FMNIST = "/usr/share/datasets/fashion-mnist"


def _tiny_cfg(**kw):
    cfg = EmbeddedClipConfig(vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                             projection_dim=16, epochs=1, batch_size=32)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPProcessor

    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("tiny_clip"))
    tok = build_clip_tokenizer([t.format(c) for t in CLIP_TEMPLATES_27 for c in CLASSES])
    model = build_clip_model(_tiny_cfg(), tok)
    model.save_pretrained(folder)
    proc = build_image_processor(28, [0.286] * 3, [0.353] * 3)
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(folder)
    return folder


def _images(n, mode="L", size=28, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]


def test_tokenizer_spells_prompt_words_as_single_tokens():
    tok = build_clip_tokenizer([t.format(c) for t in CLIP_TEMPLATES_27 for c in CLASSES])
    pieces = tok.convert_ids_to_tokens(tok("a close-up photo of the T-shirt/top")["input_ids"])
    assert pieces == ["<|startoftext|>", "a</w>", "close</w>", "-</w>", "up</w>", "photo</w>", "of</w>",
                      "the</w>", "t</w>", "-</w>", "shirt</w>", "/</w>", "top</w>", "<|endoftext|>"]
    # unseen words fall back to byte symbols, never to the unknown token
    ids = tok("zebra", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) >= 2 and tok.decode(ids) == "zebra"


def test_scorer_shapes_probabilities_and_modes(tiny_clip_dir):
    sc = ClipScorer(tiny_clip_dir, CLASSES, TEMPLATES, batch_size=4)
    d, c = len(TEMPLATES), len(CLASSES)
    assert len(sc.prompts) == d * c and sc.prompts[c + 1] == TEMPLATES[1].format(CLASSES[1])
    assert sc.text_features.shape[:2] == (d, c)
    assert torch.allclose(sc.text_features.norm(dim=-1), torch.ones(d, c), atol=1e-5)

    gray = _images(10, "L")
    p = sc.score(gray)
    assert p.shape == (10, d, c) and p.dtype == np.float32
    assert np.allclose(p.sum(axis=2), 1.0, atol=1e-5)
    # an 'L' image and its RGB conversion score the same; RGB input works
    p_rgb = sc.score([im.convert("RGB") for im in gray])
    assert np.allclose(p, p_rgb, atol=1e-6)
    p_col = sc.score(_images(3, "RGB", seed=1))
    assert p_col.shape == (3, d, c) and np.allclose(p_col.sum(axis=2), 1.0, atol=1e-5)
    assert sc.score([]).shape == (0, d, c)
    # batching does not change the result
    p_big = ClipScorer(tiny_clip_dir, CLASSES, TEMPLATES, batch_size=256).score(gray)
    assert np.allclose(p, p_big, atol=1e-5)


def test_scorer_uses_fixed_scale_and_text_cache(tiny_clip_dir):
    sc = ClipScorer(tiny_clip_dir, CLASSES, TEMPLATES, logit_scale=100.0)
    ims = _images(4)
    calls = []
    orig = sc.model.get_text_features
    sc.model.get_text_features = lambda *a, **k: calls.append(1) or orig(*a, **k)
    p = sc.score(ims)
    assert calls == []                                   # text features were computed once, at load
    with torch.no_grad():
        feats = sc.model.get_image_features(pixel_values=sc.pixel_values(ims))
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.nn.functional.normalize(feats, dim=-1)
    ref = torch.softmax(100.0 * torch.einsum("bk,tck->btc", feats, sc.text_features), dim=-1).numpy()
    assert np.allclose(p, ref, atol=1e-5)
    prov = sc.provenance()
    assert prov["num_templates"] == len(TEMPLATES) and prov["logit_scale"] == 100.0
    assert prov["image_size"] == 28 and len(prov["weights_sha256"]) == 64
    assert prov["model"] == tiny_clip_dir


def test_bad_path_names_the_path(tmp_path):
    missing = str(tmp_path / "no_such_clip")
    with pytest.raises(ClipLoadError, match="no_such_clip"):
        ClipScorer(missing, CLASSES, TEMPLATES)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ClipLoadError, match="empty_dir"):
        ClipScorer(str(empty), CLASSES, TEMPLATES)


def test_model_without_processor_is_a_clear_error(tiny_clip_dir, tmp_path):
    import shutil

    only_model = tmp_path / "model_only"
    only_model.mkdir()
    for name in os.listdir(tiny_clip_dir):
        if name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(tiny_clip_dir, name), only_model / name)
    with pytest.raises(ClipLoadError, match="model_only"):
        ClipScorer(str(only_model), CLASSES, TEMPLATES)


def test_template_augmentations():
    kinds = {t: template_augmentation(t) for t in CLIP_TEMPLATES_27}
    assert kinds["a dark photo of the {}"] == "dark" and kinds["a photo of a {}"] == "plain"
    assert kinds["a rendition of a {}"] == "render" and kinds["a close-up photo of the {}"] == "closeup"
    assert kinds["a photo of the small {}"] == "small" and kinds["a cropped photo of a {}"] == "crop"
    x = torch.rand(6, 3, 28, 28)
    gen = torch.Generator().manual_seed(0)
    for kind in set(kinds.values()):
        y = augment(x, kind, gen)
        assert y.shape == x.shape and float(y.min()) >= -1e-6 and float(y.max()) <= 1 + 1e-6
    assert float(augment(x, "dark", gen).mean()) < float(x.mean())
    assert torch.equal(augment(x, "dark", gen, strength=0.0), x)


def _check_embedded(out, summary, class_names, templates, n_epochs):
    assert os.path.isfile(os.path.join(out, META_FILE))
    meta = json.load(open(os.path.join(out, META_FILE)))
    assert meta["selection"]["epoch"] in range(1, n_epochs + 1)
    assert len(meta["history"]) == n_epochs and meta["weights_sha256"] == summary["weights_sha256"]
    for k in ("zero_shot_acc", "avg_candidates", "eta"):
        assert k in meta["selection"]["val_stats"]
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".tmp-" in n]
    sc = ClipScorer(out, class_names, templates)
    assert sc.provenance()["weights_sha256"] == summary["weights_sha256"]
    return sc


def test_train_embedded_clip_synthetic_rgb_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    n, names = 48, ["red thing", "blue thing", "green thing"]
    labels = np.arange(n) % 3
    images = rng.integers(0, 60, (n, 16, 16, 3), dtype=np.uint8)
    images[np.arange(n), :, :, labels] += 150                  # class = dominant colour
    cfg = _tiny_cfg(image_size=16, patch_size=4, epochs=2, batch_size=16)
    logs = []
    s1 = train_embedded_clip(images, labels, names, TEMPLATES, cfg, str(tmp_path / "a"), seed=3, log=logs.append)
    assert any("epoch 2/2" in line for line in logs)
    sc = _check_embedded(str(tmp_path / "a"), s1, names, TEMPLATES, 2)
    p = sc.score([Image.fromarray(im) for im in images[:5]])
    assert p.shape == (5, len(TEMPLATES), 3)
    # same seed -> the same weights; retraining into the same folder replaces it
    s2 = train_embedded_clip(images, labels, names, TEMPLATES, cfg, str(tmp_path / "a"), seed=3, log=lambda _: None)
    assert s2["weights_sha256"] == s1["weights_sha256"]


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        buf = f.read()
    nd = buf[3]
    dims = [int.from_bytes(buf[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


@pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")),
                    reason="Fashion-MNIST not installed")
def test_train_embedded_clip_on_fashion_mnist_subset(tmp_path):
    x = _read_idx(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"))[:200]
    y = _read_idx(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz"))[:200].astype(np.int64)
    cfg = EmbeddedClipConfig(epochs=2, batch_size=64)
    out = str(tmp_path / "embedded_clip")
    summary = train_embedded_clip(x, y, CLASSES, CLIP_TEMPLATES_27, cfg, out, seed=0, log=lambda _: None)
    assert summary["n_train"] + summary["n_val"] == 200
    sc = _check_embedded(out, summary, CLASSES, CLIP_TEMPLATES_27, 2)
    p = sc.score([Image.fromarray(im) for im in x[:8]])
    assert p.shape == (8, 27, 10) and np.allclose(p.sum(axis=2), 1.0, atol=1e-5)
