"""`coreg-annotate import` (annotate/importer.py) and `coreg-annotate merge` (annotate/merge.py)
on tiny real datasets: a folder tree ingested by coreg-data (keys and source paths), label files
in JSONL, CSV and parquet, columns merged by union, vote and intersection."""
import csv
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotate.cli import annotate_synthetic, column_status, main
from annotate.importer import ImportFileError, import_column
from annotate.merge import merge_columns
from annotate.provenance import StaleColumnError
from coreg_dist.config import ConfigError, load_config
from coreg_dist.data.ingest import ingest
from coreg_dist.shards.format import (CAND, VOTES, FormatError, check_column_current,
                                      column_shard_path, image_shard_path, read_column_info,
                                      read_manifest, stats_path)
from coreg_dist.shards.reader import decode_field, iter_joined, iter_tar
from tests.helpers import class_images, png, train_pce_briefly

CLASSES = ["boot", "coat", "dress", "shirt"]


@pytest.fixture()
def ds(tmp_path):
    """A folder tree (4 classes x 6 PNGs) ingested as coreg-data does: 20 train images in 3
    shards, 4 test images; every image sample's json holds its relative source path."""
    src = tmp_path / "photos"
    imgs, labels = class_images(24, 4, size=16, seed=3)
    for i, (im, y) in enumerate(zip(imgs, labels)):
        os.makedirs(src / CLASSES[y], exist_ok=True)
        (src / CLASSES[y] / f"p{i:03d}.png").write_bytes(png(im))
    root = str(tmp_path / "ds")
    base = [f"data.root={root}", f"run.out_dir={tmp_path}/run"]
    ingest(load_config(None, base + ["data.source=folder", f"data.source_path={src}",
                                     "data.annotator_split=0", "data.test_size=4",
                                     "data.shard_size=8"]))
    samples = {}
    for e in read_manifest(root).shards("train"):
        for key, f in iter_tar(image_shard_path(root, e.name)):
            samples[key] = (decode_field("json", f["json"])["path"], int(f["cls"]))
    assert len(samples) == 20
    return root, base, str(src), samples


def cfg(base, *extra):
    return load_config(None, list(base) + list(extra))


def records(root, column, split="train"):
    """{key: sorted candidate list, or the error text} read back through the shard reader."""
    out = {}
    for e in read_manifest(root).shards(split):
        for key, f in iter_tar(column_shard_path(root, column, e.name)):
            out[key] = f["err.txt"].decode() if "err.txt" in f else \
                decode_field(CAND, f[CAND]).tolist()
    return out


def write_rows(path, rows, fmt=None):
    """rows: dicts of python values (lists for sets); CSV joins lists with '|'."""
    fmt = fmt or os.path.splitext(path)[1].lstrip(".")
    if fmt == "jsonl":
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: "|".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()})
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def expected_set(i, y):
    """The file's set for the i-th sample with true class y: {y} or {y, y+1}."""
    return sorted({y, (y + 1) % 4}) if i % 2 else [y]


# ---------------------------------------------------------------------- import
@pytest.mark.parametrize("fmt,match", [("jsonl", "key"), ("csv", "path"), ("parquet", "key"),
                                       ("parquet", "path"), ("jsonl", "path"), ("csv", "key")])
