"""The annotation fleet end to end, as the README shows it, through the command lines:

    a folder of images (one of them broken)
      -> coreg-data ingest                 keys from the paths, the broken file named
      -> coreg-annotate clip               a tiny random CLIP, 4 templates
      -> coreg-annotate vlm                a vLLM-compatible server (the fake; the real one:
                                           tests/test_vllm_real.py), choosing among CLIP's top-2
      -> coreg-annotate merge              CLIP's set intersected with the VLM's answers
      -> coreg-train                       partial CE on the merged column
"""
import os

import numpy as np

from annotate.cli import main as annotate_main
from annotate.fake_vllm import FakeVllm
from coreg_dist.data_cli import main as data_main
from coreg_dist.labels import expand_top_few
from coreg_dist.shards.format import column_shard_path, read_column_info, read_manifest
from coreg_dist.shards.reader import decode_field, iter_tar
from tests.helpers import class_images, make_tiny_clip, png, train_pce_briefly

CLASSES = ["boot", "coat", "dress", "shirt"]
TEMPLATES = "annotator.templates=['a photo of a {}','a dark photo of the {}','a rendition of a {}','a photo of my {}']"


def column(root, name, split="train"):
    """{key: {field: value}} of a column, or the error text for an error record."""
    out = {}
    for e in read_manifest(root).shards(split):
        for key, f in iter_tar(column_shard_path(root, name, e.name)):
            out[key] = f["err.txt"].decode() if "err.txt" in f else \
                {n: decode_field(n, b) for n, b in f.items()}
    return out


def test_ingest_clip_vlm_merge_train(tmp_path, capsys):
    src = tmp_path / "photos"
    imgs, labels = class_images(40, 4, size=28, seed=5)
    for i, (im, y) in enumerate(zip(imgs, labels)):
        os.makedirs(src / CLASSES[y], exist_ok=True)
        (src / CLASSES[y] / f"img {i:03d}.png").write_bytes(png(np.stack([im] * 3, -1)))
    (src / "coat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 a JPEG cut short")
    root, run = str(tmp_path / "ds"), str(tmp_path / "run")
    base = [f"data.root={root}", f"run.out_dir={run}", "run.threads=1"]

    assert data_main(["ingest", *base, "data.source=folder", f"data.source_path={src}",
                      "data.annotator_split=0", "data.test_size=8", "data.shard_size=8"]) == 0
    out = capsys.readouterr().out
    assert "coat/broken.jpg" in out                     # named by its path, not by a key
    m = read_manifest(root)
    assert m.classes == CLASSES and m.count("train") + m.count("test") == 40

    clip = make_tiny_clip(str(tmp_path / "clip"), CLASSES)
    assert annotate_main(["clip", *base, f"annotator.model={clip}", TEMPLATES,
                          "annotator.store_topk=4", "annotator.batch_size=16"]) == 0

    with FakeVllm(served_model_name="llava") as server:
        vlm = [f"vlm.urls=[{server.url}]", "vlm.model=llava", "vlm.mode=topk", "vlm.topk=2",
               "vlm.candidates_column=clip", "vlm.batch_size=8", "vlm.image_size=28"]
        assert annotate_main(["vlm", *base, *vlm]) == 0
        asked = server.chat_requests
        assert asked == 3 * 40                             # 3 prompts x every image, train + test
        assert annotate_main(["vlm", *base, *vlm]) == 0      # a rerun: every shard done
        assert server.chat_requests == asked

    assert annotate_main(["merge", *base, "merge.inputs=[clip,llava]",
                          "merge.rule=intersection", "merge.column=both"]) == 0
    clip_col, vlm_col, both = column(root, "clip"), column(root, "llava"), column(root, "both")
    assert len(both) == m.count("train")
    for key, rec in both.items():
        # the VLM chose among CLIP's two most probable classes (template average)
        scores = rec_mean_scores(clip_col[key])
        second = np.sort(scores)[-2]
        votes = vlm_col[key]["votes.npy"]
        assert all(scores[v] >= second for v in votes[votes >= 0]), key
        assert len(vlm_col[key]["raw.json"]) == 3          # the answers as the server wrote them
        inter = set(clip_col[key]["cand.npy"].tolist()) & set(vlm_col[key]["cand.npy"].tolist())
        union = set(clip_col[key]["cand.npy"].tolist()) | set(vlm_col[key]["cand.npy"].tolist())
        assert set(rec["cand.npy"].tolist()) == (inter or union), key   # fallback: the union
    info = read_column_info(root, "both")
    assert info["complete"] and info["splits"]["train"]["n_images"] == len(both)

    report = train_pce_briefly(root, str(tmp_path / "train"), "both")
    assert 0.0 <= report["test_acc"] <= 1.0


def rec_mean_scores(rec):
    """Template-averaged scores over the classes from a CLIP record's top-K (K = C here)."""
    return expand_top_few(rec["topi.npy"], rec["topp.npy"], len(CLASSES)).mean(0)
