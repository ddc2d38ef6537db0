"""Ingest at scale: keys from the source, broken files named by path, incremental re-ingest,
streamed WebDataset (img2dataset) sources, array tasks and worker processes."""
import hashlib
import io
import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from coreg_dist.config import load_config
from coreg_dist.data.ingest import assign_split, ingest, split_rank
from coreg_dist.data.ingest_jobs import folder_key
from coreg_dist.data_cli import main as data_main
from coreg_dist.shards.format import FormatError, image_shard_path, read_manifest, stats_path
from coreg_dist.shards.reader import iter_tar


def jpeg(rng, w=12, h=10, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png(rng, w=9, h=7) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def folder_cfg(tmp_path, src, root="ds", *extra):
    return load_config(None, [f"data.root={tmp_path}/{root}", "data.source=folder",
                              f"data.source_path={src}", "data.annotator_split=2",
                              "data.test_size=2", "data.shard_size=4", "run.seed=5", *extra])


def wds_cfg(tmp_path, src, root="ds", *extra):
    # img2dataset output as it is: nothing beyond the source and the class names
    return load_config(None, [f"data.root={tmp_path}/{root}", "data.source=wds",
                              f"data.source_path={src}", "data.classes=[cat,dog]", *extra])


def samples(root):
    """{key: (split, shard, {field: bytes})} of every shard the manifest lists."""
    m = read_manifest(root)
    out = {}
    for split in m.splits:
        for e in m.shards(split):
            for key, fields in iter_tar(image_shard_path(root, e.name)):
                assert key not in out
                out[key] = (split, e.name, fields)
    return out


def shard_bytes(root):
    m = read_manifest(root)
    return {e.name: open(image_shard_path(root, e.name), "rb").read()
            for split in m.splits for e in m.shards(split)}


def good_tree(src, rng, per_class=6, classes=("cat", "dog")):
    rels = []
    for c in classes:
        (src / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{c}/{c}.{i}.{'jpg' if i % 2 else 'png'}"
            (src / rel).write_bytes(jpeg(rng) if i % 2 else png(rng))
            rels.append(rel)
    return rels


# ---------------------------------------------------------------------------- broken files
def test_folder_broken_files_are_named_by_path_and_counted(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "pets"
    good = good_tree(src, rng)
    (src / "cat" / "sub").mkdir()
    (src / "cat" / "sub" / "with caption.jpg").write_bytes(jpeg(rng))
    (src / "cat" / "sub" / "with caption.txt").write_text("a grey cat on a sofa")
    good.append("cat/sub/with caption.jpg")
    whole = jpeg(rng, 64, 64)
    broken = {"cat/truncated.jpg": ("corrupt_image", whole[: len(whole) // 2]),
              "dog/noise.png": ("corrupt_image", rng.bytes(300)),
              "dog/zero.jpg": ("empty_file", b""),
              "cat/readme.jpg": ("corrupt_image", b"this is a text file, not a picture\n")}
    for rel, (_, data) in broken.items():
        (src / rel).write_bytes(data)
    os.symlink(tmp_path / "nowhere.jpg", src / "dog" / "dangling.jpg")   # listed, cannot be read
    broken["dog/dangling.jpg"] = ("unreadable_file", None)
    (src / "dog" / "notes.md").write_text("not an image")
    (src / "dog" / "._dog.0.png").write_bytes(b"macOS resource fork")  # hidden: skipped

    m = ingest(folder_cfg(tmp_path, src))
    errors = m.source["errors"]
    assert errors["counts"] == {"corrupt_image": 3, "empty_file": 1, "unreadable_file": 1}
    assert errors["total"] == 5
    assert {e["path"]: e["kind"] for e in errors["examples"]} == {r: k for r, (k, _) in broken.items()}
    for e in errors["examples"]:
        assert "0x" not in e["reason"] and "BytesIO" not in e["reason"], e   # no object reprs
    readme = next(e for e in errors["examples"] if e["path"] == "cat/readme.jpg")
    assert "UnidentifiedImageError" in readme["reason"] and "cat/readme.jpg" in readme["reason"]
    assert "truncated" in next(e["reason"] for e in errors["examples"] if e["path"] == "cat/truncated.jpg")

    got = samples(str(tmp_path / "ds"))
    paths = {json.loads(f["json"])["path"]: k for k, (_, _, f) in got.items()}
    assert set(paths) == set(good)                                 # every good image, no broken one
    assert all(k == folder_key(p) for p, k in paths.items())       # the documented key rule
    assert folder_key("cat/sub/with caption.jpg") == (
        "with_caption-" + hashlib.sha256(b"cat/sub/with caption.jpg").hexdigest()[:16])
    cap = got[folder_key("cat/sub/with caption.jpg")][2]
    assert cap["txt"] == b"a grey cat on a sofa"                   # the sidecar caption
    assert sum(m.count(s) for s in m.splits) == len(good)
    assert m.source["ignored_files"] == 1                          # notes.md
    out = capsys.readouterr().out
    assert "5 source problems" in out
    assert all(rel in out for rel in broken)                       # the summary names them

    # keep_broken: undecodable bytes stay in the shards, still named and counted
    m2 = ingest(folder_cfg(tmp_path, src, "kept", "data.keep_broken=true"))
    assert m2.source["errors"]["total"] == 5
    assert sum(m2.count(s) for s in m2.splits) == len(good) + 4    # not the unreadable one
    kept = {json.loads(f["json"])["path"] for _, _, f in samples(str(tmp_path / "kept")).values()}
    assert set(broken) - kept == {"dog/dangling.jpg"}


def test_empty_class_folder_is_named(tmp_path, capsys):
    rng = np.random.default_rng(1)
    src = tmp_path / "pets"
    good_tree(src, rng, per_class=3)
    (src / "empty").mkdir()
    (src / "empty" / "notes.txt").write_text("nothing here yet")
    (src / "ghost").mkdir()
    (src / "ghost" / "only.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    cfg = folder_cfg(tmp_path, src, "ds", "data.annotator_split=0", "data.test_size=1")
    with pytest.raises(FormatError, match=r"'empty'.*has no image files.*allow_empty_classes"):
        ingest(cfg)
    assert not os.path.exists(tmp_path / "ds" / "images")           # stopped before writing

    shutil.rmtree(src / "empty")
    # a class whose every image is broken is found once read: the shards stay, no manifest
    with pytest.raises(FormatError, match=r"'ghost'.*no decodable image"):
        ingest(cfg)
    assert not os.path.exists(tmp_path / "ds" / "manifest.json")
    written = sorted(os.listdir(tmp_path / "ds" / "images"))
    assert any(n.endswith(".stats.json") for n in written)

    m = ingest(folder_cfg(tmp_path, src, "ds", "data.annotator_split=0", "data.test_size=1",
                          "data.allow_empty_classes=true"))
    assert sorted(os.listdir(tmp_path / "ds" / "images")) == written   # nothing re-read or added
    assert m.classes == ["cat", "dog", "ghost"] and m.source["empty_classes"] == ["ghost"]
    assert m.source["per_class"] == {"cat": 3, "dog": 3, "ghost": 0}
    assert m.source["errors"]["examples"][0]["path"] == "ghost/only.jpg"
    assert "ghost" in capsys.readouterr().err                      # the warning


# ---------------------------------------------------------------------------- incremental
def test_reingest_of_a_grown_folder_keeps_shards_keys_and_splits(tmp_path, capsys):
    rng = np.random.default_rng(2)
    src = tmp_path / "pets"
    good_tree(src, rng, per_class=10)
    cfg = folder_cfg(tmp_path, src, "ds", "data.annotator_split=3", "data.test_size=3")
    root = str(tmp_path / "ds")
    m1 = ingest(cfg)
    assert (m1.count("test"), m1.count("annotator"), m1.count("train")) == (3, 3, 14)
    before = shard_bytes(root)
    split1 = {k: s for k, (s, _, _) in samples(root).items()}

    added = []
    for i in range(7):
        rel = f"{'cat' if i % 2 else 'dog'}/new.{i}.jpg"
        (src / rel).write_bytes(jpeg(rng))
        added.append(rel)
    (src / "dog" / "later").mkdir()
    (src / "dog" / "later" / "x.png").write_bytes(png(rng))
    added.append("dog/later/x.png")
    os.remove(src / "cat" / "cat.3.jpg")                          # removed from the source
    capsys.readouterr()
    m2 = ingest(cfg)

    for name, data in before.items():                              # old shards byte for byte
        assert open(image_shard_path(root, name), "rb").read() == data
    got = samples(root)
    split2 = {k: s for k, (s, _, _) in got.items()}
    assert all(split2[k] == s for k, s in split1.items())          # every key kept, same split
    assert set(split2) - set(split1) == {folder_key(r) for r in added}
    new_shards = {n for _, n, _ in got.values()} - set(before)
    assert new_shards and {got[folder_key(r)][1] for r in added} <= new_shards
    bounds = {k: (None if v is None else int(v, 16)) for k, v in m2.source["split_bounds"].items()}
    for r in added:                                                # the first ingest's bounds
        assert split2[folder_key(r)] == assign_split(split_rank(5, folder_key(r)), bounds)
    assert m2.source["removed"]["examples"] == ["cat/cat.3.jpg"]
    assert folder_key("cat/cat.3.jpg") in split2                   # its sample is kept
    err = capsys.readouterr().err
    assert "no longer in the source" in err and "cat/cat.3.jpg" in err

    # nothing new: nothing written, manifest.json untouched
    after = shard_bytes(root)
    mtime = os.stat(os.path.join(root, "manifest.json")).st_mtime_ns
    ingest(cfg)
    assert os.stat(os.path.join(root, "manifest.json")).st_mtime_ns == mtime
    assert "up to date" in capsys.readouterr().out

    # real parameter changes are refused and named; a new class folder too
    with pytest.raises(FormatError, match=r"other ingest parameters.*seed: 5 -> 6"):
        ingest(folder_cfg(tmp_path, src, "ds", "data.annotator_split=3", "data.test_size=3",
                          "run.seed=6"))
    (src / "bird").mkdir()
    (src / "bird" / "b.jpg").write_bytes(jpeg(rng))
    with pytest.raises(FormatError, match=r"'?bird'?.*new class"):
        ingest(cfg)
    assert shard_bytes(root) == after and read_manifest(root).splits == m2.splits


# ---------------------------------------------------------------------------- WebDataset / img2dataset
def img2dataset_dir(folder, rng, shards=3, per_shard=5, size=(16, 12), bad=()):
    """What `img2dataset --output_format webdataset` writes: NNNNN.tar with <key>.jpg/.txt/.json
    (key = shard digits + sample digits), NNNNN_stats.json, NNNNN.parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for s in range(shards):
        rows = []
        with open(folder / f"{s:05d}.tar", "wb") as f:
            tw = wds.TarWriter(f)
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                data = jpeg(rng, *size)
                if (s, i) in bad:
                    data = data[:40]
                caption = f"a photo number {i} of shard {s}"
                meta = {"url": f"https://example.com/img/{key}.jpg", "caption": caption, "key": key,
                        "status": "success", "error_message": None, "width": size[0],
                        "height": size[1], "original_width": 640, "original_height": 480,
                        "exif": "{}", "sha256": hashlib.sha256(data).hexdigest()}
                tw.write({"__key__": key, "jpg": data, "txt": caption,
                          "json": json.dumps(meta, indent=4)})
                rows.append(meta)
                expected[key] = (caption, meta)
            tw.close()
        json.dump({"count": per_shard, "successes": per_shard, "failed_to_download": 0,
                   "failed_to_resize": 0, "duration": 0.5, "status_dict": {"success": per_shard}},
                  open(folder / f"{s:05d}_stats.json", "w"))
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(rows), str(folder / f"{s:05d}.parquet"))
        except ImportError:
            pass
    return expected


def test_img2dataset_output_ingests_as_is(tmp_path, capsys):
    rng = np.random.default_rng(3)
    src = tmp_path / "laion"
    expected = img2dataset_dir(src, rng, bad={(1, 1)})
    # a truncated source tar: named with its last good key, the other shards go on. The sample
    # before the damage is lost too: its members might have continued after it.
    data = open(src / "00001.tar", "rb").read()
    cut = data.index(b"000010004.jpg")                  # inside the 5th sample's image
    open(src / "00001.tar", "wb").write(data[:cut + 600])
    m = ingest(wds_cfg(tmp_path, src))
    root = str(tmp_path / "ds")
    assert [e.name for e in m.shards("train")] == ["train-000000", "train-000001", "train-000002"]
    got = samples(root)
    want = set(expected) - {"000010001", "000010003", "000010004"}
    assert set(got) == want                             # keys: the source __key__ as it was
    for key, (_, _, f) in got.items():
        caption, meta = expected[key]
        assert f["txt"].decode() == caption             # the caption as it came
        j = json.loads(f["json"])
        assert j["source"] == f"{key[:5]}.tar" and j["key"] == key
        assert j["src"] == meta                         # the source json, all of it
        assert "cls" not in f
    errors = m.source["errors"]
    assert errors["counts"] == {"corrupt_image": 1, "truncated_shard": 1}
    bad = next(e for e in errors["examples"] if e["kind"] == "corrupt_image")
    assert bad["path"] == "00001.tar:000010001.jpg" and bad["key"] == "000010001"
    trunc = next(e for e in errors["examples"] if e["kind"] == "truncated_shard")
    assert trunc["path"] == "00001.tar" and trunc["last_good_key"] == "000010002"
    out = capsys.readouterr().out
    assert "00001.tar:000010001.jpg" in out and "last good key '000010002'" in out

    # the source grows by one shard: only it is read, the others stay byte for byte
    before = shard_bytes(root)
    extra = img2dataset_dir(tmp_path / "more", np.random.default_rng(9), shards=4)
    for suffix in (".tar", "_stats.json"):
        shutil.copy(tmp_path / "more" / f"00003{suffix}", src / f"00003{suffix}")
    m2 = ingest(wds_cfg(tmp_path, src))
    assert [e.name for e in m2.shards("train")][-1] == "train-000003"
    assert all(open(image_shard_path(root, n), "rb").read() == b for n, b in before.items())
    assert set(samples(root)) == want | {k for k in extra if k.startswith("00003")}


def test_wds_ingest_streams_in_bounded_memory(tmp_path):
    """Peak Python memory of an in-process ingest stays far below the source's size: one sample
    at a time is held, never a shard or the whole source."""
    rng = np.random.default_rng(4)
    src = tmp_path / "big"
    img2dataset_dir(src, rng, shards=3, per_shard=30, size=(256, 192))   # noise JPEGs, ~45 KB each
    total = sum(os.path.getsize(src / f"{s:05d}.tar") for s in range(3))
    # warm the imports (their allocations are not the ingest's) on a one-sample source
    small = tmp_path / "small"
    img2dataset_dir(small, rng, shards=1, per_shard=1)
    ingest(wds_cfg(tmp_path, small, "warm"))
    tracemalloc.start()
    try:
        m = ingest(wds_cfg(tmp_path, src))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert m.count("train") == 90 and total > 3_500_000
    largest = max(len(f["jpg"]) for _, f in iter_tar(str(src / "00000.tar")))
    # measured: about 0.55-0.75 MB whatever the source's size (decode buffers, bookkeeping)
    assert peak < total / 4 and peak < 25 * largest, (peak, total, largest)


def test_wds_keys_repeating_across_shards(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "handmade"
    src.mkdir()
    for name in ("a", "b"):
        with open(src / f"{name}.tar", "wb") as f:
            tw = wds.TarWriter(f)
            for i in range(3):
                tw.write({"__key__": f"img/{i}", "png": png(rng)})   # '/': sanitized
            tw.close()
    with pytest.raises(FormatError, match=r"key 'img_0-[0-9a-f]{8}' is in shards train-a and train-b"
                                          r".*wds_shard_in_key=true"):
        ingest(wds_cfg(tmp_path, src))
    m = ingest(wds_cfg(tmp_path, src, "ds2", "data.wds_shard_in_key=true"))
    keys = set(samples(str(tmp_path / "ds2")))
    assert m.count("train") == 6 and {k.split("_img")[0] for k in keys} == {"a", "b"}


# ---------------------------------------------------------------------------- tasks, workers
def test_array_tasks_equal_one_task(tmp_path, capsys):
    rng = np.random.default_rng(6)
    src = tmp_path / "laion"
    img2dataset_dir(src, rng, shards=5, per_shard=4)
    one = ingest(wds_cfg(tmp_path, src, "one"))
    cfg = wds_cfg(tmp_path, src, "two")
    assert ingest(cfg, task_index=0, num_tasks=2) is None          # not the last: no manifest
    assert not os.path.exists(tmp_path / "two" / "manifest.json")
    with pytest.raises(FormatError,
                       match=r"2 of 5 source shard\(s\) not ingested yet \(00001.tar, 00003.tar"):
        ingest(cfg, finalize_only=True)
    # task 1 through the command line, as a SLURM array task would run it
    args = ["ingest", f"data.root={tmp_path}/two", "data.source=wds", f"data.source_path={src}",
            "data.classes=[cat,dog]"]
    assert data_main(args + ["--task-index", "1", "--num-tasks", "2"]) == 0
    two = read_manifest(str(tmp_path / "two"))
    assert two.to_json() == one.to_json()                          # the same manifest, derived
    assert shard_bytes(str(tmp_path / "two")) == shard_bytes(str(tmp_path / "one"))
    assert data_main(args + ["--finalize"]) == 0                   # idempotent


def test_worker_processes_write_the_same_shards(tmp_path):
    rng = np.random.default_rng(7)
    src = tmp_path / "pets"
    good_tree(src, rng, per_class=9)
    (src / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    web = tmp_path / "laion"
    img2dataset_dir(web, rng, shards=3, per_shard=4, bad={(2, 1)})
    for make in (lambda root, *x: folder_cfg(tmp_path, src, root, *x),
                 lambda root, *x: wds_cfg(tmp_path, web, root, *x)):
        m0 = ingest(make("w0", "data.ingest_workers=0"))
        m2 = ingest(make("w2", "data.ingest_workers=2"))
        assert m2.to_json() == m0.to_json()
        assert shard_bytes(str(tmp_path / "w2")) == shard_bytes(str(tmp_path / "w0"))
        marker = json.load(open(stats_path(image_shard_path(str(tmp_path / "w2"),
                                                            m2.shards("train")[0].name))))
        assert marker["sha256"] == hashlib.sha256(
            open(image_shard_path(str(tmp_path / "w2"), m2.shards("train")[0].name), "rb").read()).hexdigest()
        shutil.rmtree(tmp_path / "w0")
        shutil.rmtree(tmp_path / "w2")


def test_folder_ingest_resumes_after_a_crash_and_retries_a_fixed_file(tmp_path, capsys):
    rng = np.random.default_rng(8)
    src = tmp_path / "pets"
    good_tree(src, rng, per_class=8)
    (src / "dog" / "bad.jpg").write_bytes(b"not yet a jpeg")
    cfg = folder_cfg(tmp_path, src)
    root = str(tmp_path / "ds")
    m1 = ingest(cfg)
    assert [e["path"] for e in m1.source["errors"]["examples"]] == ["dog/bad.jpg"]
    split1 = {k: s for k, (s, _, _) in samples(root).items()}

    # unchanged, the broken file is not read again; once replaced, it is
    assert ingest(cfg).source["errors"]["total"] == 1
    (src / "dog" / "bad.jpg").write_bytes(jpeg(rng))
    m2 = ingest(cfg)
    assert m2.source["errors"]["total"] == 0
    split2 = {k: s for k, (s, _, _) in samples(root).items()}
    assert set(split2) == set(split1) | {folder_key("dog/bad.jpg")}

    # a crash: the manifest and the last train shard's marker never got written
    last = m2.shards("train")[-1].name
    os.remove(os.path.join(root, "manifest.json"))
    os.remove(stats_path(image_shard_path(root, last)))
    capsys.readouterr()
    m3 = ingest(cfg)
    assert "to read" in capsys.readouterr().out
    split3 = {k: s for k, (s, _, _) in samples(root).items()}
    assert split3 == split2                                          # same keys, same splits
    assert sum(m3.count(s) for s in m3.splits) == len(split2)
    assert m3.source["split_bounds"] == m1.source["split_bounds"]    # kept by the markers
