"""The annotation path end to end on a tiny random CLIP: image shards -> label column shards."""
import json
import os

import numpy as np
import pytest
import torch
from transformers import CLIPProcessor

from annotate.cli import annotate_clip
from annotate.embedded_clip import build_clip_model, build_clip_tokenizer, build_image_processor
from coreg_dist.config import CLIP_TEMPLATES_27, EmbeddedClipConfig, load_config
from coreg_dist.labels import union_argmax
from coreg_dist.shards.format import (CAND, TOPI, TOPP, VOTES, column_shard_path, image_shard_path,
                                      read_column_info, stats_path)
from coreg_dist.shards.reader import ErrorLog, iter_joined, iter_tar
from coreg_dist.shards.writer import ShardWriter
from coreg_dist.labels import expand_top_few
from tests.helpers import make_dataset

TEMPLATES = CLIP_TEMPLATES_27[:4]


@pytest.fixture()
def setup(tmp_path):
    root = str(tmp_path / "ds")
    m = make_dataset(root, n_train=40, n_test=12, num_classes=4, shard_size=16, size=28)
    torch.manual_seed(0)
    clip_dir = str(tmp_path / "clip")
    tok = build_clip_tokenizer([t.format(c) for t in CLIP_TEMPLATES_27 for c in m.classes])
    cfg = EmbeddedClipConfig(vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                             projection_dim=16)
    build_clip_model(cfg, tok).save_pretrained(clip_dir)
    CLIPProcessor(image_processor=build_image_processor(28, [0.3] * 3, [0.3] * 3),
                  tokenizer=tok).save_pretrained(clip_dir)
    overrides = [f"data.root={root}", f"run.out_dir={tmp_path}/run", f"annotator.model={clip_dir}",
                 "annotator.batch_size=8", "annotator.store_topk=3",
                 "annotator.templates=[" + ",".join(f"'{t}'" for t in TEMPLATES) + "]"]
    return root, overrides, tmp_path


def test_annotate_writes_aligned_columns_and_stats(setup):
    root, overrides, tmp = setup
    report = annotate_clip(load_config(None, overrides), "cpu")
    for k in ("n_images", "zero_shot_acc", "template_avg_acc", "avg_candidates", "eta"):
        assert k in report
    assert report["n_images"] == 40 and 0 <= report["eta"] <= 1
    assert 1.0 <= report["avg_candidates"] <= len(TEMPLATES)
    saved = json.load(open(tmp / "run" / "annotation_stats.json"))
    assert saved["splits"]["test"]["n_images"] == 12
    samples = list(iter_joined(root, "train", ["clip"]))
    assert len(samples) == 40
    for s in samples:
        col = s["clip"]
        assert col[VOTES].shape == (4,) and col[TOPI].shape == (4, 3) and col[TOPP].dtype == np.float16
        # the stored set is exactly the union of the stored votes, re-derivable from top-k
        assert col[CAND].tolist() == sorted(set(col[VOTES].tolist()))
        dense = expand_top_few(col[TOPI][None], col[TOPP][None], 4)
        assert np.flatnonzero(union_argmax(dense)[0]).tolist() == col[CAND].tolist()
    info = read_column_info(root, "clip")
    assert info["complete"] and info["provenance"]["rule"] == "union_argmax"
    assert info["provenance"]["templates"] == TEMPLATES


def test_rerun_skips_committed_shards_and_redoes_missing(setup):
    root, overrides, _ = setup
    cfg = load_config(None, overrides)
    annotate_clip(cfg, "cpu")
    done = column_shard_path(root, "clip", "train-000000")
    redo = column_shard_path(root, "clip", "train-000001")
    mtime = os.path.getmtime(done)
    before = open(redo, "rb").read()
    os.unlink(stats_path(redo))             # as if killed before the commit marker
    annotate_clip(cfg, "cpu")
    assert os.path.getmtime(done) == mtime  # untouched
    assert os.path.isfile(stats_path(redo)) and open(redo, "rb").read() == before  # same bytes


def test_corrupt_image_keeps_alignment(setup, capsys):
    root, overrides, _ = setup
    path = image_shard_path(root, "train-000000")
    items = list(iter_tar(path))
    with ShardWriter(path) as w:
        for i, (k, f) in enumerate(items):
            w.write(k, {"png": b"not a png", "cls": f["cls"]} if i == 2 else f)
    report = annotate_clip(load_config(None, overrides), "cpu")
    assert report["errors"]["counts"] == {"corrupt_image": 1}
    assert report["errors"]["examples"][0]["key"] == "train_00002"
    assert "train_00002" in capsys.readouterr().err
    col = [k for k, _ in iter_tar(column_shard_path(root, "clip", "train-000000"))]
    assert col == [k for k, _ in items]     # 1:1 with the image shard, error record included
    errors = ErrorLog(stream=open(os.devnull, "w"))
    assert len(list(iter_joined(root, "train", ["clip"], errors=errors))) == 39


def test_dead_model_path_is_a_clear_error(setup):
    root, overrides, tmp = setup
    from annotate.clip_scorer import ClipLoadError
    with pytest.raises(ClipLoadError, match="nowhere"):
        annotate_clip(load_config(None, overrides + [f"annotator.model={tmp}/nowhere"]), "cpu")
