"""annotate/tiny_llava.py with this environment's transformers: the random LLaVA builds, loads
back in HF with no missing or unexpected keys (after the vision-tower rename vLLM needs) and
generates for an image. Serving it with the real vLLM is tests/test_vllm_real.py (--run-vllm)."""
import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from annotate.tiny_llava import (TinyLlavaSpec, build_tiny_llava, check_tiny_llava,
                                 rename_vision_tower_keys)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tensor_names(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return list(f.keys())


def test_build_rename_check(tmp_path, one_thread_seeded):
    out = str(tmp_path / "tiny")
    summary = build_tiny_llava(out, TinyLlavaSpec(), corpus=["Ankle boot Sneaker"])
    assert summary["image_tokens"] == 16 and 500_000 < summary["parameters"] < 1_000_000
    names = tensor_names(out)
    vision = [n for n in names if n.startswith("vision_tower.")]
    assert vision and all(n.startswith("vision_tower.vision_model.") for n in vision)
    assert summary["renamed_vision_tensors"] == len(vision)
    assert rename_vision_tower_keys(out) == 0              # idempotent
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["vision_feature_select_strategy"] == "default" and cfg["image_seq_length"] == 16
    assert {"tokenizer.json", "processor_config.json", "chat_template.jinja"} <= set(os.listdir(out))
    assert oct(os.stat(os.path.join(out, "model.safetensors")).st_mode & 0o777) == "0o644"
    # HF loads the renamed checkpoint whole and generates; 16 image tokens, a 32x32 input
    assert check_tiny_llava(out) == {"image_tokens": 16, "pixel_values": (1, 3, 32, 32)}
    # the chat template renders OpenAI's list-of-parts content with one <image> per image part
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:..."}}, {"type": "text", "text": "Which?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert text == "USER: <image>\nWhich?\nASSISTANT:"
    # an existing folder is never overwritten
    with pytest.raises(FileExistsError, match="exists"):
        build_tiny_llava(out)


def test_bad_sizes_are_named_and_the_cli_reports_them(tmp_path):
    with pytest.raises(ValueError, match="image_size=30 is not a multiple of patch=8"):
        TinyLlavaSpec(image_size=30).check()
    with pytest.raises(ValueError, match="text_hidden=100 is not a multiple of text_heads=3"):
        TinyLlavaSpec(text_hidden=100, text_heads=3).check()
    assert any("head_dim 32 < 64" in w for w in TinyLlavaSpec(text_heads=4).check())
    r = subprocess.run([sys.executable, "-m", "annotate.tiny_llava", str(tmp_path / "x"),
                        "--image-size", "30"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "image_size=30" in r.stderr and not (tmp_path / "x").exists()
