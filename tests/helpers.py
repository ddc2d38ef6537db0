"""Tiny real datasets for tests: shard format v1 written through the project's own writers."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from coreg_dist.shards.format import (Manifest, ShardEntry, image_shard_path, shard_name,
                                      write_manifest)
from coreg_dist.shards.writer import ShardWriter


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def class_images(n: int, num_classes: int, size: int = 16, seed: int = 0):
    """Images whose class is visible: a bright bar whose row depends on the class, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    imgs = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    band = max(1, size // num_classes)
    for i, y in enumerate(labels):
        imgs[i, y * band:(y + 1) * band, :] = 230
    return imgs, labels


def make_dataset(root: str, n_train: int = 40, n_test: int = 20, num_classes: int = 4,
                 shard_size: int = 16, size: int = 16, seed: int = 0) -> Manifest:
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        imgs, labels = class_images(n, num_classes, size, seed + (split == "test"))
        entries = []
        for s in range(0, n, shard_size):
            name = shard_name(split, s // shard_size)
            with ShardWriter(image_shard_path(root, name)) as w:
                for i in range(s, min(n, s + shard_size)):
                    w.write(f"{split}_{i:05d}", {"png": png(imgs[i]), "cls": int(labels[i])})
            w.commit({})
            entries.append(ShardEntry(name, w.count))
        splits[split] = entries
    m = Manifest(name="tiny", classes=[f"class{c}" for c in range(num_classes)], splits=splits)
    write_manifest(root, m)
    return m


def make_labeled_dataset(root: str, n_train: int = 48, n_test: int = 24, num_classes: int = 4,
                         shard_size: int = 16, size: int = 16) -> str:
    """make_dataset plus a synthetic candidate column named 'synthetic' (q = eta = 0.2)."""
    from annotate.cli import annotate_synthetic
    from coreg_dist.config import load_config

    make_dataset(root, n_train=n_train, n_test=n_test, num_classes=num_classes,
                 shard_size=shard_size, size=size)
    annotate_synthetic(load_config(None, [f"data.root={root}", f"run.out_dir={root}/ann",
                                          "synthetic.q=0.2", "synthetic.eta=0.2"]))
    return root


def corrupt_images(root: str, shard: str, rows=None) -> None:
    """Replace the image bytes of the given rows (every row if None) of an image shard with bytes
    that are not an image, keeping keys and labels."""
    from coreg_dist.shards.reader import iter_tar

    path = image_shard_path(root, shard)
    samples = list(iter_tar(path))
    with ShardWriter(path) as w:
        for i, (key, fields) in enumerate(samples):
            if rows is None or i in rows:
                fields = dict(fields, png=b"\x89PNG\r\n\x1a\n not an image")
            w.write(key, fields)


# ---------------------------------------------------------------------- running the trainer
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def common(root, out, *extra):
    """Overrides for a seconds-long Co-Reg run on a make_labeled_dataset root."""
    return [f"data.root={root}", f"run.out_dir={out}", "train.column=synthetic", "train.epochs=3",
            "train.batch_size=8", "train.eval_batch_size=16", "coreg.warm_up=1",
            "coreg.feature_start=0", "coreg.queue_size=32", "coreg.rampup_epochs=2",
            "train.lr_period=0", "data.streams=2", "data.shuffle_buffer=8",
            # the tests' step arithmetic (kill points, checkpoints) counts warm-up batches of 2B
            "coreg.warmup_batch_factor=2", *extra]


def train_pce_briefly(root, out, column) -> dict:
    """One epoch of partial CE on `column` (a column's readability end to end); its report."""
    from train.cli import main as train_main

    assert train_main([f"data.root={root}", f"run.out_dir={out}", f"train.column={column}",
                       "train.method=pce", "train.epochs=1", "train.batch_size=8",
                       "train.eval_batch_size=16", "data.streams=1", "data.shuffle_buffer=8",
                       "train.lr_period=0", "run.threads=1"]) == 0
    return json.load(open(os.path.join(out, "report.json")))


def launch(cmd, expect=0, timeout=300, env=None):
    """Run a launcher command line from the repository root. expect: an exit status, or
    "killed" (stopped by train.stop_after_steps)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    ok = (r.returncode != 0 and "train.stop_after_steps" in r.stderr) if expect == "killed" \
        else r.returncode == expect
    if not ok:
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {r.returncode} (expected {expect}):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def torchrun(n, args, expect=0):
    """coreg-train on n ranks (torchrun --standalone, gloo)."""
    return launch([*TORCHRUN, f"--nproc_per_node={n}", "-m", "train.cli", *args, "run.threads=2"], expect)


def latest(run_dir):
    base = os.path.join(run_dir, "checkpoints")
    return os.path.join(base, open(os.path.join(base, "latest")).read().strip())


def model(run_dir):
    return torch.load(os.path.join(latest(run_dir), "model.pt"), weights_only=True)["method"]


def state_by_key(run_dir, field, per_candidate=False):
    """key -> value of `field` in the run's last state version (per_candidate: the sample's
    array of per-candidate values)."""
    meta = json.load(open(os.path.join(latest(run_dir), "meta.json")))
    folder = os.path.join(run_dir, "state", f"v{meta['state_version']:05d}")
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".npz"):
            z = np.load(os.path.join(folder, f))
            values = z[field]
            if per_candidate:
                values = np.split(values, np.cumsum(z["__ncand__"])[:-1])
            out.update(zip(z["__keys__"].tolist(), list(values) if per_candidate else values.tolist()))
    return out


def metrics(run_dir):
    return [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]



def demo_overrides(base, *extra):
    """configs/demo.yaml on the demo_data fixture's folders: 4,000 images, warm-up then one
    Co-Reg epoch."""
    return [f"data.root={base}/data", f"embedded.out_dir={base}/embedded", f"annotator.model={base}/embedded",
            "train.max_train_samples=4000", "train.epochs=2", "coreg.warm_up=1", "coreg.feature_start=0",
            *extra]


def make_tiny_clip(clip_dir: str, classes, image_size: int = 28, templates=None) -> str:
    """A tiny random CLIPModel + tokenizer + processor in Hugging Face format (what
    tests/test_annotate.py builds): loads through exactly the code that loads a real CLIP."""
    from transformers import CLIPProcessor

    from annotate.embedded_clip import build_clip_model, build_clip_tokenizer, build_image_processor
    from coreg_dist.config import CLIP_TEMPLATES_27, EmbeddedClipConfig

    templates = list(templates or CLIP_TEMPLATES_27)
    torch.manual_seed(0)
    tok = build_clip_tokenizer([t.format(c) for t in templates for c in classes])
    cfg = EmbeddedClipConfig(vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                             projection_dim=16)
    build_clip_model(cfg, tok).save_pretrained(clip_dir)
    CLIPProcessor(image_processor=build_image_processor(image_size, [0.3] * 3, [0.3] * 3),
                  tokenizer=tok).save_pretrained(clip_dir)
    return clip_dir


def processes_with(*markers: str):
    """pids of live processes (not zombies) whose command line contains every marker (a test's
    tmp path is in every server it starts, and in no other process's)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if all(m in cmd for m in markers) and state != "Z":
            pids.append(int(pid))
    return pids
