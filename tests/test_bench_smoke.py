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


def table_rows(out):
    """{(world, N): [fields]} parsed from the table; every number must parse."""
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("== table"))
    assert lines[start + 1].split()[:2] == ["world", "N"]
    rows = {}
    for line in lines[start + 3:]:
        if not line.strip() or line.startswith("("):
            break
        m = re.match(rf"\s*(\d+)\s+(\d+)\s+(\d+)\s+({NUM}) / ({NUM})\s+({NUM})% / ({NUM})%\s+({NUM})\s+"
                     rf"({NUM}) / ({NUM})\s+({NUM}) / ({NUM})\s+(- / -|{NUM} / {NUM})\s*$", line)
        assert m, f"table row does not parse: {line!r}"
        g = m.groups()
        vals = [float(x.replace(",", "")) for x in g[:12]]
        rows[(int(vals[0]), int(vals[1]))] = vals
    return rows


def check_output(out, worlds):
    rows = table_rows(out)
    assert set(rows) == {(w, n) for w in worlds for n in (200, 400)}
    for (w, n), v in rows.items():
        steps, sps_warm, sps_coreg, wait_warm, wait_coreg, rss = v[2:8]
        assert steps > 0 and sps_warm > 0 and sps_coreg > 0
        assert 0 <= wait_warm <= 100 and 0 <= wait_coreg <= 100
        assert 100 < rss < 10000                       # MiB
        assert v[11] > 0                               # Co-Reg steps gather keys and features
    verdicts = [l for l in out.splitlines() if re.match(r"(PASS|FAIL)  world \d", l)]
    assert len(verdicts) == 2 * len(worlds), verdicts
    assert "wall time:" in out


def test_bench_smallest_one_process(tmp_path):
    out = run_bench(tmp_path, "--skip-2proc")
    check_output(out, [1])
    # a second call reuses the pools
    assert "reused" not in out


@pytest.mark.slow
def test_bench_smallest_two_processes(tmp_path):
    out = run_bench(tmp_path)
    check_output(out, [1, 2])