def test_import_by_key_or_source_path_in_every_format(ds, tmp_path, fmt, match, capsys):
    root, base, src, samples = ds
    keys = sorted(samples)
    rows, want = [], {}
    for i, key in enumerate(keys[:-2]):                   # the last two samples get no row
        path, y = samples[key]
        s = expected_set(i, y)
        want[key] = s
        if fmt == "parquet":           # a column of one type: indices, or names
            value = s if match == "key" else [CLASSES[c] for c in s]
        else:
            value = [CLASSES[c] if j % 2 == 0 else c for j, c in enumerate(s)]  # names and indices
            if fmt == "csv" and i == 1:
                value = json.dumps(value)      # a CSV cell may hold a JSON list too
        ident = key if match == "key" else (f"{src}/{path}" if i % 2 else f"./{path}")
        rows.append({"id": ident, "candidates": value})
    rows.append({"id": f"{src}/ghost/p999.png" if match == "path" else "ghost_key",
                 "candidates": rows[0]["candidates"]})   # matches no image sample
    f = write_rows(str(tmp_path / f"sets.{fmt}"), rows)
    c = cfg(base, f"label_import.path={f}", "label_import.column=mine", f"label_import.match={match}",
            "label_import.key_column=id", f"label_import.strip_prefix={src}/")
    report = import_column(c)
    got = records(root, "mine")
    assert sorted(got) == keys                            # every image sample has a record
    for key in keys[:-2]:
        assert got[key] == want[key], key
    assert got[keys[-1]] == got[keys[-2]] == "LabelError: no imported candidate set for this sample"
    n = report["import"]
    assert (n["matched"], n["no_row"], n["unmatched_rows"], n["rows"]) == (18, 2, 1, 19)
    assert n["unmatched_examples"] == [f"{'row' if fmt == 'parquet' else 'line'} "
                                       f"{19 if fmt != 'csv' else 20}: "
                                       + ("ghost/p999.png" if match == "path" else "ghost_key")]
    out = capsys.readouterr().out
    assert "18 with a row, 2 without a row" in out and "1 of 19 rows match no image sample" in out
    info = read_column_info(root, "mine")
    tr = info["splits"]["train"]
    assert info["complete"] and tr["n_images"] == 18 and tr["error_records"] == 2
    assert tr["avg_candidates"] == pytest.approx(sum(len(v) for v in want.values()) / 18)
    assert tr["eta"] == 0.0                               # every set holds the true class
    assert info["provenance"]["annotator"] == "import" and info["provenance"]["match"] == match
    # why samples have error records: counted per shard in the markers, summed in the report
    assert report["splits"]["train"]["labeler_stats"] == {"matched": 18, "no_row": 2,
                                                          "no_identifier": 0, "bad_row": 0}
    assert sum(json.load(open(stats_path(column_shard_path(root, "mine", e.name))))
               ["labeler_stats"]["no_row"] for e in read_manifest(root).shards("train")) == 2


def test_import_votes_and_indices_from_parquet(ds, tmp_path):
    root, base, _, samples = ds
    rows = [{"key": k, "votes": [y, y, (y + 2) % 4]} for k, (_, y) in sorted(samples.items())]
    f = write_rows(str(tmp_path / "votes.parquet"), rows)
    c = cfg(base, f"label_import.path={f}", "label_import.column=crowd",
            "label_import.labels_column=votes", "label_import.votes_column=votes",
            "label_import.labels_as=indices")
    import_column(c)
    for s in iter_joined(root, "train", ["crowd"], decode_images=False):
        y = s["cls"]
        assert s["crowd"][VOTES].tolist() == [y, y, (y + 2) % 4]
        assert s["crowd"][CAND].tolist() == sorted({y, (y + 2) % 4})     # the union of the votes
        assert s["crowd"][VOTES].dtype == np.int16


def test_bad_rows_name_the_file_the_line_and_the_value(ds, tmp_path):
    root, base, _, samples = ds
    keys = sorted(samples)
    rows = [{"key": k, "candidates": [CLASSES[samples[k][1]]]} for k in keys]
    rows[2]["candidates"] = ["cot"]                       # a typo
    rows[5]["candidates"] = [7]                           # out of range
    rows[9]["candidates"] = []                            # empty
    f = write_rows(str(tmp_path / "bad.jsonl"), rows)
    c = cfg(base, f"label_import.path={f}", "label_import.column=bad")
    with pytest.raises(ImportFileError) as exc:
        import_column(c)
    msg = str(exc.value)
    assert f"3 bad row(s) in {f} (nothing written)" in msg
    assert f"{f} line 3: unknown class 'cot' (did you mean 'coat'?)" in msg
    assert f"{f} line 6: class index 7 out of range [0, 4)" in msg
    assert f"{f} line 10: empty candidate set" in msg
    assert not os.path.exists(os.path.join(root, "columns", "bad"))
    # CSV: the same typo is named with its line (the header is line 1)
    fc = write_rows(str(tmp_path / "bad.csv"), rows[:4])
    with pytest.raises(ImportFileError, match=rf"{fc} line 4: unknown class 'cot'"):
        import_column(cfg(base, f"label_import.path={fc}", "label_import.column=bad"))
    # or: those samples get an error record, counted, and the rest is imported
    report = import_column(cfg(base, f"label_import.path={f}", "label_import.column=bad",
                               "label_import.on_bad_row=error_record"))
    assert report["import"]["bad_row"] == 3 and report["import"]["matched"] == 17
    got = records(root, "bad")
    assert got[keys[2]].startswith("LabelError: line 3 of the import file: unknown class 'cot'")
    assert read_column_info(root, "bad")["splits"]["train"]["error_records"] == 3


