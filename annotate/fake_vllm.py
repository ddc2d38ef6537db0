"""A small stand-in for vLLM's OpenAI-compatible server, with fault injection (tests, benchmark).

    python -m annotate.fake_vllm --model tiny --served-model-name tiny --host 127.0.0.1 --port 8021
    python -m annotate.fake_vllm --model m --port 8021 --fake-slots 32 --fake-latency-s 0.25   # 128 req/s
    python -m annotate.fake_vllm --model m --port 8021 --fake-error-rate 500=0.1,429=0.05 \\
        --fake-garbage-rate 0.1 --fake-die-after 500

It starts the way vLLM's server does (`--model`, `--served-model-name`, `--host`, `--port`; any
other vLLM argument is accepted and ignored), so `vlm.server.module=annotate.fake_vllm` runs
the launcher (annotate/vllm_server.py) without vLLM. It speaks what the VLM client uses:

- `GET /health` (200), `GET /v1/models` (the served name; `root` = --model, as vLLM reports);
- `POST /v1/chat/completions` with a user message of `image_url` (base64 data URL) and `text`
  parts and `structured_outputs: {"choice": [...]}`: the answer is one of the choices, picked by
  a hash of the image bytes and the prompt text (so the same request always gets the same
  answer, as vLLM at temperature 0); `logprobs: true` gives OpenAI's per-token format whose
  summed logprob is log(p) for a p derived from the same hash. An image that does not decode is
  a 400 (vLLM: "Failed to load image"); a wrong model name a 404; a request without
  `structured_outputs` (e.g. the removed `guided_choice`) gets unconstrained gibberish, as
  vLLM 0.32 gives.

Faults (all off by default):
- `error_rates` {status: fraction}: that fraction of requests answered with 500/503/429 (seeded
  random draws: use with retries);
- `fail_attempts` + `fail_status`: the first N attempts of every distinct request fail with that
  status (exact retry counts for tests);
- `delay_attempts` + `delay_s`: the first N attempts of every distinct request are answered
  after delay_s (beyond the client's timeout: a timeout, then a retry); `delay_rate`: a random
  fraction of requests is delayed;
- `garbage_rate`: that fraction of answers (by hash: deterministic) is outside the choices;
- `length_rate`: that fraction (by hash) is cut short with finish_reason "length";
- `die_after`: after that many chat requests the server dies (listener closed, open connections
  dropped without an answer): a server failing mid-shard;
- capacity: at most `slots` requests are served at once, each taking `latency_s` seconds (the
  rest queue, first come first served), so the capacity is slots / latency_s requests per
  second. The schedule is kept in virtual time (each request gets the earliest free slot's time
  when it arrives, and is answered at the end of its service), so the fake's own thread
  scheduling on a busy machine does not leave slots idle: a slot idles only when no request
  has arrived for it. `busy_slot_seconds` sums the service times and `active_s` is the time from
  the first request's arrival to the last service's end: their ratio to `slots` is the fraction
  of the capacity the client kept busy (the benchmark's number).

In-process use: `FakeVllm(...).start()` (port 0 picks a free port), `.url`, `.stop()`; the
counters are attributes. `answer_fn(image_bytes, text, choices) -> str` replaces the hash rule.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import heapq
import io
import json
import math
import random
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Tuple

GARBAGE = "~garbage~"


def hash_unit(*parts: bytes) -> float:
    """A number in [0, 1) from the parts' sha256: the fake's only source of "model" variety."""
    h = hashlib.sha256(b"\0".join(parts)).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def hash_answer(image: bytes, text: str, choices: List[str]) -> str:
    """The default answer: one of the choices, picked by a hash of the image bytes and prompt."""
    return choices[int(hash_unit(image, text.encode("utf-8"), b"answer") * len(choices))]


def answer_probability(image: bytes, text: str) -> float:
    """The probability the fake reports for its answer (through logprobs), in [0.05, 1)."""
    return 0.05 + 0.95 * hash_unit(image, text.encode("utf-8"), b"prob")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024          # hundreds of clients connect at once (default backlog 5)
    allow_reuse_address = True


class FakeVllm:
    def __init__(self, served_model_name: str = "fake", model: str = "fake-model",
                 host: str = "127.0.0.1", port: int = 0, *, slots: int = 0, latency_s: float = 0.0,
                 error_rates: Optional[Dict[int, float]] = None, fail_attempts: int = 0,
                 fail_status: int = 500, delay_attempts: int = 0, delay_rate: float = 0.0,
                 delay_s: float = 0.0, garbage_rate: float = 0.0, length_rate: float = 0.0,
                 die_after: int = 0, answer_fn: Optional[Callable[[bytes, str, List[str]], str]] = None,
                 seed: int = 0, max_model_len: int = 4096, log=None):
        self.name, self.model, self.host, self.port = served_model_name, model, host, port
        self.slots, self.latency_s = int(slots), float(latency_s)
        self.error_rates = dict(error_rates or {})
        self.fail_attempts, self.fail_status = int(fail_attempts), int(fail_status)
        self.delay_attempts, self.delay_rate, self.delay_s = int(delay_attempts), float(delay_rate), float(delay_s)
        self.garbage_rate, self.length_rate = float(garbage_rate), float(length_rate)
        self.die_after = int(die_after)
        self.answer_fn = answer_fn
        self.max_model_len = max_model_len
        self.log = log
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._slot_free = [0.0] * self.slots          # when each slot is next free (a heap)
        self._attempts: Dict[str, int] = {}          # request digest -> attempts seen
        self._connections: set = set()
        self._httpd: Optional[_Server] = None
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.dead = False
        # counters
        self.chat_requests = 0                       # POST /v1/chat/completions received
        self.answered = 0                            # 200 answers sent
        self.by_status: Dict[int, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0                       # concurrent chat requests seen at most
        self.busy_slot_seconds = 0.0                 # service time given (slots x seconds)
        self.first_request_t: Optional[float] = None # time.monotonic() of the first chat request
        self.last_end_t: Optional[float] = None      # ... and of the latest service end
        self.requests_log: List[Dict] = []           # (prompt text, choices, answer) per answer
        self.keep_log = False

    # ------------------------------------------------------------------ lifetime
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "FakeVllm":
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server((self.host, self.port), handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-vllm-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: the listener closes and open connections are dropped."""
        with self._lock:
            httpd, self._httpd = self._httpd, None
        if httpd is None:                  # stopped, or being stopped by another thread
            if self._thread is not None:
                self._stopped.wait(10)
            return
        httpd.shutdown()               # the accept loop ends (within its 0.05 s poll) ...
        httpd.server_close()           # ... then the listener closes: new connections are refused
        with self._lock:
            conns = list(self._connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._stopped.set()

    def die(self) -> None:
        self.stop()
        self.dead = True

    def __enter__(self) -> "FakeVllm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> Dict:
        with self._lock:
            return {"chat_requests": self.chat_requests, "answered": self.answered,
                    "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                    "max_in_flight": self.max_in_flight, "busy_slot_seconds": round(self.busy_slot_seconds, 4),
                    "slots": self.slots, "latency_s": self.latency_s, "dead": self.dead,
                    # first chat request to last answer: the window the client kept it working
                    "active_s": round(self.last_end_t - self.first_request_t, 4)
                    if self.last_end_t is not None else 0.0}

    def _serve(self) -> None:
        """Wait for a slot and hold it for latency_s (virtual-time schedule, see the module doc)."""
        if self.slots <= 0:
            if self.latency_s:
                time.sleep(self.latency_s)
            return
        with self._lock:
            start = max(time.monotonic(), heapq.heappop(self._slot_free))
            end = start + self.latency_s
            heapq.heappush(self._slot_free, end)
            self.busy_slot_seconds += self.latency_s
            self.last_end_t = max(self.last_end_t or end, end)
        time.sleep(max(0.0, end - time.monotonic()))

    # ------------------------------------------------------------------ the model
    def chat(self, body: Dict) -> Tuple[int, Dict]:
        """(status, JSON body) for one chat completion request; sleeps as the capacity says."""
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self._lock:
            self.chat_requests += 1
            n = self.chat_requests
            if self.first_request_t is None:
                self.first_request_t = time.monotonic()
            attempt = self._attempts.get(digest, 0)
            self._attempts[digest] = attempt + 1
            draw_err, draw_delay = self._rng.random(), self._rng.random()
        if self.die_after and n > self.die_after:
            self.die()
            return -1, {}                              # no answer: the connection is dropped
        if attempt < self.fail_attempts:
            return self.fail_status, _error(self.fail_status, "injected failure")
        acc = 0.0
        for status, rate in sorted(self.error_rates.items()):
            acc += rate
            if draw_err < acc:
                return status, _error(status, "injected failure")
        if attempt < self.delay_attempts or draw_delay < self.delay_rate:
            time.sleep(self.delay_s)
        if body.get("model") != self.name:
            return 404, _error(404, f"The model `{body.get('model')}` does not exist.")
        image, text = _read_message(body)
        so = body.get("structured_outputs") or {}
        choices = so.get("choice") if isinstance(so, dict) else None
        self._serve()
        finish = "stop"
        if not choices:
            # vLLM 0.32 ignores the removed guided_* fields: the output is not constrained.
            answer, finish = "::::" + hashlib.md5(text.encode()).hexdigest()[:6], "length"
        elif hash_unit(image, text.encode(), b"garbage") < self.garbage_rate:
            answer = GARBAGE
        else:
            answer = (self.answer_fn or hash_answer)(image, text, list(choices))
            if hash_unit(image, text.encode(), b"length") < self.length_rate:
                answer, finish = answer[: max(1, len(answer) // 2)], "length"
        p = answer_probability(image, text)
        tokens = [answer[i:i + 3] for i in range(0, len(answer), 3)] or [""]
        choice = {"index": 0, "message": {"role": "assistant", "content": answer},
                  "logprobs": None, "finish_reason": finish, "stop_reason": None}
        if body.get("logprobs"):
            lp = math.log(p) / len(tokens)             # the tokens' logprobs sum to log(p)
            choice["logprobs"] = {"content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()),
                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}]
                 if body.get("top_logprobs") else []} for t in tokens]}
        with self._lock:
            self.answered += 1
            if self.keep_log:
                self.requests_log.append({"text": text, "choices": choices, "answer": answer})
        return 200, {"id": "chatcmpl-" + digest[:24], "object": "chat.completion",
                     "created": int(time.time()), "model": self.name, "choices": [choice],
                     "usage": {"prompt_tokens": 16 + len(text) // 4,
                               "completion_tokens": len(tokens),
                               "total_tokens": 16 + len(text) // 4 + len(tokens)}}

    def models_body(self) -> Dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                            "owned_by": "vllm", "root": self.model, "parent": None,
                                            "max_model_len": self.max_model_len}]}


