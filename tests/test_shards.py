import json
import os

import numpy as np
import pytest

from coreg_dist.shards.format import (CAND, FormatError, column_shard_path, image_shard_path,
                                      read_manifest, stats_path)
from coreg_dist.shards.reader import ErrorLog, KeyMismatchError, iter_joined, iter_tar
from coreg_dist.shards.writer import ShardWriter
from tests.helpers import make_dataset, png


def write_column(root, shard, keys, cands, column="lab"):
    with ShardWriter(column_shard_path(root, column, shard)) as w:
        for k, c in zip(keys, cands):
            w.write(k, {CAND: np.array(c, dtype=np.int16)})
    w.commit({})


def shard_keys(root, shard):
    return [k for k, _ in iter_tar(image_shard_path(root, shard))]


def test_round_trip_and_join(tmp_path):
    root = str(tmp_path)
    m = make_dataset(root)
    m2 = read_manifest(root)
    assert m2.classes == m.classes and m2.count("train") == 40 and len(m2.shards("train")) == 3
    for e in m2.shards("train"):
        keys = shard_keys(root, e.name)
        write_column(root, e.name, keys, [[i % 4] for i in range(len(keys))])
    samples = list(iter_joined(root, "train", ["lab"]))
    assert len(samples) == 40
    assert [s["key"] for s in samples] == sorted(s["key"] for s in samples)
    s = samples[5]
    assert s["image"].size == (16, 16) and 0 <= s["cls"] < 4
    assert s["lab"][CAND].dtype == np.int16 and s["lab"][CAND].tolist() == [5 % 16 % 4]
    # stats marker written beside the shard
    assert json.load(open(stats_path(image_shard_path(root, "train-000000"))))["n"] == 16


def test_key_mismatch_fails_loudly(tmp_path):
    root = str(tmp_path)
    make_dataset(root, n_train=16)
    keys = shard_keys(root, "train-000000")
    keys[3], keys[4] = keys[4], keys[3]
    write_column(root, "train-000000", keys, [[0]] * len(keys))
    with pytest.raises(KeyMismatchError, match=r"position 3 .*train_00003"):
        list(iter_joined(root, "train", ["lab"]))


def test_missing_column_shard_names_file(tmp_path):
    root = str(tmp_path)
    make_dataset(root, n_train=16)
    with pytest.raises(FormatError, match=r"columns/lab/train-000000.tar"):
        list(iter_joined(root, "train", ["lab"]))


def test_truncated_tar_reported_and_run_goes_on(tmp_path):
    root = str(tmp_path)
    make_dataset(root, n_train=40)
    path = image_shard_path(root, "train-000000")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    errors = ErrorLog(stream=open(os.devnull, "w"))
    samples = list(iter_joined(root, "train", errors=errors))
    assert errors.counts == {"truncated_shard": 1}
    ex = errors.examples[0]
    assert ex["shard"] == "train-000000" and ex["key"].startswith("train_")
    # the damaged shard yields what it holds; the two intact shards are read in full
    assert 24 < len(samples) < 40
    assert sum(s["shard"] != "train-000000" for s in samples) == 24


def test_corrupt_image_counted_and_skipped(tmp_path):
    root = str(tmp_path)
    make_dataset(root, n_train=16, shard_size=16)
    path = image_shard_path(root, "train-000000")
    items = list(iter_tar(path))
    with ShardWriter(path) as w:
        for i, (k, f) in enumerate(items):
            if i == 7:
                f = {"png": b"\x89PNG\r\n\x1a\n garbage", "cls": f["cls"]}
            w.write(k, f)
    errors = ErrorLog(stream=open(os.devnull, "w"))
    samples = list(iter_joined(root, "train", errors=errors))
    assert len(samples) == 15 and errors.counts == {"corrupt_image": 1}
    assert errors.examples[0]["key"] == "train_00007" and errors.examples[0]["shard"] == "train-000000"


def test_writer_is_atomic_on_error(tmp_path):
    path = str(tmp_path / "x" / "train-000000.tar")
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as w:
            w.write("a_1", {"png": png(np.zeros((4, 4), np.uint8))})
            raise RuntimeError("boom")
    assert not os.path.exists(path)
    assert os.listdir(os.path.dirname(path)) == []


def test_bad_key_rejected(tmp_path):
    with ShardWriter(str(tmp_path / "s.tar")) as w:
        with pytest.raises(FormatError, match="invalid sample key"):
            w.write("has.dot", {"cls": 1})


def test_manifest_version_checked(tmp_path):
    root = str(tmp_path)
    make_dataset(root, n_train=4, n_test=4)
    p = os.path.join(root, "manifest.json")
    d = json.load(open(p))
    d["version"] = 99
    json.dump(d, open(p, "w"))
    with pytest.raises(FormatError, match="'version'"):
        read_manifest(root)