def test_duplicate_rows_are_named_or_joined(ds, tmp_path):
    root, base, _, samples = ds
    keys = sorted(samples)
    rows = [{"key": k, "candidates": [samples[k][1]]} for k in keys]
    rows.append({"key": keys[4], "candidates": [(samples[keys[4]][1] + 1) % 4]})
    f = write_rows(str(tmp_path / "dup.jsonl"), rows)
    with pytest.raises(ImportFileError, match=rf"1 identifier\(s\) with more than one row .*"
                                              rf"'{keys[4]}' at lines 5, 21"):
        import_column(cfg(base, f"label_import.path={f}", "label_import.column=dup"))
    import_column(cfg(base, f"label_import.path={f}", "label_import.column=dup",
                      "label_import.duplicates=union"))
    y = samples[keys[4]][1]
    assert records(root, "dup")[keys[4]] == sorted({y, (y + 1) % 4})


def test_a_changed_import_file_makes_the_column_stale(ds, tmp_path):
    root, base, _, samples = ds
    keys = sorted(samples)
    rows = [{"key": k, "candidates": [samples[k][1]]} for k in keys]
    f = write_rows(str(tmp_path / "v1.jsonl"), rows)
    opts = [f"label_import.path={f}", "label_import.column=mine"]
    import_column(cfg(base, *opts))
    tars = {e.name: open(column_shard_path(root, "mine", e.name), "rb").read()
            for e in read_manifest(root).shards("train")}
    # the same content at another path: nothing to do (the path is recorded, not hashed)
    moved = shutil.copy(f, str(tmp_path / "moved.jsonl"))
    report = import_column(cfg(base, f"label_import.path={moved}", "label_import.column=mine"))
    assert report["import"]["samples"] == 0
    assert {n: open(column_shard_path(root, "mine", n), "rb").read() for n in tars} == tars
    # one row changed: every shard is stale (refused, naming what changed), nothing rewritten
    rows[0]["candidates"] = [0, 1, 2]
    write_rows(f, rows)
    with pytest.raises(StaleColumnError, match=r"column 'mine': shard train-000000 .*"
                                               r"labeler\.file_sha256 \(was"):
        import_column(cfg(base, *opts))
    assert {n: open(column_shard_path(root, "mine", n), "rb").read() for n in tars} == tars
    st = column_status(cfg(base, *opts), "import")
    assert st["hash_checked"] and st["splits"]["train"]["stale"] == 3
    import_column(cfg(base, *opts, "annotator.overwrite=true"))
    assert records(root, "mine")[keys[0]] == [0, 1, 2]
    assert column_status(cfg(base, *opts), "import")["complete"]
    # a reading option that changes the result is part of the hash too
    with pytest.raises(StaleColumnError, match=r"labeler\.labels_as"):
        import_column(cfg(base, *opts, "label_import.labels_as=indices"))


