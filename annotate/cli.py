"""Stage 1: annotation. Build the embedded CLIP, then label image shards with candidate sets.

    coreg-annotate build-embedded --config configs/demo.yaml      # train the default tiny CLIP
    coreg-annotate clip --config configs/demo.yaml                # 27 templates -> column 'clip'
    coreg-annotate clip annotator.model=/models/clip-vit-b32 annotator.column=clip_b32
    coreg-annotate synthetic synthetic.q=0.03 synthetic.eta=0.2   # controlled NPLL column
    coreg-annotate import label_import.path=labels.csv label_import.column=mine  # your own sets
    coreg-annotate merge merge.inputs=[clip,llava] merge.rule=union merge.column=both
    # a vision chat model served by vLLM (annotate/vlm_labeler.py): each prompt is one annotator
    coreg-annotate vlm --config configs/demo.yaml vlm.model=llava vlm.urls=[http://node1:8000/v1]
    coreg-annotate vlm vlm.mode=topk vlm.candidates_column=clip vlm.topk=5 vlm.column=llava_top5
    coreg-annotate vlm vlm.server.launch=true vlm.server.model=/models/llava-1.5-7b-hf vlm.model=llava
    coreg-annotate status --config configs/demo.yaml [--labeler synthetic|import|merge|vlm] [--json]
    # SLURM array: task of ordinal i takes every N-th shard (slurm/annotate.sbatch); without
    # --task-index/--num-tasks they come from SLURM_ARRAY_TASK_{ID,MIN,MAX,STEP,COUNT}
    coreg-annotate clip --task-index 3 --num-tasks 16

Every shard's marker records a hash of what produced it (model, templates, rule, input shard...).
A rerun skips shards whose hash matches; a shard whose hash differs is stale: the run refuses
(before writing anything) unless annotator.overwrite=true, which relabels the stale shards.
--redo-errors (annotator.redo_errors=true) relabels the error records of done shards.
`status` prints done / pending / stale / failed shards and the statistics so far.
`import` (annotate/importer.py: JSONL, CSV or parquet, by key or by source path / URL) and
`merge` (annotate/merge.py: union, vote or intersection of columns) write columns the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from coreg_dist.config import Config, ConfigError, save_config
from coreg_dist.io import atomic_write_json, read_json
from coreg_dist.runtime import parse_args, setup_process
from coreg_dist.shards.format import FormatError, read_manifest
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
                         overwrite=cfg.annotator.overwrite, redo_errors=cfg.annotator.redo_errors,
                         task_index=task_index, num_tasks=num_tasks, errors=errors)
    return _annotation_report(cfg, stats, errors, time.time() - t0,
                              single_template=templates[single], task=(task_index, num_tasks))


def annotate_synthetic(cfg: Config, task_index: int = 0, num_tasks: int = 1) -> Dict:
    from annotate.columns import write_column
    from annotate.labelers import SyntheticLabeler

    manifest = read_manifest(cfg.data.root)
    errors = ErrorLog()
    t0 = time.time()
    stats = write_column(cfg.data.root, manifest, cfg.synthetic.column, ["train"],
                         SyntheticLabeler(cfg.synthetic, manifest.num_classes),
                         overwrite=cfg.annotator.overwrite, redo_errors=cfg.annotator.redo_errors,
                         task_index=task_index, num_tasks=num_tasks, errors=errors)
    return _annotation_report(cfg, stats, errors, time.time() - t0, name="synthetic_stats.json",
                              task=(task_index, num_tasks))


def _annotation_report(cfg: Config, stats: Dict, errors: ErrorLog, seconds: float,
                       single_template: str = "", name: str = "annotation_stats.json",
                       extra: Optional[Dict] = None, task: Tuple[int, int] = (0, 1)) -> Dict:
    """Top level: the training pool's statistics (the set the learner sees); per split below.
    The statistics are the whole column's (summed from every task's markers); this task's own
    errors and time are in it too, so each array task writes its own file
    (`<name>.task-I-of-N.json`): tasks sharing run.out_dir do not overwrite each other."""
    main = stats.get("train") or next(iter(stats.values()))
    report = {k: main[k] for k in ("n_images", "zero_shot_acc", "template_avg_acc",
                                   "avg_candidates", "coverage", "eta") if k in main}
    report.update({"single_template": single_template, "seconds": round(seconds, 1),
                   "errors": errors.summary(), "splits": stats, **(extra or {})})
    index, count = task
    if count > 1:
        report["task"] = {"index": index, "count": count}
        name = f"{name[:-len('.json')]}.task-{index}-of-{count}.json"
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
    counts = [f"{split} {s['shards_done']}/{s['shards']}" for split, s in stats.items() if "shards" in s]
    if counts:   # from write_column: the whole column's markers, every task's shards so far
        print(f"shards done (all tasks so far): {', '.join(counts)}")
    print()


def array_task_from_env(env: Mapping[str, str] = os.environ) -> Tuple[int, int]:
    """(ordinal, count) of this SLURM array task: 0..count-1 whatever the array's first index
    and step (--array=1-5, --array=0-8:2, --array=0-15%4). Outside an array: (0, 1). An index
    list that is not one arithmetic range (--array=1,4,10) is refused: the shard split would
    leave shards to no task. The same rule as array_task in slurm/annotate.sbatch."""
    if not env.get("SLURM_ARRAY_TASK_ID"):
        return 0, 1
    try:
        tid = int(env["SLURM_ARRAY_TASK_ID"])
        lo = int(env.get("SLURM_ARRAY_TASK_MIN") or tid)
        step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
        count = int(env.get("SLURM_ARRAY_TASK_COUNT") or 1)
        hi = int(env.get("SLURM_ARRAY_TASK_MAX") or lo + (count - 1) * step)
    except ValueError as exc:
        raise ValueError(f"SLURM_ARRAY_TASK_* is not an integer ({exc})") from None
    where = (f"SLURM_ARRAY_TASK_ID={tid} MIN={lo} MAX={hi} STEP={step} COUNT={count}")
    if step < 1 or count < 1 or tid < lo or (tid - lo) % step:
        raise ValueError(f"cannot place this array task: {where}")
    if (hi - lo) // step + 1 != count or (hi - lo) % step:
        raise ValueError(f"the array's indices are not one range lo-hi:step ({where}); submit "
                         "with --array=A-B or --array=A-B:S, or pass --task-index/--num-tasks")
    return (tid - lo) // step, count


def _array_task(args) -> Tuple[int, int]:
    if args.task_index is not None or args.num_tasks is not None:
        if args.task_index is None or args.num_tasks is None:
            raise SystemExit("error: --task-index and --num-tasks go together")
        if not 0 <= args.task_index < args.num_tasks:
            raise SystemExit(f"error: --task-index {args.task_index} is not in "
                             f"[0, --num-tasks {args.num_tasks})")
        return args.task_index, args.num_tasks
    try:
        return array_task_from_env()
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


# ---------------------------------------------------------------------- status
def column_status(cfg: Config, labeler_kind: str = "clip", device: str = "cpu",
                  list_limit: int = 20) -> Dict:
    """Done / pending / stale / failed shards of the configured column and the statistics summed
    from its done markers. Stale needs the labeler's provenance: the CLIP labeler is loaded
    (with the weights hash); if it cannot be, hashes are not checked and the result says so."""
    from annotate.provenance import ColumnSpec, column_states, split_summary, splits_in_scope
    from coreg_dist.shards.format import column_dir

    manifest = read_manifest(cfg.data.root)
    if labeler_kind == "synthetic":
        from annotate.labelers import SyntheticLabeler
        column, splits = cfg.synthetic.column, ["train"]
        make = lambda: SyntheticLabeler(cfg.synthetic, manifest.num_classes)
        batch_size = 256
    elif labeler_kind == "import":     # hashes the file (label_import.path); does not parse it
        from annotate.importer import ImportLabeler
        column, splits = cfg.label_import.column, list(cfg.label_import.splits)
        make = lambda: ImportLabeler(cfg.label_import, manifest.classes)
        batch_size = 1024
    elif labeler_kind == "vlm":        # the content hash needs no server (config only)
        from annotate.vlm_labeler import VlmLabeler
        column, splits = cfg.vlm.column, list(cfg.vlm.splits)
        if cfg.vlm.server.launch and not cfg.vlm.model:
            cfg.vlm.model = cfg.vlm.server.model
        make = lambda: VlmLabeler(cfg.vlm, manifest.classes)
        batch_size = cfg.vlm.batch_size
    elif labeler_kind == "merge":
        from annotate.merge import MergeLabeler
        column, splits = cfg.merge.column, list(cfg.merge.splits)
        make = lambda: MergeLabeler(cfg.merge, manifest.num_classes)
        batch_size = 1024
    else:
        from annotate.labelers import ClipLabeler
        column, splits = cfg.annotator.column, list(cfg.annotator.splits)
        make = lambda: ClipLabeler(cfg.annotator, manifest.classes, device=device)
        batch_size = cfg.annotator.batch_size
    spec, note = None, ""
    try:
        spec = ColumnSpec(cfg.data.root, manifest, column, make(), batch_size=batch_size)
    except Exception as exc:  # noqa: BLE001 - status still shows what the markers say
        note = (f"the {labeler_kind} labeler could not be built ({type(exc).__name__}: {exc}); "
                "content hashes not checked: stale shards count as done")
    scope = splits_in_scope(cfg.data.root, manifest, column, splits)
    states = column_states(cfg.data.root, manifest, column, scope, spec)
    out: Dict = {"column": column, "folder": column_dir(cfg.data.root, column),
                 "labeler": labeler_kind, "hash_checked": spec is not None,
                 "provenance_hash": spec.provenance_hash if spec else None, "splits": {}}
    if note:
        out["note"] = note
    for split, sts in states.items():
        summ = split_summary(sts)
        lists = {}
        for state in ("pending", "stale", "failed"):
            names = [s.name for s in sts if s.state == state]
            if names:
                lists[state] = {"count": len(names), "shards": names[:list_limit],
                                "first_reason": next(s.reason for s in sts if s.state == state)}
        errs = [s.name for s in sts if s.state == "done" and s.has_errors]
        if errs:
            lists["with_errors"] = {"count": len(errs), "shards": errs[:list_limit]}
        counts = {k: summ.pop(f"shards_{k}") for k in ("done", "pending", "stale", "failed", "legacy")}
        summ.pop("shards_missing")
        out["splits"][split] = {"shards": summ.pop("shards"), **counts,
                                "error_records": summ.pop("error_records"),
                                "shards_with_errors": summ.pop("shards_with_errors"),
                                "not_done": lists, "stats": summ}
    out["complete"] = bool(out["splits"]) and all(
        s["done"] == s["shards"] for s in out["splits"].values())
    return out


def print_status(st: Dict) -> None:
    print(f"column '{st['column']}' ({st['folder']}), labeler {st['labeler']}"
          + (f", provenance {st['provenance_hash'][:12]}" if st["provenance_hash"] else ""))
    if st.get("note"):
        print(f"warning: {st['note']}")
    cols = ("shards", "done", "pending", "stale", "failed", "error_records")
    print("\n| split | " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for split, s in st["splits"].items():
        print(f"| {split} | " + " | ".join(str(s[c]) for c in cols) + " |")
    for split, s in st["splits"].items():
        if s["legacy"]:
            print(f"{split}: {s['legacy']} done shard(s) written before provenance hashing, "
                  "provenance matches (the next run records their hash)")
        for state, d in s["not_done"].items():
            more = f" (and {d['count'] - len(d['shards'])} more)" if d["count"] > len(d["shards"]) else ""
            print(f"{split} {state.replace('_', ' ')}: {', '.join(d['shards'])}{more}")
            if d.get("first_reason"):
                print(f"    first: {d['first_reason']}")
    print("\nstatistics summed from the done shards' markers:")
    print_stats({split: s["stats"] for split, s in st["splits"].items()})
    print("complete: " + ("yes" if st["complete"] else "no"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("build-embedded", "clip", "synthetic", "import", "merge", "vlm", "status")
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nerror: first argument must be one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    command = argv.pop(0)
    parser = argparse.ArgumentParser(prog=f"coreg-annotate {command}")
    if command == "status":
        parser.add_argument("--labeler", choices=("clip", "synthetic", "import", "merge", "vlm"),
                            default="clip", help="which column: annotator.column (clip), "
                            "synthetic.column, label_import.column, merge.column or vlm.column")
        parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
        parser.add_argument("--list", type=int, default=20, help="shard names listed per state")
    else:
        parser.add_argument("--task-index", type=int, default=None)
        parser.add_argument("--num-tasks", type=int, default=None)
        parser.add_argument("--redo-errors", action="store_true",
                            help="relabel the error records of done shards (= annotator.redo_errors=true)")
    cfg, args = parse_args(argv, "", parser,
                           required={"clip": ("annotator.model",), "import": ("label_import.path",),
                                     "merge": ("merge.inputs",)}.get(command, ()))
    if command == "status":
        setup_process(cfg)           # threads, offline hub; the labeler is loaded on the CPU
        try:
            st = column_status(cfg, args.labeler, list_limit=args.list)
        except FormatError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(st, indent=1))
        else:
            print_status(st)
        return 0
    if args.redo_errors:
        cfg.annotator.redo_errors = True
    task = _array_task(args) if command != "build-embedded" else (0, 1)
    device = setup_process(cfg)
    save_config(cfg, cfg.run.out_dir, f"config.annotate-{command}.yaml")
    try:
        if command == "build-embedded":
            info = build_embedded(cfg, device)
            print(json.dumps(info.get("selected", info), indent=1)[:2000])
        elif command == "clip":
            annotate_clip(cfg, device, *task)
        elif command == "import":
            from annotate.importer import import_column
            import_column(cfg, *task)
        elif command == "vlm":
            from annotate.vlm_labeler import _fatal_errors, annotate_vlm
            try:
                annotate_vlm(cfg, *task)
            except _fatal_errors() as exc:  # every server down, a server that did not start
                print(f"error: {exc}", file=sys.stderr)
                return 1
        elif command == "merge":
            from annotate.merge import merge_columns
            merge_columns(cfg, *task)
        else:
            annotate_synthetic(cfg, *task)
    except (FormatError, ConfigError) as exc:   # a stale column, a damaged dataset, a bad option
        print(f"error: {exc}", file=sys.stderr)   # or import file: named, nothing lost
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
