"""Capacity benchmark of the VLM annotator: does it keep a server busy?

    python bench/vlm_client.py                            # 32 slots x 0.25 s = 128 requests/s, 4,000 requests
    python bench/vlm_client.py --slots 64 --latency-s 0.5 --images 3000 --prompts 2
    python bench/vlm_client.py --servers 2                # two servers, the client balances them
    python bench/vlm_client.py --concurrency 32           # client bound = server slots (no queue)

What it does:
  1. starts the fake vLLM server (annotate/fake_vllm.py) as its own process, once per --servers,
     with a known capacity: at most --slots requests served at once, each taking --latency-s
     seconds, so capacity = slots / latency requests/s per server (the rest queue in the server);
  2. writes a dataset of --images 28x28 PNGs in shards of --shard-size (tests/helpers.make_dataset,
     the project's own writers) in --workdir (a temporary folder by default);
  3. runs the annotator exactly as `coreg-annotate vlm` does (annotate.vlm_labeler.annotate_vlm:
     write_column -> VlmLabeler -> VlmClient, --prompts prompts per image, batches of
     --batch-size, --concurrency requests in flight per server), timing it end to end (client
     start, /v1/models, every shard written and committed);
  4. prints the measured requests/s, the servers' capacity, and the fraction of the servers' slots
     kept busy (each server integrates its busy slots over time: GET /fake/stats), against the
     target of 95%; plus the settings and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET = 0.95


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read() or b"null")


def start_server(name: str, slots: int, latency_s: float, log) -> tuple:
    port = free_port()
    cmd = [sys.executable, "-m", "annotate.fake_vllm", "--model", f"/bench/{name}",
           "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
           "--fake-slots", str(slots), "--fake-latency-s", str(latency_s)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=1).read()
            return proc, base
        except OSError:
            if proc.poll() is not None or time.time() - t0 > 30:
                raise SystemExit(f"fake server did not start: {' '.join(cmd)}")
            time.sleep(0.1)


def machine() -> str:
    import openai
    from coreg_dist.runtime import cpu_description
    return (f"{platform.node()}: {cpu_description()} at the start; "
            f"Python {platform.python_version()}, openai {openai.__version__}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=32, help="requests a server serves at once (K)")
    p.add_argument("--latency-s", type=float, default=0.25, help="seconds per request (T)")
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--prompts", type=int, default=1, help="annotators: requests per image")
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256, help="images per write batch")
    p.add_argument("--concurrency", type=int, default=0,
                   help="requests in flight per server (vlm.max_concurrency); 0 = 2 x --slots")
    p.add_argument("--workdir", default="", help="dataset folder (default: a temporary one)")
    a = p.parse_args(argv)

    from annotate.vlm_labeler import annotate_vlm
    from coreg_dist.config import load_config
    from tests.helpers import make_dataset

    concurrency = a.concurrency or 2 * a.slots
    work = a.workdir or tempfile.mkdtemp(prefix="vlm-bench-")
    root = os.path.join(work, "ds")
    print(f"machine: {machine()}")
    if not os.path.isfile(os.path.join(root, "manifest.json")):
        make_dataset(root, n_train=a.images, n_test=0, num_classes=10, shard_size=a.shard_size, size=28)
    log = open(os.path.join(work, "fake-servers.log"), "a")
    servers = [start_server("bench", a.slots, a.latency_s, log) for _ in range(a.servers)]
    try:
        before = [get_json(base + "/fake/stats") for _, base in servers]
        prompts = [f"Prompt {i}: what is in this image?" for i in range(a.prompts)]
        column = f"bench_{int(time.time())}"
        cfg = load_config(None, [
            f"data.root={root}", f"run.out_dir={work}/run", f"vlm.column={column}",
            "vlm.model=bench", "vlm.splits=[train]", f"vlm.batch_size={a.batch_size}",
            f"vlm.max_concurrency={concurrency}", "vlm.timeout_s=120",
            "vlm.urls=[" + ",".join(base + "/v1" for _, base in servers) + "]",
            "vlm.prompts=[" + ",".join(f"'{q}'" for q in prompts) + "]"])
        t0 = time.perf_counter()
        report = annotate_vlm(cfg)
        wall = time.perf_counter() - t0
        after = [get_json(base + "/fake/stats") for _, base in servers]
    finally:
        for proc, _ in servers:
            proc.terminate()
        for proc, _ in servers:
            proc.wait(timeout=30)
        log.close()
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    requests = a.images * a.prompts
    answered = sum(x["answered"] - b["answered"] for x, b in zip(after, before))
    capacity = a.servers * a.slots / a.latency_s
    measured = answered / wall
    # Each server: from its first request to its last answer (the servers are fresh processes),
    # the integral of its busy slots over slots x that window.
    active = max(x["active_s"] for x in after)
    kept_busy = sum(x["busy_slot_seconds"] for x in after) / sum(a.slots * x["active_s"] for x in after)
    flow = answered / active
    client = report["vlm"]["client"]
    print()
    print(f"settings: {a.servers} server(s) x {a.slots} slots x {a.latency_s} s per request; "
          f"{a.images} images x {a.prompts} prompt(s) = {requests} requests; shards of "
          f"{a.shard_size}, write batches of {a.batch_size}, {concurrency} requests in flight "
          f"per server")
    print(f"capacity:  {capacity:.1f} requests/s ({a.servers} x {a.slots} / {a.latency_s})")
    print(f"measured:  {flow:.1f} requests/s from the first request to the last answer "
          f"({answered} in {active:.2f} s): {flow / capacity:.1%} of capacity; the servers' "
          f"slots were busy {kept_busy:.1%} of that time (their own integral)  (target >= "
          f"{TARGET:.0%}: {'met' if kept_busy >= TARGET else 'NOT met'})")
    print(f"end to end: {measured:.1f} requests/s ({answered} in {wall:.2f} s: the whole "
          f"`coreg-annotate vlm` call, with imports, client start, /v1/models, shard commits): "
          f"{measured / capacity:.1%} of capacity")
    print(f"client: latency p50 {client['latency_s']['p50']} s, p95 {client['latency_s']['p95']} s, "
          f"retries {client['retries_total']}, failed {client['failed']}; per server sent: "
          + ", ".join(str(s["sent"]) for s in client["servers"].values()))
    if answered != requests:
        print(f"warning: {requests} requests expected, the servers answered {answered}")
    return 0 if kept_busy >= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
