"""Faults: stop signals checkpoint before exit, a dead or frozen rank makes the others exit with
a clear message within the collective timeout (never a hang), and the kill-anywhere drill ends
with the weights and metrics of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, TORCHRUN, common, latest, make_labeled_dataset, model, torchrun
from train.kill_drill import epoch_metrics
from train.kill_drill import main as drill_main
from train.preemption import EXIT_PREEMPTED


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_labeled_dataset(str(tmp_path_factory.mktemp("ds")), n_train=64, n_test=24)


def start(cmd, log, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(path, text, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.isfile(path) and text in open(path, errors="replace").read():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended (exit {proc.returncode}) before {text!r}:\n"
                                 f"{open(path, errors='replace').read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout}s")


def test_sigterm_to_torchrun_checkpoints_then_resume_is_exact(dataset, tmp_path):
    """SIGTERM to torchrun (preemption, scancel): its agent forwards it to the ranks, which
    agree on a step, write a checkpoint and exit; `--resume latest` continues exactly."""
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    torchrun(2, common(dataset, full, "train.epochs=4"))
    log = str(tmp_path / "cut.log")
    proc = start([*TORCHRUN, "--nproc_per_node=2", "-m", "train.cli",
                  *common(dataset, cut, "train.epochs=4"), "run.threads=2"], log)
    wait_for(log, "epoch 1:", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    text = open(log).read()
    assert "SIGTERM received: checkpoint written at" in text and "resume with --resume latest" in text
    meta = json.load(open(os.path.join(latest(cut), "meta.json")))
    assert (meta["epoch"], meta["pass_index"], meta["step"]) > (1, 0, 0)   # after the signal
    assert not os.path.exists(os.path.join(cut, "report.json"))
    torchrun(2, common(dataset, cut, "train.epochs=4", "train.resume=latest"))
    assert epoch_metrics(full) == epoch_metrics(cut)
    A, B = model(full), model(cut)
    for k in range(2):
        assert all((A["nets"][k][n] == B["nets"][k][n]).all() for n in A["nets"][k])


def test_sigusr1_checkpoints_and_exits_75(dataset, tmp_path):
    """SLURM's warning before the time limit (--signal=USR1@N) in a single process."""
    out, log = str(tmp_path / "run"), str(tmp_path / "run.log")
    proc = start([sys.executable, "-m", "train.cli", *common(dataset, out, "train.epochs=30"),
                  "run.threads=1"], log)
    wait_for(log, "epoch 0:", proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED
    assert "SIGUSR1 received: checkpoint written" in open(log).read()
    assert os.path.isfile(os.path.join(latest(out), "model.pt"))


def two_plain_ranks(dataset, out, tmp_path, port, timeout_s):
    """Two ranks without an agent (as `srun` one task per GPU starts them): nobody but the
    collectives themselves can notice that a peer is gone."""
    procs, logs = [], []
    for r in range(2):
        logs.append(str(tmp_path / f"rank{r}.log"))
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "WORLD_SIZE": "2",
               "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"}
        procs.append(start([sys.executable, "-m", "train.cli",
                            *common(dataset, out, "train.epochs=200", f"dist.timeout_s={timeout_s}"),
                            "run.threads=2"], logs[-1], env))
    wait_for(logs[0], "epoch 1:", procs[0])
    return procs, logs


def test_killed_rank_makes_the_other_exit_with_a_clear_message(dataset, tmp_path):
    procs, logs = two_plain_ranks(dataset, str(tmp_path / "run"), tmp_path, 29541, 60)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    rc = procs[0].wait(timeout=90)
    took = time.time() - t0
    text = open(logs[0]).read()
    assert rc == 1 and took < 60, (rc, took)
    assert "a collective failed" in text and "rerun with --resume latest" in text


def test_frozen_rank_fails_the_other_at_the_collective_timeout(dataset, tmp_path):
    """A rank that stops answering (SIGSTOP: hung, swapping) holds its sockets open: the
    others fail at dist.timeout_s instead of waiting forever."""
    procs, logs = two_plain_ranks(dataset, str(tmp_path / "run"), tmp_path, 29542, 10)
    procs[1].send_signal(signal.SIGSTOP)
    try:
        t0 = time.time()
        rc = procs[0].wait(timeout=90)
        took = time.time() - t0
    finally:
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
    assert rc == 1 and took < 45, (rc, took)
    assert "a collective failed" in open(logs[0]).read()


@pytest.mark.parametrize("nproc,victim", [(1, "all"), (2, "one")])
def test_kill_drill(dataset, tmp_path, capsys, nproc, victim):
    """5 SIGKILLs at random moments, each followed by --resume latest: bit-identical weights
    and equal metrics to the uninterrupted run."""
    rc = drill_main(["--kills", "5", "--nproc", str(nproc), "--victim", victim, "--seed", "3",
                     "--workdir", str(tmp_path / "drill"), *common(dataset, "unused", "train.epochs=5"),
                     "run.threads=2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"verdict: PASS: 5 kills ({victim}), {nproc} rank(s)" in out
