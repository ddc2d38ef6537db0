"""annotate/vllm_server.py: the vLLM server launcher, against real processes and real HTTP.

The server started is a small stand-in written below (vLLM's command line, GET /health,
GET /v1/models; behaviours chosen by environment variables: slow start, never healthy, ignore
SIGTERM, a child process in its group), plus the project's fake server (annotate/fake_vllm.py)
when it exists. The real vLLM is tests/test_vllm_real.py (opt-in, --run-vllm)."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

from annotate.vllm_server import (VllmServer, VllmServerError, port_in_use, server_command)
from coreg_dist.config import load_config
from tests.helpers import processes_with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STANDIN = textwrap.dedent('''
    """A vLLM stand-in: vLLM's flags, /health and /v1/models; faults from the environment."""
    import argparse, json, os, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import signal

    p = argparse.ArgumentParser()
    p.add_argument("--model"); p.add_argument("--served-model-name")
    p.add_argument("--host"); p.add_argument("--port", type=int)
    args, unknown = p.parse_known_args()
    print("standin argv", json.dumps(sys.argv[1:]), flush=True)
    if os.environ.get("STANDIN_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("STANDIN_CHILD"):   # like vLLM's engine core: a child in the same group
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", args.model])
    if os.environ.get("STANDIN_CRASH"):
        print("RuntimeError: standin crashed on purpose", flush=True)
        sys.exit(3)
    time.sleep(float(os.environ.get("STANDIN_DELAY", "0")))
    ready = not os.environ.get("STANDIN_NEVER_HEALTHY")

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                code, body = (200, b"") if ready else (503, b"loading")
            elif self.path == "/v1/models":
                code, body = 200, json.dumps({"object": "list", "data": [
                    {"id": args.served_model_name, "object": "model", "root": args.model}]}).encode()
            else:
                code, body = 404, b"{}"
            self.send_response(code); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a):
            pass

    ThreadingHTTPServer((args.host, args.port), H).serve_forever()
