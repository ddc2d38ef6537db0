"""Chat completions at scale against one or more vLLM OpenAI-compatible servers.

    client = VlmClient(["http://node1:8000/v1", "http://node2:8000/v1"], max_concurrency=64)
    with client:
        models = client.models()                     # GET /v1/models of every server
        fut = client.submit({"model": "llava", "messages": [...], "temperature": 0})
        result = fut.result()                        # a ChatResult, never an HTTP exception

One asyncio event loop runs in a background thread for the client's lifetime and owns one
`openai.AsyncOpenAI` per server URL. `submit` is thread-safe and returns at once (a
concurrent.futures.Future), so the caller (the VLM labeler, called per write batch from
annotate/columns.py) keeps the next batch's requests queued while the previous batch finishes:
requests flow continuously instead of in lock-step batches.

Scheduling: a request takes a slot on the server with the fewest requests in flight among those
that are up and below `max_concurrency` (one bound per URL; extra requests wait here, not in the
server's queue). Retries are ours (the openai client's own are off, max_retries=0) so they are
counted:
- timeouts, HTTP 429 and 5xx: exponential backoff with full jitter (a uniform draw in
  [0, min(backoff_max_s, backoff_base_s * 2**attempt)]), at most `max_retries` times per request;
  then the request fails (`ChatResult.error`), and the labeler treats that as the annotator's
  failure on that sample;
- other 4xx (an image the server rejects, a wrong model name): not retried, failed at once;
- connection errors (refused, reset, the server died): the *server* is marked down for a cooldown
  (the same backoff per consecutive failure) and the request moves to another server; these do
  not use the request's retry budget, because a sample must not become an error record just
  because a server died (a request that alone keeps losing its connection while the servers
  answer others fails after 2 x servers x (max_retries + 1) + 2 such retries). When every
  server has failed more than `max_retries` times in a row,
  every pending and later request raises `AllServersDownError` naming the URLs: the caller stops
  (the shard being written is not committed; a rerun resumes), nothing hangs.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

RETRY_CAUSES = ("timeout", "connection", "429", "5xx")


class AllServersDownError(RuntimeError):
    """Every server URL refused or dropped connections more than max_retries times in a row."""


@dataclass
class ChatResult:
    """One request's outcome. `error` is "" when the server answered (whatever the answer)."""
    text: Optional[str] = None            # choices[0].message.content
    finish_reason: Optional[str] = None
    logprob: Optional[float] = None       # sum of the generated tokens' logprobs (if requested)
    has_logprobs: bool = False
    error: str = ""                       # why the request failed for good
    retries: Dict[str, int] = field(default_factory=dict)   # by cause, this request only
    latency_s: float = 0.0                # of the last attempt
    url: str = ""


class _Server:
    def __init__(self, url: str, limit: int):
        self.url, self.limit = url, limit
        self.client = None                 # AsyncOpenAI, created inside the loop
        self.inflight = 0
        self.dispatched = 0                # requests sent (ties of inflight go to the least used)
        self.completed = 0
        self.failures = 0                  # consecutive connection failures (0 = up)
        self.generation = 0                # bumped per counted failure: concurrent requests that
                                           # fail on the same outage count once
        self.cooldown_until = 0.0
        self.last_error = ""


