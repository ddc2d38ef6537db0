"""bench/stream_bench.py at its smallest size: it runs, prints its table and verdicts, exits 0."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "stream_bench.py")
NUM = r"[\d,]+(?:\.\d+)?"


def run_bench(workdir, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, SCRIPT, "--n", "200", "--factor", "2", "--epochs", "2",
                        "--shard-size", "100", "--workdir", str(workdir), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


ROW = re.compile(rf"\s*(?P<world>\d+)\s+(?P<n>\d+)\s+(?P<steps>\d+)\s+(?P<sps_w>{NUM}) / (?P<sps_c>{NUM})\s+"
                 rf"(?P<wait_w>{NUM})% / (?P<wait_c>{NUM})%\s+(?P<rss>{NUM})(?: / (?P<rss_thr>{NUM}))?\s+"
                 rf"(?P<ar_w>{NUM}) / (?P<ar_c>{NUM})\s+(?P<ag_w>{NUM}) / (?P<ag_c>{NUM})\s+"
                 rf"(?:- / -|(?P<ddp_w>{NUM}) / (?P<ddp_c>{NUM}))\s*$")


def table_rows(out):
    """{(world, N): {column: float}} parsed from the table; every number must parse."""
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("== table"))
    assert lines[start + 1].split()[:2] == ["world", "N"]
    rows = {}
    for line in lines[start + 3:]:
        if not line.strip() or line.startswith("("):
            break
        m = ROW.match(line)
        assert m, f"table row does not parse: {line!r}"
        v = {k: float(x.replace(",", "")) for k, x in m.groupdict().items() if x is not None}
        rows[(int(v["world"]), int(v["n"]))] = v
    return rows


def check_output(out, worlds):
    rows = table_rows(out)
    assert set(rows) == {(w, n) for w in worlds for n in (200, 400)}
    for (w, n), v in rows.items():
        assert v["steps"] > 0 and v["sps_w"] > 0 and v["sps_c"] > 0
        assert 0 <= v["wait_w"] <= 100 and 0 <= v["wait_c"] <= 100
        assert 100 < v["rss"] < 10000 and 100 < v["rss_thr"] < 10000     # MiB (memory / throughput run)
        assert v["ag_c"] > 0                             # Co-Reg steps gather keys and features
        assert (w == 1) == ("ddp_c" not in v)            # DDP gradient bytes only with 2 processes
    verdicts = [l for l in out.splitlines() if re.match(r"(PASS|FAIL)  world \d", l)]
    assert len(verdicts) == 2 * len(worlds), verdicts
    assert "wall time:" in out


def test_bench_smallest_one_process(tmp_path):
    out = run_bench(tmp_path, "--skip-2proc")
    check_output(out, [1])
    assert "written in" in out                       # fresh workdir: the pools were generated


@pytest.mark.slow
def test_bench_smallest_two_processes(tmp_path):
    out = run_bench(tmp_path)
    check_output(out, [1, 2])


def test_train_step_benchmark_runs():
    """bench/train_step.py (make bench) builds Co-Reg through the method interface and times
    real steps: guard it against interface changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "train_step.py"), "--steps", "2",
                        "--warmup-steps", "1", "--batch", "16", "--threads", "1"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "samples/s per network" in r.stdout
