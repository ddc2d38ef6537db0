"""The main job's path end to end, at toy scale: IDX files -> shards -> embedded CLIP ->
candidate column -> Co-Reg -> report. Guards `make demo` without its 20 minutes."""
import json
import os

from tests.test_ingest import tiny_fmnist
from train.pipeline import main


def test_pipeline_end_to_end(tmp_path):
    src = str(tmp_path / "idx")
    tiny_fmnist(src, n_train=160, n_test=40)
    out = str(tmp_path / "run")
    rc = main(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"),
               f"data.root={tmp_path}/ds", f"data.source_path={src}", "data.annotator_split=60",
               "data.shard_size=50", f"run.out_dir={out}", f"embedded.out_dir={out}/clip",
               f"annotator.model={out}/clip", "embedded.epochs=2", "embedded.batch_size=32",
               "train.max_train_samples=0", "train.epochs=3", "coreg.warm_up=1",
               "coreg.feature_start=1", "train.batch_size=16", "coreg.queue_size=64", "run.threads=1"])
    assert rc == 0
    stats = json.load(open(os.path.join(out, "annotation_stats.json")))
    assert stats["n_images"] == 100 and set(stats["splits"]) == {"train", "test"}
    report = json.load(open(os.path.join(out, "report.json")))
    for k in ("annotator_zero_shot_acc", "annotator_template_avg_acc", "avg_candidates", "eta",
              "test_acc_net1", "test_acc_net2", "test_acc_ensemble", "epochs", "seconds"):
        assert k in report, k
    assert report["epochs"] == 3 and os.path.isfile(os.path.join(out, "report.md"))
    # rerun: every stage finds its work done (ingest, embedded model, committed shards, checkpoint)
    assert main(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"),
                 f"data.root={tmp_path}/ds", f"data.source_path={src}", "data.annotator_split=60",
                 "data.shard_size=50", f"run.out_dir={out}", f"embedded.out_dir={out}/clip",
                 f"annotator.model={out}/clip", "embedded.epochs=2", "embedded.batch_size=32",
                 "train.max_train_samples=0", "train.epochs=3", "coreg.warm_up=1",
                 "coreg.feature_start=1", "train.batch_size=16", "coreg.queue_size=64",
                 "run.threads=1", "train.resume=latest"]) == 0