def test_an_array_task_does_not_count_unmatched_rows_it_cannot_see(ds, tmp_path, capsys):
    root, base, _, samples = ds
    rows = [{"key": k, "candidates": [samples[k][1]]} for k in sorted(samples)]
    f = write_rows(str(tmp_path / "all.jsonl"), rows + [{"key": "ghost", "candidates": [1]}])
    opts = [f"label_import.path={f}", "label_import.column=mine"]
    n = import_column(cfg(base, *opts), task_index=0, num_tasks=2)["import"]
    assert n["unmatched_rows"] is None and n["samples"] == 12     # shards 0 and 2: 8 + 4
    assert "unmatched rows: not counted (this run met 12 of the 20 samples" in capsys.readouterr().out
    n = import_column(cfg(base, *opts), task_index=1, num_tasks=2)["import"]
    assert n["samples"] == 8 and read_column_info(root, "mine")["complete"]


def test_match_on_a_json_field_the_images_lack_is_refused_before_writing(ds, tmp_path):
    root, base, _, samples = ds
    f = write_rows(str(tmp_path / "u.jsonl"), [{"url": "http://x/1.png", "candidates": [0]}])
    with pytest.raises(FormatError, match=r"label_import\.match=url: image sample \S+ of shard "
                                          r".*train-000000\.tar has no json field 'url' "
                                          r"\(its json: \['path'\]\)"):
        import_column(cfg(base, f"label_import.path={f}", "label_import.match=url",
                          "label_import.column=u"))
    assert not os.path.exists(os.path.join(root, "columns", "u"))
    with pytest.raises(ConfigError, match="label_import.match"):
        import_column(cfg(base, f"label_import.path={f}", "label_import.match=uri"))


def test_an_imported_column_trains(ds, tmp_path):
    """The training stream reads the column: partial CE for one epoch on the imported sets; the
    samples without a row (error records) are counted as missing labels, not trained on."""
    root, base, _, samples = ds
    keys = sorted(samples)
    rows = [{"key": k, "candidates": expected_set(i, samples[k][1])} for i, k in enumerate(keys[:-3])]
    f = write_rows(str(tmp_path / "sets.jsonl"), rows)
    assert main(["import", *base, f"label_import.path={f}", "label_import.column=mine"]) == 0
    rep = train_pce_briefly(root, str(tmp_path / "train"), "mine")
    assert rep["data_errors"]["counts"].get("missing_label") == 3


# ---------------------------------------------------------------------- merge
A_SETS = {0: [0], 1: [0, 1], 2: [2], 3: [1, 3], 4: [0, 2]}          # column A: 3 votes per sample
A_VOTES = {0: [0, 0, 0], 1: [0, 1, 1], 2: [2, 2, 2], 3: [1, 3, 3], 4: [0, 2, 2]}
B_SETS = {0: [0, 1], 1: [1], 2: [3], 3: [1, 3], 4: [0]}             # column B: sets only


@pytest.fixture()
def two_columns(ds, tmp_path):
    """Column A (sets and 3 annotators' votes) and column B (sets) imported for the first five
    samples by key, the rest without a row (error records in both); sample 5 only in A."""
    root, base, _, samples = ds
    keys = sorted(samples)
    a = [{"key": keys[i], "candidates": A_SETS[i], "votes": A_VOTES[i]} for i in A_SETS]
    a.append({"key": keys[5], "candidates": [3], "votes": [3, 3, 3]})
    b = [{"key": keys[i], "candidates": B_SETS[i]} for i in B_SETS]
    fa, fb = write_rows(str(tmp_path / "a.jsonl"), a), write_rows(str(tmp_path / "b.jsonl"), b)
    import_column(cfg(base, f"label_import.path={fa}", "label_import.column=A",
                      "label_import.votes_column=votes"))
    import_column(cfg(base, f"label_import.path={fb}", "label_import.column=B"))
    return root, base, keys, fa


def merged(root, base, column, *opts):
    report = merge_columns(cfg(base, "merge.inputs=[A,B]", f"merge.column={column}", *opts))
    got = records(root, column)
    return report, got