class VlmClient:
    def __init__(self, urls: Sequence[str], *, api_key: str = "EMPTY", max_concurrency: int = 64,
                 timeout_s: float = 60.0, max_retries: int = 5, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 30.0, seed: Optional[int] = None):
        urls = [u.rstrip("/") for u in urls]
        if not urls:
            raise ValueError("vlm.urls is empty: give at least one server URL (http://host:port/v1)")
        if len(set(urls)) != len(urls):
            raise ValueError(f"vlm.urls lists a server twice: {urls}")
        if max_concurrency < 1:
            raise ValueError(f"vlm.max_concurrency must be >= 1, not {max_concurrency}")
        self.urls = urls
        self.api_key = api_key
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_base_s, self.backoff_max_s = float(backoff_base_s), float(backoff_max_s)
        self._servers = [_Server(u, int(max_concurrency)) for u in urls]
        self._rng = random.Random(seed)    # backoff jitter only: answers never depend on it
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._cond: Optional[asyncio.Condition] = None
        self._fatal: Optional[AllServersDownError] = None
        self._waiting = 0                  # requests waiting for a slot
        self._tasks: set = set()
        self.t_start = time.time()
        self.counters = {"requests": 0, "attempts": 0, "answered": 0, "failed": 0,
                         "retries": {c: 0 for c in RETRY_CAUSES},
                         "failed_by": {"timeout": 0, "429": 0, "5xx": 0, "4xx": 0, "other": 0}}
        self._latency_sum, self._latency_n, self._latency_max = 0.0, 0, 0.0
        self._recent = collections.deque(maxlen=4096)   # latencies, for percentiles

    # ------------------------------------------------------------------ lifetime
    @property
    def capacity(self) -> int:
        """Requests this client keeps in flight at most (all servers)."""
        return sum(s.limit for s in self._servers)

    def start(self) -> "VlmClient":
        if self._loop is not None:
            return self
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="vlm-client", daemon=True)
        self._thread.start()
        ready.wait()
        self._call(self._setup())
        self.t_start = time.time()
        return self

    async def _setup(self) -> None:
        try:
            import httpx2 as httpx     # openai >= 3 is built on httpx2
        except ImportError:
            import httpx               # openai 1.x / 2.x
        from openai import AsyncOpenAI

        self._cond = asyncio.Condition()
        for s in self._servers:
            # One connection per slot kept alive: the per-URL bound is ours, the pool only
            # has to hold it (its default keeps 100 idle connections, fewer than 64 x servers
            # would want on one client otherwise).
            limits = httpx.Limits(max_connections=s.limit + 8, max_keepalive_connections=s.limit + 8)
            s.client = AsyncOpenAI(base_url=s.url, api_key=self.api_key, max_retries=0,
                                   timeout=self.timeout_s,
                                   http_client=httpx.AsyncClient(limits=limits, timeout=self.timeout_s))

    def close(self) -> None:
        """Cancel what is still pending, close the connections, stop the loop thread."""
        if self._loop is None:
            return

        async def shutdown():
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for s in self._servers:
                if s.client is not None:
                    await s.client.close()

        try:
            self._call(shutdown(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> "VlmClient":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, coro, timeout: Optional[float] = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ requests
    def submit(self, payload: Dict) -> "concurrent.futures.Future[ChatResult]":
        """Queue one chat completion (the keyword arguments of chat.completions.create)."""
        if self._loop is None:
            raise RuntimeError("VlmClient.submit before start() (use it as a context manager)")
        return asyncio.run_coroutine_threadsafe(self._tracked(payload), self._loop)

    async def _tracked(self, payload: Dict) -> ChatResult:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            return await self._request(payload)
        finally:
            self._tasks.discard(task)

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt))

    async def _request(self, payload: Dict) -> ChatResult:
        import openai

        self.counters["requests"] += 1
        retries: Dict[str, int] = {}
        budget_used = 0
        while True:
            server = await self._acquire()
            generation = server.generation
            t0 = time.monotonic()
            cause, final = "", ""
            self.counters["attempts"] += 1
            try:
                resp = await server.client.chat.completions.create(**payload)
            except openai.APITimeoutError:
                cause = "timeout"
            except openai.APIConnectionError as exc:       # refused, reset, died mid-request
                cause = "connection"
                self._server_failed(server, generation, exc)
            except openai.APIStatusError as exc:
                if exc.status_code == 429:
                    cause = "429"
                elif exc.status_code >= 500:
                    cause = "5xx"
                else:                                       # the request itself is refused
                    final = f"HTTP {exc.status_code}: {_status_message(exc)}"
                    self.counters["failed_by"]["4xx"] += 1
            except openai.OpenAIError as exc:               # a malformed response body
                final = f"{type(exc).__name__}: {str(exc)[:200]}"
                self.counters["failed_by"]["other"] += 1
            else:
                latency = time.monotonic() - t0
                server.failures = 0
                server.completed += 1
                self.counters["answered"] += 1
                self._latency_sum += latency
                self._latency_n += 1
                self._latency_max = max(self._latency_max, latency)
                self._recent.append(latency)
                result = _parse(resp)
                result.retries, result.latency_s, result.url = retries, latency, server.url
                return result
            finally:
                await self._release(server)
            if final:
                self.counters["failed"] += 1
                return ChatResult(error=final, retries=retries, url=server.url)
            retries[cause] = retries.get(cause, 0) + 1
            self.counters["retries"][cause] += 1
            if cause == "connection":
                # Another server, or this one after its cooldown. Only a request that keeps
                # losing its connection while the servers answer others (one the server drops
                # every time) fails on its own; when the servers are down, the fatal error
                # (every server failed max_retries + 1 times in a row) comes well before that.
                if retries[cause] <= 2 * len(self._servers) * (self.max_retries + 1) + 2:
                    continue
                self.counters["failed"] += 1
                self.counters["failed_by"]["other"] += 1
                return ChatResult(error=f"connection lost {retries[cause]} times while the "
                                  "server(s) answered other requests", retries=retries,
                                  url=server.url)
            if budget_used >= self.max_retries:
                self.counters["failed"] += 1
                self.counters["failed_by"][cause] += 1
                what = {"timeout": f"timed out ({self.timeout_s:g} s)", "429": "HTTP 429",
                        "5xx": "HTTP 5xx"}[cause]
                return ChatResult(error=f"{what} after {self.max_retries} retries",
                                  retries=retries, url=server.url)
            await asyncio.sleep(self._backoff(budget_used))
            budget_used += 1

    async def _acquire(self) -> _Server:
        async with self._cond:
            arriving = True
            while True:
                if self._fatal is not None:
                    raise self._fatal
                now = time.monotonic()
                ready = [s for s in self._servers if s.cooldown_until <= now and s.inflight < s.limit]
                # A new request does not take a slot ahead of those already waiting: first come,
                # first served, so an earlier write batch is answered before a later one.
                if ready and not (arriving and self._waiting):
                    s = min(ready, key=lambda s: (s.inflight, s.dispatched))
                    s.inflight += 1
                    s.dispatched += 1
                    if self._waiting and (len(ready) > 1 or s.inflight < s.limit):
                        # More free slots (a server back from its cooldown): pass it on, or
                        # one release per wake-up would keep that server at one request.
                        self._cond.notify(1)
                    return s
                arriving = False
                # Wait for a freed slot (notified), or for the first cooldown to end; at most a
                # few seconds in any case, so that no lost wake-up can stall a request.
                cooling = [s.cooldown_until - now for s in self._servers if s.cooldown_until > now]
                self._waiting += 1
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout=min(cooling + [5.0]))
                except asyncio.TimeoutError:
                    pass
                finally:
                    self._waiting -= 1

    async def _release(self, server: _Server) -> None:
        async with self._cond:
            server.inflight -= 1
            # One slot freed: wake one waiter (the oldest: requests go out in submission order).
            # Waking all of them would cost O(queued requests) per answer.
            if self._fatal is not None:
                self._cond.notify_all()
            else:
                self._cond.notify(1)

    def _server_failed(self, server: _Server, generation: int, exc: BaseException) -> None:
        server.last_error = _short_error(exc)
        if generation != server.generation:
            return                           # this outage was counted by an earlier request
        server.generation += 1
        server.failures += 1
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (server.failures - 1))
        # Half to full delay: array tasks sharing a server do not all come back at once.
        server.cooldown_until = time.monotonic() + delay * self._rng.uniform(0.5, 1.0)
        if all(s.failures > self.max_retries for s in self._servers):
            self._fatal = AllServersDownError(
                "every vLLM server is down (no connection after "
                f"{self.max_retries + 1} attempts in a row each, with backoff): "
                + "; ".join(f"{s.url} ({s.last_error})" for s in self._servers)
                + ". Start the server(s) or fix vlm.urls; the shard being written was not "
                "committed, a rerun resumes from the committed shards.")

    # ------------------------------------------------------------------ models, stats
    def models(self) -> Dict[str, object]:
        """GET /v1/models of every server: {url: [model dicts]} or {url: "error text"}."""
        async def one(s: _Server):
            try:
                page = await s.client.models.list(timeout=min(self.timeout_s, 30.0))
                return [m.to_dict() for m in page.data]
            except Exception as exc:   # noqa: BLE001 - reported per URL, the caller decides
                return _short_error(exc)

        async def all_():
            return dict(zip(self.urls, await asyncio.gather(*(one(s) for s in self._servers))))

        return self._call(all_())

    def stats(self) -> Dict:
        """A snapshot of the counters (read from another thread: plain ints, copied)."""
        c = self.counters
        lat = sorted(self._recent)
        elapsed = max(time.time() - self.t_start, 1e-9)
        out = {"requests": c["requests"], "attempts": c["attempts"], "answered": c["answered"],
               "failed": c["failed"], "retries": dict(c["retries"]),
               "failed_by": dict(c["failed_by"]),
               "retries_total": sum(c["retries"].values()),
               "answered_per_s": round(c["answered"] / elapsed, 2),
               "latency_s": {"mean": round(self._latency_sum / max(self._latency_n, 1), 4),
                             "p50": round(lat[len(lat) // 2], 4) if lat else None,
                             "p95": round(lat[int(len(lat) * 0.95)], 4) if lat else None,
                             "max": round(self._latency_max, 4)},
               "servers": {s.url: {"in_flight": s.inflight, "sent": s.dispatched,
                                   "answered": s.completed, "down": s.failures > 0,
                                   **({"last_error": s.last_error} if s.last_error else {})}
                           for s in self._servers}}
        return out


def _parse(resp) -> ChatResult:
    """The first choice's text, finish reason and summed token logprobs; a response without a
    choice gives text None (the labeler counts it as an unparseable answer)."""
    choices = getattr(resp, "choices", None) or []
    if not choices:
        return ChatResult()
    ch = choices[0]
    msg = getattr(ch, "message", None)
    out = ChatResult(text=getattr(msg, "content", None), finish_reason=getattr(ch, "finish_reason", None))
    content = getattr(getattr(ch, "logprobs", None), "content", None)
    if content:
        try:
            out.logprob = float(sum(float(t.logprob) for t in content))
            out.has_logprobs = True
        except (TypeError, ValueError):
            pass
    return out


def _status_message(exc) -> str:
    """The server's error message (vLLM: {"error": {"message": ...}} or {"message": ...})."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        msg = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if msg:
            return str(msg)[:300]
    return str(getattr(exc, "message", exc))[:300]


def _short_error(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = f"{type(exc).__name__}: {exc}"
    if cause is not None and str(cause):
        text += f" ({type(cause).__name__}: {cause})"
    return text[:300]


__all__ = ["AllServersDownError", "ChatResult", "RETRY_CAUSES", "VlmClient"]
