"""slurm/train.sbatch on a real one-node SLURM cluster (slurm/local-cluster.sh): 2 ranks (under
torchrun, or one srun task each), SIGUSR1 to the batch shell mid-run -> collective checkpoint -> scontrol requeue ->
the same job runs again with --resume latest and finishes every epoch exactly once.

Needs root and apt (the cluster script installs SLURM 22.05 + munge when missing); skipped
otherwise. The daemons are stopped at the end of the module unless they were running before."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers import demo_overrides, make_labeled_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "slurm", "local-cluster.sh")
SBATCH = os.path.join(ROOT, "slurm", "train.sbatch")
EPOCHS = 4
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _cluster(action, env=None, timeout=60):
    return subprocess.run(["bash", CLUSTER, action], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurm/local-cluster.sh)")
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    was_running = shutil.which("sbatch") is not None and _cluster("status").returncode == 0
    # 4 advertised CPUs on a 2-core machine: the job's 2 ranks plus the signalling step fit.
    try:
        r = _cluster("start", dict(os.environ, SLURM_CPUS="4"), timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("slurm/local-cluster.sh start did not finish in 10 minutes")
    if r.returncode != 0:
        pytest.skip(f"the local SLURM cluster did not start:\n{r.stdout[-2000:]}")
    yield
    if not was_running:
        _cluster("stop")


def job_info(job):
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_scripts_parse_and_usage():
    """No cluster needed: both scripts are valid bash; the job script explains its usage."""
    for path in (CLUSTER, SBATCH):
        r = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", SBATCH], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "usage: sbatch" in r.stderr
    r = subprocess.run(["bash", CLUSTER, "bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr


@pytest.mark.parametrize("launch", ["torchrun", "srun"])
def test_usr1_checkpoints_requeues_and_resumes(cluster, tmp_path, launch):
    """The time-limit warning, sent by hand to the batch shell once the first epoch is logged:
    the job checkpoints, requeues itself, runs again (Restarts=1), resumes from the checkpoint
    and ends COMPLETED with every epoch in metrics.jsonl exactly once."""
    t0 = time.monotonic()
    data = make_labeled_dataset(str(tmp_path / "ds"), n_train=64, n_test=24)
    run = tmp_path / "run"
    overrides = [f"data.root={data}", f"run.out_dir={run}", "train.column=synthetic",
                 f"train.epochs={EPOCHS}", "train.batch_size=8", "train.eval_batch_size=16",
                 "coreg.warm_up=1", "coreg.feature_start=0", "coreg.queue_size=32",
                 "coreg.rampup_epochs=2", "train.lr_period=0", "data.streams=2",
                 "data.shuffle_buffer=8", "run.threads=2", "train.checkpoint_every=2",
                 "data.image_size=16"]
    env = dict(os.environ, LAUNCH=launch, NPROC="2", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env.pop("GPUS_PER_NODE", None)
    env.pop("MASTER_PORT", None)
    # Command-line options override the script's #SBATCH lines: output into tmp_path, 2 CPUs
    # (the script asks for 8), a short limit in case something hangs. cwd = repository root.
    r = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/train_%j.out",
                        "--cpus-per-task=2", "--time=10", "--job-name=coreg-slurm-test",
                        SBATCH, "configs/demo.yaml", *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    log = tmp_path / f"train_{job}.out"
    metrics = run / "metrics.jsonl"

    def text():
        return log.read_text(errors="replace") if log.exists() else ""

    try:
        # Training is under way once the first epoch is logged; then the time-limit warning.
        wait_for(lambda: metrics.exists() and metrics.read_text().strip()
                 or job_info(job).get("JobState") in FINISHED, 180, "the first epoch")
        assert job_info(job).get("JobState") == "RUNNING", text()[-4000:]
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        info = wait_for(lambda: (lambda i: i if i.get("JobState") in FINISHED else None)(
            job_info(job)), 300, f"job {job} to finish")
    finally:
        if job_info(job).get("JobState") not in FINISHED:
            subprocess.run(["scancel", job])
    out = text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out[-4000:])
    assert info["Restarts"] == "1", out[-4000:]
    # the script: header of both runs, the signal, the requeue, the end
    assert re.search(rf"job {job} restart 0 nodes 1 .* launch {launch} procs/node 2", out), out[-4000:]
    assert "caught SIGUSR1" in out and "sent SIGTERM to the training step" in out, out[-4000:]
    assert f"requeueing job {job}" in out, out[-4000:]
    assert f"job {job} restart 1 nodes 1" in out, out[-4000:]
    assert "training finished" in out, out[-4000:]
    # the trainer: a collective checkpoint on the signal, then a resume from it
    first, second = out.split(f"job {job} restart 1 nodes 1", 1)
    assert any("checkpoint" in l and "resume with --resume latest" in l
               for l in first.splitlines()), first[-4000:]
    assert "resumed from" in second, second[-4000:]
    # the run: finished, every epoch logged exactly once
    assert (run / "report.json").exists()
    epochs = [json.loads(l)["epoch"] for l in metrics.read_text().splitlines() if l.strip()]
    assert epochs == list(range(EPOCHS)), epochs
    rep = json.loads((run / "report.json").read_text())
    assert rep["world_size"] == 2
    print(f"slurm signal/requeue test ({launch}): {time.monotonic() - t0:.1f} s")


@pytest.mark.slow
def test_demo_preset_under_sbatch(cluster, demo_data, tmp_path):
    """configs/demo.yaml (4,000 of its images, warm-up then a Co-Reg epoch) as a batch job:
    one srun task running torchrun with 2 ranks."""
    run = tmp_path / "run"
    env = dict(os.environ, LAUNCH="torchrun", NPROC="2", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env.pop("GPUS_PER_NODE", None)
    r = subprocess.run(["sbatch", "--wait", f"--output={tmp_path}/demo_%j.out", "--cpus-per-task=2",
                        "--time=30", "--job-name=coreg-slurm-demo", SBATCH, "configs/demo.yaml",
                        *demo_overrides(demo_data, f"run.out_dir={run}")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("demo_*.out"))
    assert r.returncode == 0, (r.stderr, logs[-4000:])
    rep = json.loads((run / "report.json").read_text())
    assert rep["world_size"] == 2 and rep["engine"] == "ddp" and rep["ranks_in_sync"] is True
    epochs = [json.loads(l)["epoch"] for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert epochs == [0, 1]