def _error(status: int, message: str) -> Dict:
    kind = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _read_message(body: Dict) -> Tuple[bytes, str]:
    """The image bytes and the text of the last user message; a 400 for what vLLM refuses."""
    from PIL import Image

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest(400, "messages must be a non-empty list")
    content = messages[-1].get("content") if isinstance(messages[-1], dict) else None
    if isinstance(content, str):
        return b"", content
    if not isinstance(content, list):
        raise _BadRequest(400, "message content must be a string or a list of parts")
    image, texts = b"", []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if not url.startswith("data:") or ";base64," not in url:
                raise _BadRequest(400, "only base64 data URLs are supported by the fake server")
            try:
                image = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
                Image.open(io.BytesIO(image)).verify()
            except (binascii.Error, ValueError, OSError) as exc:
                raise _BadRequest(400, f"Failed to load image: {exc}") from None
        else:
            raise _BadRequest(400, f"unsupported content part type {kind!r}")
    return image, "\n".join(texts)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive: the client reuses its connections
    fake: FakeVllm = None

    def setup(self) -> None:
        super().setup()
        # Small answers go out at once (as uvicorn does for vLLM): with Nagle's algorithm a
        # keep-alive connection waits for the client's delayed ACK, ~40 ms per request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.fake._lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, fmt, *args) -> None:
        if self.fake.log is not None:
            print(f"{self.address_string()} {fmt % args}", file=self.fake.log, flush=True)

    def _send(self, status: int, body: Optional[Dict]) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:                 # the client gave up (its timeout) and closed
            self.close_connection = True
        with self.fake._lock:
            self.fake.by_status[status] = self.fake.by_status.get(status, 0) + 1

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, None)
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, self.fake.models_body())
        elif self.path == "/fake/stats":
            self._send(200, self.fake.stats())
        else:
            self._send(404, _error(404, f"no route {self.path}"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, _error(404, f"no route {self.path}"))
            return
        f = self.fake
        with f._lock:
            f.in_flight += 1
            f.max_in_flight = max(f.max_in_flight, f.in_flight)
        try:
            try:
                body = json.loads(raw)
                status, out = f.chat(body)
            except _BadRequest as exc:
                status, out = exc.status, _error(exc.status, str(exc))
            except ValueError as exc:
                status, out = 400, _error(400, f"invalid JSON: {exc}")
        finally:
            with f._lock:
                f.in_flight -= 1
        if status < 0:                  # died: drop the connection without an answer
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(status, out)


def parse_rates(text: str) -> Dict[int, float]:
    """"500=0.1,429=0.05" -> {500: 0.1, 429: 0.05}."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        status, _, rate = item.partition("=")
        try:
            out[int(status)] = float(rate)
        except ValueError:
            raise SystemExit(f"error: --fake-error-rate item {item!r} is not STATUS=FRACTION") from None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m annotate.fake_vllm",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="reported as the model's root (vLLM: the weights)")
    p.add_argument("--served-model-name", default=None, help="the name clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--fake-slots", type=int, default=0, help="requests served at once (0 = no limit)")
    p.add_argument("--fake-latency-s", type=float, default=0.0, help="seconds per request in a slot")
    p.add_argument("--fake-error-rate", default="", help="STATUS=FRACTION,... e.g. 500=0.1,429=0.05")
    p.add_argument("--fake-garbage-rate", type=float, default=0.0)
    p.add_argument("--fake-length-rate", type=float, default=0.0)
    p.add_argument("--fake-delay-rate", type=float, default=0.0)
    p.add_argument("--fake-delay-s", type=float, default=0.0)
    p.add_argument("--fake-die-after", type=int, default=0)
    p.add_argument("--fake-seed", type=int, default=0)
    args, ignored = p.parse_known_args(argv)     # vLLM's other arguments: accepted, ignored
    served = args.served_model_name
    if isinstance(served, str) and not served:
        served = None
    fake = FakeVllm(served or args.model, args.model, args.host, args.port,
                    slots=args.fake_slots, latency_s=args.fake_latency_s,
                    error_rates=parse_rates(args.fake_error_rate), garbage_rate=args.fake_garbage_rate,
                    length_rate=args.fake_length_rate, delay_rate=args.fake_delay_rate,
                    delay_s=args.fake_delay_s, die_after=args.fake_die_after, seed=args.fake_seed)
    fake.start()
    print(f"fake vLLM: serving {fake.name!r} (root {fake.model!r}) on {fake.url}"
          + (f"; ignored arguments: {' '.join(ignored)}" if ignored else ""), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and not fake.dead:
        stop.wait(0.2)
    fake.stop()
    print(f"fake vLLM: stopped after {fake.chat_requests} chat requests ({fake.answered} answered)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