def test_merge_union_and_inputs_with_error_records(two_columns):
    root, base, keys, _ = two_columns
    report, got = merged(root, base, "u", "merge.rule=union")
    for i in range(5):
        assert got[keys[i]] == sorted(set(A_SETS[i]) | set(B_SETS[i])), i
    assert got[keys[5]] == [3]                             # B has an error record: A alone
    assert got[keys[6]] == "LabelError: every input column has an error record (A, B)"
    m = report["merge"]
    assert (m["merged"], m["all_inputs_failed"], m["some_inputs_failed"]) == (6, 14, 1)
    info = read_column_info(root, "u")
    assert info["provenance"] == {"annotator": "merge", "inputs": ["A", "B"], "rule": "union"}
    assert info["splits"]["train"]["n_images"] == 6 and info["splits"]["train"]["error_records"] == 14
    assert info["splits"]["train"]["avg_candidates"] == pytest.approx((2 + 2 + 2 + 2 + 2 + 1) / 6)


@pytest.mark.parametrize("fallback", ["union", "first", "error"])
def test_merge_intersection_with_its_fallback(two_columns, fallback, capsys):
    root, base, keys, _ = two_columns
    report, got = merged(root, base, "i", "merge.rule=intersection", f"merge.fallback={fallback}")
    assert got[keys[0]] == [0] and got[keys[1]] == [1] and got[keys[3]] == [1, 3]
    assert got[keys[4]] == [0]                             # {0,2} & {0}
    # sample 2: {2} & {3} is empty -> the fallback
    want2 = {"union": [2, 3], "first": [2], "error": None}[fallback]
    if want2 is None:
        assert got[keys[2]] == "LabelError: empty intersection of A, B (merge.fallback=error)"
    else:
        assert got[keys[2]] == want2
    assert report["merge"]["fallbacks"] == 1
    markers = [json.load(open(stats_path(column_shard_path(root, "i", e.name))))
               for e in read_manifest(root).shards("train")]
    assert sum(m["labeler_stats"]["fallbacks"] for m in markers) == 1
    assert report["splits"]["train"]["labeler_stats"]["fallbacks"] == 1
    assert report["splits"]["train"]["labeler_stats"]["fallback_errors"] == (fallback == "error")
    out = capsys.readouterr().out
    assert "1 fell back to merge.fallback=" + fallback in out
    assert f"train: 1 of the column's {5 if fallback == 'error' else 6} merged samples took " \
           f"merge.fallback={fallback}" in out


def test_merge_vote_counts_each_annotator(two_columns):
    """A's 3 votes per sample plus B's set as one annotator's vote (4 annotators)."""
    root, base, keys, _ = two_columns
    _, got = merged(root, base, "v2", "merge.rule=vote", "merge.min_votes=2")
    # sample: A votes + B set -> counts per class
    # 0: 0,0,0 + {0,1} -> 0:4 1:1            -> [0]
    # 1: 0,1,1 + {1}   -> 0:1 1:3            -> [1]
    # 2: 2,2,2 + {3}   -> 2:3 3:1            -> [2]
    # 3: 1,3,3 + {1,3} -> 1:2 3:3            -> [1, 3]
    # 4: 0,2,2 + {0}   -> 0:2 2:2            -> [0, 2]
    assert [got[keys[i]] for i in range(5)] == [[0], [1], [2], [1, 3], [0, 2]]
    _, got = merged(root, base, "v3", "merge.rule=vote", "merge.min_votes=3")
    assert [got[keys[i]] for i in range(5)] == [[0], [1], [2], [3], [0, 2]]   # 4: union fallback
    # a fraction of the sample's annotators: 0.75 of 4 = 3 votes; sample 5 has A only (3 votes)
    _, got = merged(root, base, "vf", "merge.rule=vote", "merge.vote_fraction=0.75",
                    "merge.fallback=error")
    assert [got[keys[i]] for i in range(6)][:4] == [[0], [1], [2], [3]]
    assert got[keys[4]] == "LabelError: no class reached 0.75 of the votes (merge.fallback=error)"
    assert got[keys[5]] == [3]


