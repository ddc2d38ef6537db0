"""Data commands: ingest real images into shard format v1, and inspect a dataset.

    coreg-data ingest --config configs/demo.yaml                      # Fashion-MNIST IDX files
    coreg-data ingest data.source=folder data.source_path=/data/pets data.root=data/pets \
        data.ingest_workers=8                                         # rerun after adding images
    coreg-data ingest data.source=wds data.source_path=/data/laion-dl \
        data.classes='[cat,dog]' data.root=data/laion                 # img2dataset output as it is
    coreg-data ingest data.source=wds data.source_path='/data/laion/{00000..00099}.tar' ...
    # array tasks over the source shards (wds); without the flags they come from SLURM_ARRAY_TASK_*
    coreg-data ingest --config my.yaml --task-index 3 --num-tasks 16
    coreg-data ingest --config my.yaml --finalize     # manifest.json, once every task is done
    coreg-data inspect data.root=data/fmnist

What each option does, and what is named when a source file is broken: coreg_dist/data/ingest.py.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from coreg_dist.runtime import parse_args
from coreg_dist.shards.format import FormatError, list_columns, read_column_info, read_manifest


def inspect(root: str) -> None:
    m = read_manifest(root)
    print(f"{m.name}: format v{m.version}, {m.num_classes} classes: {', '.join(m.classes)}")
    for split, entries in m.splits.items():
        print(f"  split {split:10s} {m.count(split):8d} images in {len(entries)} shards")
    errors = m.source.get("errors") or {}
    if errors.get("counts"):
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(errors["counts"].items()))
        print(f"  source problems at ingest: {kinds} (manifest.json source.errors names them)")
    for col in list_columns(root):
        info = read_column_info(root, col) or {}
        prov = info.get("provenance", {})
        print(f"  column {col}: {prov.get('annotator', '?')} "
              f"{prov.get('model', '')} complete={info.get('complete')}")
        for split, s in info.get("splits", {}).items():
            extras = "  ".join(f"{k}={s[k]:.4f}" for k in ("zero_shot_acc", "avg_candidates", "eta")
                               if k in s)
            stale = f", {s['shards_stale']} stale" if s.get("shards_stale") else ""
            print(f"    {split}: {s.get('n_images', 0)} images, {s.get('shards_done')} shards done, "
                  f"{s.get('shards_missing')} missing{stale}  {extras}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("ingest", "inspect"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    command = argv.pop(0)
    parser = argparse.ArgumentParser(description=f"coreg-data {command}")
    if command == "ingest":
        parser.add_argument("--task-index", type=int, default=None,
                            help="array task ordinal (wds sources: every N-th source shard)")
        parser.add_argument("--num-tasks", type=int, default=None, help="number of array tasks")
        parser.add_argument("--finalize", action="store_true",
                            help="only write manifest.json from the shard markers (all tasks done)")
    cfg, args = parse_args(argv, f"coreg-data {command}", parser)
    try:
        if command == "ingest":
            from annotate.cli import _array_task      # the flags, else SLURM_ARRAY_TASK_*
            from coreg_dist.data.ingest import ingest
            task_index, num_tasks = (0, 1) if args.finalize else _array_task(args)
            ingest(cfg, task_index=task_index, num_tasks=num_tasks, finalize_only=args.finalize)
        else:
            inspect(cfg.data.root)
    except FormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
