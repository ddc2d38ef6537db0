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


def parse_table(out, title, header, row, text=()):
    """Rows of the table after the line starting with `title` (its header starts with `header`):
    each a dict of column -> float (text columns kept as strings); every row must parse."""
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(title))
    assert lines[start + 1].split()[:2] == header
    rows = []
    for line in lines[start + 3:]:
        if not line.strip() or line.startswith("("):
            break
        m = row.match(line)
        assert m, f"table row does not parse: {line!r}"
        rows.append({k: (x if k in text else float(x.replace(",", "")))
                     for k, x in m.groupdict().items() if x is not None})
    return rows


def table_rows(out):
    """{(world, N): {column: float}} of the 1 vs 2 process table."""
    return {(int(v["world"]), int(v["n"])): v for v in parse_table(out, "== table", ["world", "N"], ROW)}


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


# --------------------------------------------------------------------------- the backend axis
BACKEND_ROW = re.compile(
    rf"(?P<backend>\w+)\s+(?P<engine>ddp|accelerate|deepspeed ZeRO-\d)\s+(?P<steps>\d+)\s+"
    rf"(?P<sps_w>{NUM}) / (?P<sps_c>{NUM})\s+(?P<eng_w>{NUM}) / (?P<eng_c>{NUM})\s+"
    rf"(?P<meth_w>{NUM}) / (?P<meth_c>{NUM})\s+(?P<rss>{NUM})\s+(?P<acc>{NUM})%\s+"
    rf"(?P<ldiff>ref|{NUM}e[-+]\d+)\s+(?P<sync>True|False|-)\s+(?P<wall>{NUM})\s*$")


def backend_rows(out):
    """{backend: {column: value}} of the backend table."""
    rows = parse_table(out, "== backend axis: table", ["backend", "engine"], BACKEND_ROW,
                       text=("backend", "engine", "sync", "ldiff"))
    return {v["backend"]: v for v in rows}


def _importable(name):
    import importlib.util
    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not (_importable("deepspeed") and _importable("accelerate")),
                    reason="the backend axis needs deepspeed and accelerate (pip install -e '.[test]')")
def test_bench_backend_axis(tmp_path):
    """--backends-only at the smallest size: DDP, DeepSpeed ZeRO-1 and accelerate each train
    with 2 processes and get a table row with positive samples/s and bytes."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, SCRIPT, "--n", "200", "--shard-size", "100", "--backend-epochs", "2",
                        "--backends-only", "--backends", "ddp,zero1,accelerate", "--workdir", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout
    assert r.returncode == 0, f"exit {r.returncode}\n{out[-3000:]}\n{r.stderr[-3000:]}"
    assert "== table" not in out and "PASS  world" not in out     # no N vs 10N study
    assert "deepspeed 0." in out and "accelerate 1." in out       # versions in the header
    rows = backend_rows(out)
    assert set(rows) == {"ddp", "zero1", "accelerate"}
    assert rows["ddp"]["engine"] == "ddp" and rows["accelerate"]["engine"] == "accelerate"
    assert rows["zero1"]["engine"] == "deepspeed ZeRO-1"
    for b, v in rows.items():
        assert v["steps"] > 0 and v["sps_w"] > 0 and v["sps_c"] > 0, (b, v)
        assert v["eng_w"] > 0 and v["eng_c"] > 0, (b, v)          # gradients every step
        assert v["meth_c"] > 0, (b, v)                            # Co-Reg's gathers
        assert 100 < v["rss"] < 10000, (b, v)                     # MiB
        assert 0 <= v["acc"] <= 100 and v["sync"] == "True", (b, v)
    # DDP and accelerate's DDP all-reduce the same gradient buckets; ZeRO-1 all-reduces the
    # gradients too and all-gathers the updated partitions on top.
    assert rows["ddp"]["eng_c"] == rows["accelerate"]["eng_c"]
    assert rows["zero1"]["eng_c"] > rows["ddp"]["eng_c"]
    # The same training: per-epoch losses agree with the first backend's (ddp).
    assert rows["ddp"]["ldiff"] == "ref"
    assert all(float(rows[b]["ldiff"]) < 1e-2 for b in ("zero1", "accelerate")), rows
    assert "AGREE  per-epoch training losses" in out
    # DeepSpeed's comm backend took the wrapped functions: its traffic was counted.
    assert "all_gather_function -> wrapped torch.distributed.all_gather_into_tensor" in out
    assert "wall time:" in out
