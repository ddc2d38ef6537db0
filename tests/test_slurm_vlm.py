"""slurm/annotate.sbatch with LABELER=vlm: every array task starts its own vLLM server (here the
project's fake one, vlm.server.module=annotate.fake_vllm), labels its shards against it and
stops it; a requeued task leaves no server behind and its rerun skips the committed shards.

The first test runs the script without SLURM (fast); the others submit to the real one-node
SLURM of slurm/local-cluster.sh (slow: --run-slow; root and apt needed, skipped otherwise)."""
import os
import re
import subprocess
import sys
import time

import pytest

from coreg_dist.shards.format import column_shard_path, is_committed, read_column_info
from tests.helpers import make_dataset, processes_with
from tests.test_slurm import FINISHED, job_info, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "slurm", "annotate.sbatch")
COLUMN = "llava"
STARTED = re.compile(r"vlm: started annotate\.fake_vllm serving 'fake' at http://127\.0\.0\.1:(\d+)/v1")


@pytest.fixture
def vlm_ds(tmp_path):
    """6 shards of 8 images (5 train, 1 test) and the overrides of a fake-vLLM annotation."""
    root = tmp_path / "ds"
    make_dataset(str(root), n_train=40, n_test=8, num_classes=4, shard_size=8)
    marker = str(tmp_path / "fake-model")      # any string: the fake server serves no weights
    overrides = [f"data.root={root}", f"run.out_dir={tmp_path}/run", f"vlm.column={COLUMN}",
                 "vlm.model=fake", "vlm.server.module=annotate.fake_vllm",
                 f"vlm.server.python={sys.executable}", f"vlm.server.model={marker}",
                 "vlm.server.gpus=0", "vlm.server.startup_timeout_s=120", "vlm.max_concurrency=8"]
    return root, marker, overrides, tmp_path


def shards_done(root):
    names = [f"train-{i:06d}" for i in range(5)] + ["test-000000"]
    return [n for n in names if is_committed(column_shard_path(str(root), COLUMN, n))]


