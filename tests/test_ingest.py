import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from coreg_dist.config import load_config
from coreg_dist.data.ingest import ingest, read_idx
from coreg_dist.shards.format import FormatError, read_manifest
from coreg_dist.shards.reader import iter_joined
from coreg_dist.shards.writer import ShardWriter


def write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def tiny_fmnist(folder, n_train=30, n_test=10):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), imgs)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
        data[prefix] = (imgs, labels)
    return data


def test_read_idx_checks_header(tmp_path):
    p = str(tmp_path / "x.gz")
    write_idx(p, np.arange(12).reshape(3, 4))
    assert read_idx(p).tolist() == np.arange(12).reshape(3, 4).tolist()
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 2]) + struct.pack(">II", 3, 4) + b"\x00" * 5)
    with pytest.raises(FormatError, match="header says"):
        read_idx(p)


def test_ingest_idx_splits_and_pixels(tmp_path):
    src = str(tmp_path / "src")
    data = tiny_fmnist(src)
    cfg = load_config(None, [f"data.root={tmp_path}/ds", f"data.source_path={src}",
                             "data.annotator_split=5", "data.shard_size=8", "run.seed=3"])
    m = ingest(cfg)
    assert m.count("train") == 25 and m.count("annotator") == 5 and m.count("test") == 10
    seen = {}
    for split in ("train", "annotator", "test"):
        for s in iter_joined(cfg.data.root, split):
            seen[s["key"]] = split
            part, idx = s["key"].split("_")[1], int(s["key"].split("_")[2])
            imgs, labels = data["train" if part == "train" else "t10k"]
            assert np.array_equal(np.asarray(s["image"]), imgs[idx])   # PNG is lossless
            assert s["cls"] == labels[idx]
    assert len(seen) == 40   # disjoint splits, nothing lost
    # deterministic and idempotent: a second call finds the same dataset
    m2 = ingest(cfg)
    assert read_manifest(cfg.data.root).splits == m.splits == m2.splits
    # another seed on the same root is refused rather than mixed in
    with pytest.raises(FormatError, match="other ingest parameters"):
        ingest(load_config(None, [f"data.root={tmp_path}/ds", f"data.source_path={src}",
                                  "data.annotator_split=5", "data.shard_size=8", "run.seed=4"]))


def test_ingest_folder_tree(tmp_path):
    src = tmp_path / "pets"
    rng = np.random.default_rng(1)
    for cname, n in (("cat", 12), ("dog", 9)):
        (src / cname / "sub").mkdir(parents=True)
        for i in range(n):
            img = Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8))
            ext = "png" if i % 2 else "jpg"
            img.save(src / cname / ("sub" if i % 3 == 0 else "") / f"im.{i}.{ext}")
    (src / "cat" / "notes.txt").write_text("not an image")
    cfg = load_config(None, [f"data.root={tmp_path}/ds", "data.source=folder",
                             f"data.source_path={src}", "data.annotator_split=4",
                             "data.test_size=3", "data.shard_size=5"])
    m = ingest(cfg)
    assert m.classes == ["cat", "dog"]
    assert (m.count("train"), m.count("annotator"), m.count("test")) == (14, 4, 3)
    samples = [s for sp in ("train", "annotator", "test") for s in iter_joined(cfg.data.root, sp)]
    assert len({s["key"] for s in samples}) == 21
    jpgs = [s for s in samples if s["image_ext"] == "jpg"]
    assert jpgs and all(s["image"].format == "JPEG" for s in jpgs)   # bytes stored as they came


def test_ingest_wds_unlabeled(tmp_path):
    src = tmp_path / "web"
    src.mkdir()
    rng = np.random.default_rng(2)
    import io
    for s in range(2):
        with ShardWriter(str(src / f"{s:05d}.tar")) as w:
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
                w.write(f"{s:05d}{i:04d}", {"jpg": buf.getvalue(), "txt": "a caption"})
    cfg = load_config(None, [f"data.root={tmp_path}/ds", "data.source=wds",
                             f"data.source_path={src}", "data.annotator_split=0",
                             "data.classes=[cat,dog]"])
    m = ingest(cfg)
    assert m.classes == ["cat", "dog"] and m.count("train") == 12
    assert all(s["cls"] == -1 for s in iter_joined(cfg.data.root, "train"))
    with pytest.raises(FormatError, match="data.classes"):
        ingest(load_config(None, [f"data.root={tmp_path}/ds2", "data.source=wds",
                                  f"data.source_path={src}", "data.annotator_split=0"]))
