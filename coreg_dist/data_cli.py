"""Data commands: ingest real images into shard format v1, and inspect a dataset.

    coreg-data ingest --config configs/demo.yaml                      # Fashion-MNIST IDX files
    coreg-data ingest data.source=folder data.source_path=/data/pets data.root=data/pets
    coreg-data ingest data.source=wds data.source_path='/data/laion/{00000..00099}.tar' \
        data.classes='[cat,dog]' data.annotator_split=0 data.root=data/laion
    coreg-data inspect data.root=data/fmnist
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from coreg_dist.runtime import parse_args
from coreg_dist.shards.format import FormatError, list_columns, read_column_info, read_manifest


def inspect(root: str) -> None:
    m = read_manifest(root)
    print(f"{m.name}: format v{m.version}, {m.num_classes} classes: {', '.join(m.classes)}")
    for split, entries in m.splits.items():
        print(f"  split {split:10s} {m.count(split):8d} images in {len(entries)} shards")
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
    cfg, _ = parse_args(argv, f"coreg-data {command}")
    try:
        if command == "ingest":
            from coreg_dist.data.ingest import ingest
            ingest(cfg)
        else:
            inspect(cfg.data.root)
    except FormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