def test_vlm_mode_without_slurm_starts_and_stops_its_server(vlm_ds):
    """Outside SLURM the script runs the command directly (ordinal 0 of 1): server up on a free
    port, every shard labeled, server stopped."""
    root, marker, overrides, tmp = vlm_ds
    env = dict(os.environ, LABELER="vlm", PYTHON=sys.executable, PYTHONWARNINGS="ignore")
    for k in [k for k in env if k.startswith("SLURM_")]:
        env.pop(k)
    r = subprocess.run(["bash", SBATCH, "configs/demo.yaml", *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "-> ordinal 0 of 1" in out and "labeler vlm" in out, out[-4000:]
    ports = STARTED.findall(out)
    assert len(ports) == 1 and ports[0] != "8000", out[-4000:]
    assert read_column_info(str(root), COLUMN)["complete"]
    assert "server stopped" in (tmp / "run" / "vllm-server-0.log").read_text()
    assert not processes_with(marker, "annotate.fake_vllm")


@pytest.mark.slow
def test_vlm_array_tasks_each_run_their_own_server(cluster, vlm_ds):
    """--array=1-3 (offset): 3 tasks, each with its own fake vLLM on its own port, label 2 shards
    each; the column ends complete, no server is left, and a resubmission labels nothing."""
    root, marker, overrides, tmp = vlm_ds
    env = dict(os.environ, LABELER="vlm", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")

    def submit(tag):
        r = subprocess.run(["sbatch", "--wait", "--array=1-3", f"--output={tmp}/{tag}_%A_%a.out",
                            "--cpus-per-task=1", "--time=10", "--job-name=coreg-vlm-test",
                            SBATCH, "configs/demo.yaml", *overrides],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        logs = {p.name: p.read_text(errors="replace") for p in sorted(tmp.glob(f"{tag}_*.out"))}
        assert r.returncode == 0, (r.stderr, "".join(logs.values())[-4000:])
        return logs

    t0 = time.monotonic()
    logs = submit("first")
    text = "".join(logs.values())
    assert len(logs) == 3, list(logs)
    for ordinal in range(3):
        assert f"-> ordinal {ordinal} of 3" in text, text[-4000:]
    ports = [STARTED.findall(t) for t in logs.values()]
    assert all(len(p) == 1 for p in ports), text[-4000:]          # one server per task
    assert len({p[0] for p in ports}) == 3                          # on three ports
    info = read_column_info(str(root), COLUMN)
    assert info["complete"], info
    assert info["splits"]["train"]["shards_done"] == 5 and info["splits"]["test"]["shards_done"] == 1
    for ordinal in range(3):
        assert "server stopped" in (tmp / "run" / f"vllm-server-{ordinal}.log").read_text()
    assert not processes_with(marker, "annotate.fake_vllm")
    logs = submit("second")     # a rerun: servers start, every shard is skipped
    text = "".join(logs.values())
    assert len(STARTED.findall(text)) == 3 and "labeled" not in text, text[-4000:]
    assert "vlm: 0 images" in text                                 # nothing asked of the servers
    assert read_column_info(str(root), COLUMN) == info
    assert not processes_with(marker, "annotate.fake_vllm")
    print(f"SLURM vlm array (3 tasks, twice): {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_vlm_task_requeued_midway_leaves_no_server_and_resumes(cluster, vlm_ds):
    """A slow server (1 slot, 0.15 s a request: ~3.6 s a shard). Once the first shard is
    committed, `scontrol requeue` kills the running task: its server is gone before the task
    runs again, the rerun starts a new server, skips the committed shards and completes."""
    root, marker, overrides, tmp = vlm_ds
    overrides = overrides + ["vlm.server.extra_args=[--fake-slots,1,--fake-latency-s,0.15]"]
    env = dict(os.environ, LABELER="vlm", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    t0 = time.monotonic()
    r = subprocess.run(["sbatch", "--parsable", "--array=0-0", f"--output={tmp}/rq_%A_%a.out",
                        "--cpus-per-task=1", "--time=10", "--job-name=coreg-vlm-requeue",
                        SBATCH, "configs/demo.yaml", *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    task = r.stdout.strip().split(";")[0] + "_0"
    log = lambda: "".join(p.read_text(errors="replace") for p in tmp.glob("rq_*.out"))
    try:
        wait_for(lambda: shards_done(root) or job_info(task).get("JobState") in FINISHED, 120,
                 "the first committed shard")
        assert job_info(task).get("JobState") == "RUNNING", log()[-4000:]
        done_before = shards_done(root)
        assert 1 <= len(done_before) < 6 and processes_with(marker, "annotate.fake_vllm"), log()[-4000:]
        subprocess.run(["scontrol", "requeue", task], check=True, timeout=30)
        wait_for(lambda: not processes_with(marker, "annotate.fake_vllm"), 30, "the killed task's server to exit")
        info = job_info(task)
        assert info.get("JobState") != "RUNNING" or info.get("Restarts") == "0", info
        final = wait_for(lambda: (lambda i: i if i.get("JobState") in FINISHED
                                  and i.get("Restarts") == "1" else None)(job_info(task)),
                         240, f"{task} to run again and finish")
    finally:
        if job_info(task).get("JobState") not in FINISHED:
            subprocess.run(["scancel", task])
    out = log()
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", (final, out[-4000:])
    assert "restart 0" in out and "restart 1" in out, out[-4000:]
    rerun = out.split("restart 1", 1)[1]
    assert len(STARTED.findall(rerun)) == 1, rerun[-4000:]          # a new server for the rerun
    skipped = [int(n) for n in re.findall(r"(\d+) shards already done", rerun)]
    assert sum(skipped) >= len(done_before), rerun[-4000:]
    assert read_column_info(str(root), COLUMN)["complete"]
    assert not processes_with(marker, "annotate.fake_vllm")
    print(f"SLURM vlm requeue: {time.monotonic() - t0:.1f} s")


from tests.test_slurm import cluster  # noqa: E402,F401  (the module-scoped local SLURM fixture)
