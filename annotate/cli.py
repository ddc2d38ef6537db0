"""Stage 1: annotation. Build the embedded CLIP, then label image shards with candidate sets.

    coreg-annotate build-embedded --config configs/demo.yaml      # train the default tiny CLIP
    coreg-annotate clip --config configs/demo.yaml                # 27 templates -> column 'clip'
    coreg-annotate clip annotator.model=/models/clip-vit-b32 annotator.column=clip_b32
    coreg-annotate synthetic synthetic.q=0.03 synthetic.eta=0.2   # controlled NPLL column
    # SLURM array: each task takes every N-th shard (slurm/annotate.sbatch)
    coreg-annotate clip --task-index $SLURM_ARRAY_TASK_ID --num-tasks $SLURM_ARRAY_TASK_COUNT

Reruns skip shards that already have their commit marker (annotator.overwrite=true redoes them).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np

from coreg_dist.config import Config, save_config
from coreg_dist.io import atomic_write_json, read_json
from coreg_dist.runtime import parse_args, setup_process
from coreg_dist.shards.format import read_manifest
from coreg_dist.shards.reader import ErrorLog, iter_joined

EMBEDDED_INFO = "embedded_annotator.json"
SINGLE_TEMPLATE = "a photo of a {}"   # the paper's single-template zero-shot baseline


def build_embedded(cfg: Config, device: str) -> Dict:
    """Train the tiny CLIP on the reserved annotator split (skipped if already built)."""
    out = cfg.embedded.out_dir
    info_path = os.path.join(out, EMBEDDED_INFO)
    if os.path.isfile(info_path):
        print(f"embedded annotator already built at {out}")
        return read_json(info_path)
    from annotate.embedded_clip import train_embedded_clip

    manifest = read_manifest(cfg.data.root)
    errors = ErrorLog()
    imgs, labels = [], []
    for s in iter_joined(cfg.data.root, "annotator", errors=errors, manifest=manifest):
        if s["cls"] < 0:
            continue
        imgs.append(np.asarray(s["image"].convert("L" if s["image"].mode in ("L", "1", "I", "I;16")
                                                   else "RGB")))
        labels.append(s["cls"])
    if not imgs:
        raise SystemExit(f"error: split 'annotator' of {cfg.data.root} has no labeled images; "
                         "set data.annotator_split > 0 at ingest, or point annotator.model at a real CLIP")
    shapes = {im.shape for im in imgs}
    if len(shapes) > 1:   # folder sources: bring everything to one size for the tiny model
        from PIL import Image
        size = cfg.embedded.image_size
        imgs = [np.asarray(Image.fromarray(im).resize((size, size))) for im in imgs]
    return train_embedded_clip(np.stack(imgs), np.array(labels), manifest.classes,
                               list(cfg.annotator.templates), cfg.embedded, out, seed=cfg.run.seed)


def annotate_clip(cfg: Config, device: str, task_index: int = 0, num_tasks: int = 1) -> Dict:
    from annotate.columns import write_column
    from annotate.labelers import ClipLabeler

    manifest = read_manifest(cfg.data.root)
    splits = [s for s in cfg.annotator.splits if s in manifest.splits]
    labeler = ClipLabeler(cfg.annotator, manifest.classes, device=device)
    templates = list(cfg.annotator.templates)
    single = templates.index(SINGLE_TEMPLATE) if SINGLE_TEMPLATE in templates else 0
    t0 = time.time()
    errors = ErrorLog()
    stats = write_column(cfg.data.root, manifest, cfg.annotator.column, splits, labeler,
                         batch_size=cfg.annotator.batch_size, single_template=single,
                         overwrite=cfg.annotator.overwrite, task_index=task_index,
                         num_tasks=num_tasks, errors=errors)
    return _annotation_report(cfg, stats, errors, time.time() - t0,
                              single_template=templates[single])


def annotate_synthetic(cfg: Config, task_index: int = 0, num_tasks: int = 1) -> Dict:
    from annotate.columns import write_column
    from annotate.labelers import SyntheticLabeler

    manifest = read_manifest(cfg.data.root)
    errors = ErrorLog()
    t0 = time.time()
    stats = write_column(cfg.data.root, manifest, cfg.synthetic.column, ["train"],
                         SyntheticLabeler(cfg.synthetic, manifest.num_classes),
                         overwrite=cfg.annotator.overwrite, task_index=task_index,
                         num_tasks=num_tasks, errors=errors)
    return _annotation_report(cfg, stats, errors, time.time() - t0, name="synthetic_stats.json")


def _annotation_report(cfg: Config, stats: Dict, errors: ErrorLog, seconds: float,
                       single_template: str = "", name: str = "annotation_stats.json") -> Dict:
    """Top level: the training pool's statistics (the set the learner sees); per split below."""
    main = stats.get("train") or next(iter(stats.values()))
    report = {k: main[k] for k in ("n_images", "zero_shot_acc", "template_avg_acc",
                                   "avg_candidates", "coverage", "eta") if k in main}
    report.update({"single_template": single_template, "seconds": round(seconds, 1),
                   "errors": errors.summary(), "splits": stats})
    os.makedirs(cfg.run.out_dir, exist_ok=True)
    atomic_write_json(os.path.join(cfg.run.out_dir, name), report)
    print_stats(stats)
    return report


def print_stats(stats: Dict) -> None:
    cols = [("n_images", "images", "{:d}"), ("zero_shot_acc", "zero-shot", "{:.2%}"),
            ("template_avg_acc", "tmpl-avg", "{:.2%}"), ("avg_candidates", "avg |S|", "{:.3f}"),
            ("eta", "eta", "{:.2%}")]
    print("\n| split | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for split, s in stats.items():
        print(f"| {split} | " + " | ".join(f.format(s[k]) if k in s else "-" for k, _, f in cols) + " |")
    print()


def _array_task(args) -> tuple:
    idx = args.task_index if args.task_index is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
    n = args.num_tasks if args.num_tasks is not None else int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    return idx, n


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("build-embedded", "clip", "synthetic")
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nerror: first argument must be one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    command = argv.pop(0)
    parser = argparse.ArgumentParser(prog=f"coreg-annotate {command}")
    parser.add_argument("--task-index", type=int, default=None)
    parser.add_argument("--num-tasks", type=int, default=None)
    cfg, args = parse_args(argv, "", parser,
                           required=("annotator.model",) if command == "clip" else ())
    device = setup_process(cfg)
    save_config(cfg, cfg.run.out_dir, f"config.annotate-{command}.yaml")
    if command == "build-embedded":
        info = build_embedded(cfg, device)
        print(json.dumps(info.get("selected", info), indent=1)[:2000])
    elif command == "clip":
        annotate_clip(cfg, device, *_array_task(args))
    else:
        annotate_synthetic(cfg, *_array_task(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