def test_vote_leaves_out_abstentions(ds):
    """-1 votes (a VLM that abstained, an import row with fewer votes) count for no class and
    not as annotators; a sample where everyone abstained falls back."""
    from annotate.merge import MergeLabeler

    _, base, _, _ = ds
    lab = MergeLabeler(cfg(base, "merge.inputs=[vlm,clip]", "merge.rule=vote",
                           "merge.vote_fraction=0.5", "merge.fallback=first").merge, 4)
    vlm = {CAND: np.array([2], np.int16), VOTES: np.array([2, -1, -1], np.int16)}
    clip = {CAND: np.array([1, 2], np.int16), VOTES: np.array([1, 1, 2], np.int16)}
    classes, fell_back, _ = lab.merge_one([("vlm", vlm), ("clip", clip)], "k")
    assert classes.tolist() == [1, 2] and not fell_back        # 4 voters: 1 -> 2, 2 -> 2
    none = {CAND: np.array([3], np.int16), VOTES: np.array([-1, -1, -1], np.int16)}
    classes, fell_back, _ = lab.merge_one([("vlm", none)], "k")
    assert classes.tolist() == [3] and fell_back


def test_a_changed_input_column_makes_the_merged_column_stale(two_columns, tmp_path):
    root, base, keys, fa = two_columns
    opts = ["merge.inputs=[A,B]", "merge.column=u"]
    merge_columns(cfg(base, *opts))
    shards = [e.name for e in read_manifest(root).shards("train")]
    check_column_current(root, "u", shards)
    rows = [json.loads(l) for l in open(fa)]
    rows[0]["candidates"] = [3]
    write_rows(fa, rows)
    import_column(cfg(base, f"label_import.path={fa}", "label_import.column=A",
                      "label_import.votes_column=votes", "annotator.overwrite=true"))
    with pytest.raises(FormatError, match=r"column 'u' shard train-000000 was derived from input "
                                          r"column 'A' as it was before"):
        check_column_current(root, "u", shards)           # training refuses it
    with pytest.raises(StaleColumnError, match=r"shard train-000000 .*input_columns\.A \(was"):
        merge_columns(cfg(base, *opts))
    st = column_status(cfg(base, *opts), "merge")
    assert st["splits"]["train"]["stale"] == 3 and st["hash_checked"]
    merge_columns(cfg(base, *opts, "annotator.overwrite=true"))
    assert records(root, "u")[keys[0]] == [0, 1, 3]
    check_column_current(root, "u", shards)


def test_merge_and_import_through_the_command_line(two_columns, tmp_path, capsys):
    root, base, keys, _ = two_columns
    annotate_synthetic(cfg(base, "synthetic.q=0.3", "synthetic.eta=0.0"))
    argv = [*base, "merge.inputs=[A,synthetic]", "merge.column=AS", "merge.rule=union"]
    assert main(["merge", *argv]) == 0
    out = capsys.readouterr().out
    assert "| train | A |" in out and "| train | synthetic |" in out and "| train | **AS** |" in out
    syn = records(root, "synthetic")
    a = records(root, "A")
    got = records(root, "AS")
    for k in keys:
        want = sorted(set(syn[k]) | (set(a[k]) if isinstance(a[k], list) else set()))
        assert got[k] == want, k
    assert json.load(open(os.path.join(root, "..", "run", "merge_stats.json")))["merge"]["rule"] == "union"
    assert main(["status", *argv, "--labeler", "merge", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["complete"] and st["splits"]["train"]["done"] == 3 and st["hash_checked"]
    # bad options are named, nothing written
    assert main(["merge", *base, "merge.inputs=[A,B]", "merge.rule=majority"]) == 1
    assert "merge.rule" in capsys.readouterr().err
    assert main(["merge", *base, "merge.inputs=[A,nothing]", "merge.column=X"]) == 1
    assert "column 'nothing' has no committed shard for train-000000 (and 2 more)" in \
        capsys.readouterr().err
    assert not os.path.exists(os.path.join(root, "columns", "X"))
    assert main(["import", *base, f"label_import.path={tmp_path}/none.csv"]) == 1
    assert "import file not found" in capsys.readouterr().err