''')


@pytest.fixture
def standin(tmp_path):
    """(module name, env) for starting the stand-in with `python -m`."""
    folder = tmp_path / "standin_pkg"
    folder.mkdir()
    (folder / "standin_vllm.py").write_text(STANDIN)
    return "standin_vllm", {"PYTHONPATH": str(folder)}


def server_cfg(tmp_path, module, **kw):
    """The vlm.server section through the real config loader (types checked as for users)."""
    over = [f"vlm.server.python={sys.executable}", f"vlm.server.module={module}",
            f"vlm.server.model={tmp_path}/model-marker", "vlm.server.port=0", "vlm.server.gpus=0",
            "vlm.server.startup_timeout_s=30"]
    over += [f"vlm.server.{k}={v}" for k, v in kw.items()]
    return load_config(None, over).vlm.server


def wait_gone(marker, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not processes_with(marker):
            return True
        time.sleep(0.1)
    return False


def get_json(url):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as r:
        return json.loads(r.read())


def test_command_line_follows_the_config(tmp_path):
    cfg = server_cfg(tmp_path, "vllm.entrypoints.openai.api_server", gpus=1, dtype="float32",
                     max_model_len=256, extra_args="[--enforce-eager,--max-num-seqs,8]")
    cmd = server_command(cfg, "tiny", 8021)
    assert cmd == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                   f"{tmp_path}/model-marker", "--served-model-name", "tiny", "--host", "127.0.0.1",
                   "--port", "8021", "--dtype", "float32", "--max-model-len", "256",
                   "--enforce-eager", "--max-num-seqs", "8"]
    cfg.gpus = 4   # tensor parallel only with more than one GPU
    assert server_command(cfg, "tiny", 8021)[-5:-3] == ["--tensor-parallel-size", "4"]


def test_start_serve_stop_with_port_zero(tmp_path, standin):
    module, env = standin
    log = tmp_path / "logs" / "server.log"
    with VllmServer(server_cfg(tmp_path, module, extra_args="[--enforce-eager]"), "tiny", str(log),
                    env=env) as server:
        assert server.port and server.port != 8000
        assert server.url == f"http://127.0.0.1:{server.port}/v1"
        models = get_json(server.url + "/models")
        assert [m["id"] for m in models["data"]] == ["tiny"]
        pid = server.process.pid
        assert os.getpgid(pid) == pid            # its own process group
        assert port_in_use("127.0.0.1", server.port)
    assert server.process is None and server.returncode is not None
    assert not processes_with(str(tmp_path))
    text = log.read_text()
    # the flags reached the server (and the unknown one was passed on), the stop was logged
    argv = json.loads(text.split("standin argv ", 1)[1].splitlines()[0])
    assert argv[argv.index("--port") + 1] == str(server.port) and "--enforce-eager" in argv
    assert "server stopped" in text


def test_fake_vllm_starts_through_the_launcher(tmp_path):
    """The project's fake server takes vLLM's command line (another helper writes it)."""
    if importlib.util.find_spec("annotate.fake_vllm") is None:
        pytest.skip("annotate/fake_vllm.py does not exist yet")
    with VllmServer(server_cfg(tmp_path, "annotate.fake_vllm", dtype="float32"), "fake-llava",
                    str(tmp_path / "fake.log")) as server:
        assert "fake-llava" in [m["id"] for m in get_json(server.url + "/models")["data"]]
    assert wait_gone(str(tmp_path))


def test_busy_port_is_refused_by_name(tmp_path, standin):
    module, env = standin
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(VllmServerError, match=rf"port {port} on 127.0.0.1 is already in use.*port=0"):
            VllmServer(server_cfg(tmp_path, module, port=port), "tiny",
                       str(tmp_path / "s.log"), env=env).start()
    assert not processes_with(str(tmp_path))


def test_server_that_exits_fails_fast_with_its_log(tmp_path, standin):
    module, env = standin
    t0 = time.monotonic()
    with pytest.raises(VllmServerError) as err:
        with VllmServer(server_cfg(tmp_path, module, startup_timeout_s=120), "tiny",
                        str(tmp_path / "s.log"), env=dict(env, STANDIN_CRASH="1")):
            pass
    msg = str(err.value)
    assert time.monotonic() - t0 < 20     # not the 120 s startup timeout
    assert "model-marker" in msg and "exited with status 3" in msg and "s.log" in msg
    assert "standin crashed on purpose" in msg   # the log's last lines are quoted
    assert not processes_with(str(tmp_path))


def test_missing_module_and_missing_python_are_named(tmp_path):
    with pytest.raises(VllmServerError, match="No module named no_such_vllm_module"):
        VllmServer(server_cfg(tmp_path, "no_such_vllm_module"), "tiny", str(tmp_path / "s.log")).start()
    cfg = server_cfg(tmp_path, "whatever", python="/nonexistent/bin/python")
    with pytest.raises(VllmServerError, match="vlm.server.python.*/nonexistent/bin/python"):
        VllmServer(cfg, "tiny", str(tmp_path / "s.log")).start()
    cfg = server_cfg(tmp_path, "x")
    cfg.model = ""
    with pytest.raises(VllmServerError, match="'vlm.server.model' is required"):
        VllmServer(cfg, "tiny", str(tmp_path / "s.log"))


def test_fewer_visible_gpus_than_configured_is_refused(tmp_path, standin):
    module, env = standin
    cfg = server_cfg(tmp_path, module, gpus=2)
    with pytest.raises(VllmServerError, match=r"'vlm.server.gpus' is 2 but this process sees 1 "
                                              r"GPU.*--gres=gpu:2"):
        VllmServer(cfg, "tiny", str(tmp_path / "s.log"), env=dict(env, CUDA_VISIBLE_DEVICES="3")).start()
    assert not (tmp_path / "s.log").exists()     # refused before anything started


def test_startup_timeout_stops_the_server(tmp_path, standin):
    module, env = standin
    t0 = time.monotonic()
    with pytest.raises(VllmServerError, match=r"did not answer GET /health with 200 within "
                                              r"vlm.server.startup_timeout_s=3 s"):
        VllmServer(server_cfg(tmp_path, module, startup_timeout_s=3), "tiny",
                   str(tmp_path / "s.log"), env=dict(env, STANDIN_NEVER_HEALTHY="1")).start()
    assert time.monotonic() - t0 < 15
    assert wait_gone(str(tmp_path), 5)


def test_whole_group_stopped_and_sigkill_after_the_grace_time(tmp_path, standin):
    """A server that ignores SIGTERM and has a child (vLLM's engine core): both are gone after
    stop(), the leader by SIGKILL once stop_timeout_s has passed."""
    module, env = standin
    server = VllmServer(server_cfg(tmp_path, module), "tiny", str(tmp_path / "s.log"),
                        env=dict(env, STANDIN_IGNORE_TERM="1", STANDIN_CHILD="1"), stop_timeout_s=2)
    server.start()
    deadline = time.monotonic() + 10
    while len(processes_with(str(tmp_path))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(processes_with(str(tmp_path))) == 2     # the server and its child
    t0 = time.monotonic()
    rc = server.stop()
    assert rc == -signal.SIGKILL and 1.5 < time.monotonic() - t0 < 10
    assert wait_gone(str(tmp_path), 5)
    assert "SIGKILL sent to its process group" in (tmp_path / "s.log").read_text()
    assert server.stop() == rc    # idempotent, signals nothing


ANNOTATOR = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {root!r})
    from annotate.vllm_server import VllmServer
    from coreg_dist.config import load_config
    cfg = load_config(None, {overrides!r}).vlm.server
    with VllmServer(cfg, "tiny", {log!r}) as server:
        print("READY", server.process.pid, flush=True)
        time.sleep(120)
''')


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_annotator_leaves_no_server(tmp_path, standin, sig):
    """SIGTERM to the process that started the server (SLURM's scancel/requeue/time limit): the
    server is stopped and the process exits 143. SIGKILL (nothing runs in the process): the
    kernel's parent-death signal stops the server."""
    module, env = standin
    overrides = [f"vlm.server.python={sys.executable}", f"vlm.server.module={module}",
                 f"vlm.server.model={tmp_path}/model-marker", "vlm.server.port=0"]
    script = tmp_path / "annotator.py"
    script.write_text(ANNOTATOR.format(root=ROOT, overrides=overrides, log=str(tmp_path / "s.log")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env))
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("READY"):
            line = proc.stdout.readline()
        assert line.startswith("READY"), proc.stderr.read()
        server_pid = int(line.split()[1])
        assert server_pid in processes_with(str(tmp_path))
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == (143 if sig == signal.SIGTERM else -signal.SIGKILL), proc.stderr.read()
    assert wait_gone(str(tmp_path), 10), processes_with(str(tmp_path))


def test_standalone_command_runs_until_sigterm(tmp_path, standin):
    module, env = standin
    log = tmp_path / "standalone.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "annotate.vllm_server", f"vlm.server.python={sys.executable}",
         f"vlm.server.module={module}", f"vlm.server.model={tmp_path}/model-marker",
         "vlm.server.port=0", "vlm.model=shared", f"vlm.server.log={log}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, **env))
    try:
        line = proc.stdout.readline()
        while line and not line.startswith("serving"):
            line = proc.stdout.readline()
        assert line.startswith("serving 'shared' at http://127.0.0.1:"), proc.stderr.read()
        url = line.split(" at ", 1)[1].split(";")[0].split()[0]
        assert [m["id"] for m in get_json(url + "/models")["data"]] == ["shared"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_gone(str(tmp_path), 10)
    # without a model it says which key is missing
    r = subprocess.run([sys.executable, "-m", "annotate.vllm_server"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "vlm.server.model" in r.stderr
