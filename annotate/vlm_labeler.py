"""The VLM labeler: a vision chat model (LLaVA, ...) served by vLLM labels images with candidate
sets. Each prompt in `vlm.prompts` is one annotator (d = len(prompts)), as CLIP's templates are.

    coreg-annotate vlm --config configs/demo.yaml vlm.model=llava vlm.urls=[http://node1:8000/v1]
    coreg-annotate vlm ... vlm.mode=topk vlm.topk=5 vlm.candidates_column=clip vlm.column=llava_top5
    coreg-annotate vlm ... vlm.server.launch=true vlm.server.model=/models/llava-1.5-7b-hf
    coreg-annotate vlm ... --redo-errors         # ask again for the samples with error records
    coreg-annotate status --config configs/demo.yaml --labeler vlm

Per image and prompt, one chat completion: the image (resized so that its longest side is at
most `vlm.image_size`, never enlarged; PNG or JPEG) as a base64 data-URL `image_url` part, then
the prompt with the allowed answers listed, and the answer constrained to them with
`structured_outputs: {"choice": [...]}` (vLLM >= 0.12; the older `guided_choice` is silently
ignored by vLLM 0.32). The allowed answers:
- `vlm.mode=all`: every class name;
- `vlm.mode=topk`: the `vlm.topk` classes with the highest template-averaged probability in
  `vlm.candidates_column` (from its stored `topi`/`topp`), or that column's candidate set `cand`
  when it stores no scores ("CLIP proposes, the VLM chooses"). They are listed in class-index
  order, so the prompt does not reveal the other annotator's ranking.

The candidate set is the union of the annotators' valid answers. An answer that is not one of the
allowed ones, or that did not finish ("length": max_tokens too small), is an abstention; a request
that failed for good (retries exhausted, a 4xx) is a failure. Both are counted per shard
(`labeler_stats` in the shard's marker) and never stop the run; a sample on which every annotator
abstained or failed gets an error record (`LabelError: ...`), which `--redo-errors` retries.
With `vlm.logprobs`, the chosen answer's probability is exp(sum of its tokens' logprobs): vLLM
applies the grammar mask before the logprobs, so this is a probability over the allowed answers.

Stored per sample (docs/format.md): `cand.npy`, `votes.npy` int16 (d,) (-1 = abstained or
failed), with logprobs `topi.npy` int16 (d, 1) (the vote) and `topp.npy` float16 (d, 1) (its
probability, 0 when abstained), and `raw.json`: the d answer texts ("" for a failed request), so
that the column can be re-derived (another parser, another rule) without asking the model again.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from annotate.vlm_client import AllServersDownError, ChatResult, VlmClient
from coreg_dist.config import ConfigError
from coreg_dist.shards.format import CAND, TOPI, TOPP, FormatError, read_manifest
from coreg_dist.shards.reader import ErrorLog

RAW = "raw.json"
# How the prompt text and the allowed answers are put together (part of the content hash: a
# change here changes what the model is asked).
PROMPT_FORMAT = 1
CHOICES_PLACEHOLDER = "{choices}"
STAT_KEYS = ("requests", "answered", "abstentions", "abstained_not_a_choice", "abstained_unfinished",
             "abstained_no_logprobs", "failures", "retries", "retries_timeout", "retries_connection",
             "retries_429", "retries_5xx", "samples_all_abstained", "samples_without_choices")


def prompt_text(prompt: str, choices: Sequence[str]) -> str:
    """The prompt with the allowed answers: at `{choices}` if the prompt has it, else appended."""
    listing = ", ".join(choices)
    if CHOICES_PLACEHOLDER in prompt:
        return prompt.replace(CHOICES_PLACEHOLDER, listing)
    return f"{prompt}\nAnswer with exactly one of: {listing}."


def encode_image(img, image_size: int, image_format: str) -> str:
    """A base64 data URL of the image, its longest side at most image_size (never enlarged)."""
    from PIL import Image

    w, h = img.size
    if max(w, h) > image_size:
        scale = image_size / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    if image_format == "jpeg":
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
        img.save(buf, format="JPEG", quality=95)
        mime = "image/jpeg"
    else:
        if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
            img = img.convert("RGB")   # 16-bit, float, CMYK: not what a VLM's processor expects
        img.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def topk_choices(record: Dict, k: int, num_classes: int) -> List[int]:
    """The k classes with the highest template-averaged probability of a candidate column's
    record (its top-few `topi`/`topp`, classes it did not store count as 0), in class-index
    order; without scores, its candidate set `cand`."""
    if TOPI in record and TOPP in record:
        idx = np.asarray(record[TOPI], dtype=np.int64)
        val = np.asarray(record[TOPP], dtype=np.float64)
        if idx.ndim == 1:
            idx, val = idx[None], val[None]
        # a VLM column's abstentions are stored as -1: they add nothing to any class
        valid = (idx >= 0) & (idx < num_classes)
        avg = np.zeros(num_classes)
        np.add.at(avg, idx[valid], val[valid])
        avg /= idx.shape[0]
        order = np.argsort(-avg, kind="stable")      # ties: the lower class index first
        top = order[: min(k, int(np.count_nonzero(avg > 0)))]
        if len(top):                                 # classes without a stored score are left out
            return sorted(int(c) for c in top)
    cand = np.asarray(record.get(CAND, []), dtype=np.int64).reshape(-1)
    cand = sorted({int(c) for c in cand if 0 <= c < num_classes})
    return cand


@dataclass
class _Pending:
    n: int                                    # samples in the batch
    futures: List[Optional[List]]             # per sample: d futures, or None (not asked)
    choices: List[List[int]]
    skip_reason: List[str]                    # per sample: why it was not asked ("" = asked)


class VlmLabeler:
    needs_images = True
    # Two shards written at once (annotate/columns.py): a shard is committed only when its last
    # answers are in; meanwhile the other shard's requests keep the servers busy.
    parallel_shards = 2

    def __init__(self, cfg_vlm, class_names: Sequence[str], client: Optional[VlmClient] = None,
                 server_models: Optional[Dict] = None):
        c = cfg_vlm
        if not c.prompts:
            raise ConfigError("config key 'vlm.prompts' is empty: give at least one prompt "
                              "(each is one annotator)")
        if c.mode not in ("all", "topk"):
            raise ConfigError(f"config key 'vlm.mode' must be 'all' or 'topk', not {c.mode!r}")
        if c.image_format not in ("png", "jpeg"):
            raise ConfigError(f"config key 'vlm.image_format' must be 'png' or 'jpeg', not "
                              f"{c.image_format!r}")
        if c.image_size < 1:
            raise ConfigError(f"config key 'vlm.image_size' must be >= 1, not {c.image_size}")
        if c.mode == "topk" and c.topk < 1:
            raise ConfigError(f"config key 'vlm.topk' must be >= 1, not {c.topk}")
        if not c.model:
            raise ConfigError("config key 'vlm.model' is empty: the served model name (vLLM's "
                              "--served-model-name, what GET /v1/models lists)")
        names = [str(n) for n in class_names]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise FormatError(f"the dataset's class names must be distinct to be a VLM's answers; "
                              f"repeated: {dup}")
        self.cfg = c
        self.class_names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.prompts = [str(p) for p in c.prompts]
        self.client = client
        self.server_models = server_models or {}
        self.input_columns = (c.candidates_column,) if c.mode == "topk" else ()
        self.totals = {k: 0 for k in STAT_KEYS}        # over the labeler's life (progress lines)
        self.images_done = 0
        self._totals_lock = threading.Lock()           # collect() runs in one thread per shard

    # ------------------------------------------------------------------ pipelining
    @property
    def pipeline_batches(self) -> int:
        """How many write batches write_column keeps submitted ahead of the one it writes: at
        least two, and enough queued requests to fill every server slot twice over, so that
        the servers stay busy while this process reads, decodes and encodes the next batch
        (and while the client's thread waits for the GIL)."""
        if self.client is None:
            return 2
        per_batch = max(1, int(self.cfg.batch_size) * len(self.prompts))
        return max(2, math.ceil(2 * self.client.capacity / per_batch))

    def _payload(self, data_url: str, prompt: str, choice_names: List[str]) -> Dict:
        c = self.cfg
        payload = {"model": c.model, "temperature": float(c.temperature),
                   "messages": [{"role": "user", "content": [
                       {"type": "image_url", "image_url": {"url": data_url}},
                       {"type": "text", "text": prompt_text(prompt, choice_names)}]}],
                   "extra_body": {"structured_outputs": {"choice": choice_names}}}
        if c.max_tokens > 0:
            payload["max_tokens"] = int(c.max_tokens)
        if c.logprobs:
            payload["logprobs"] = True
        return payload

    def submit(self, images: List, true: np.ndarray, keys: List[str],
               inputs: Optional[List[Dict]] = None) -> _Pending:
        """Encode the batch's images and queue its requests (returns at once)."""
        if self.client is None:
            raise RuntimeError("VlmLabeler without a client: build it with VlmClient (annotate_vlm)")
        C = len(self.class_names)
        pend = _Pending(len(keys), [], [], [])
        for j in range(len(keys)):
            if self.cfg.mode == "topk":
                rec = (inputs[j] or {}).get(self.cfg.candidates_column) if inputs else None
                if rec is None:
                    pend.futures.append(None)
                    pend.choices.append([])
                    pend.skip_reason.append(f"candidates column '{self.cfg.candidates_column}' has "
                                            "an error record for this sample")
                    continue
                choices = topk_choices(rec, int(self.cfg.topk), C)
                if not choices:
                    pend.futures.append(None)
                    pend.choices.append([])
                    pend.skip_reason.append(f"candidates column '{self.cfg.candidates_column}' "
                                            "gives no class for this sample")
                    continue
            else:
                choices = list(range(C))
            names = [self.class_names[i] for i in choices]
            url = encode_image(images[j], int(self.cfg.image_size), self.cfg.image_format)
            pend.futures.append([self.client.submit(self._payload(url, p, names)) for p in self.prompts])
            pend.choices.append(choices)
            pend.skip_reason.append("")
        return pend

    def cancel(self, pend: _Pending) -> None:
        for futs in pend.futures:
            for f in futs or ():
                f.cancel()

    def collect(self, pend: _Pending) -> Dict:
        """Wait for the batch's answers and turn them into per-sample fields."""
        d, C = len(self.prompts), len(self.class_names)
        Y = np.zeros((pend.n, C), dtype=bool)
        votes = np.full((pend.n, d), -1, dtype=np.int16)
        probs = np.zeros((pend.n, d), dtype=np.float32)
        raw: List[bytes] = []
        errors: List[str] = []
        stats = {k: 0 for k in STAT_KEYS}
        for j in range(pend.n):
            futs = pend.futures[j]
            if futs is None:
                stats["samples_without_choices"] += 1
                errors.append(pend.skip_reason[j])
                raw.append(b"")
                continue
            allowed = {self.class_names[i] for i in pend.choices[j]}
            texts, why = [], []
            for p, fut in enumerate(futs):
                r: ChatResult = fut.result()        # AllServersDownError propagates: stop
                stats["requests"] += 1
                for cause, n in r.retries.items():
                    stats["retries"] += n
                    stats[f"retries_{cause}"] += n
                if r.error:
                    stats["failures"] += 1
                    texts.append("")
                    why.append(f"prompt {p}: failed ({r.error})")
                    continue
                text = r.text if isinstance(r.text, str) else ""
                texts.append(text)
                answer = text if text in allowed else text.strip()
                if r.finish_reason != "stop":
                    stats["abstained_unfinished"] += 1
                    why.append(f"prompt {p}: abstained (finish_reason {r.finish_reason!r}, {text[:40]!r})")
                elif answer not in allowed:
                    stats["abstained_not_a_choice"] += 1
                    why.append(f"prompt {p}: abstained (not a choice: {text[:40]!r})")
                elif self.cfg.logprobs and not r.has_logprobs:
                    stats["abstained_no_logprobs"] += 1
                    why.append(f"prompt {p}: abstained (logprobs requested, none returned)")
                else:
                    stats["answered"] += 1
                    cls = self.index[answer]
                    votes[j, p] = cls
                    Y[j, cls] = True
                    if self.cfg.logprobs:
                        probs[j, p] = math.exp(min(0.0, r.logprob))
                    continue
                stats["abstentions"] += 1
            raw.append(json.dumps(texts, ensure_ascii=False).encode("utf-8"))
            if Y[j].any():
                errors.append("")
            else:
                stats["samples_all_abstained"] += 1
                errors.append("every annotator abstained or failed: " + "; ".join(why))
        with self._totals_lock:
            for k, v in stats.items():
                self.totals[k] += v
            self.images_done += pend.n
        out = {"Y": Y, "votes": votes, "errors": errors, "fields": {RAW: raw}, "stats": stats}
        if self.cfg.logprobs:
            out["topi"] = votes[:, :, None].copy()
            out["topp"] = probs[:, :, None].astype(np.float16)
        return out

    def label(self, images: List, true: np.ndarray, keys: List[str],
              inputs: Optional[List[Dict]] = None) -> Dict:
        return self.collect(self.submit(images, true, keys, inputs=inputs))

    # ------------------------------------------------------------------ provenance
    def provenance(self) -> Dict:
        c = self.cfg
        p = {"annotator": "vlm", "model": c.model, "prompts": list(self.prompts),
             "prompt_format": PROMPT_FORMAT, "mode": c.mode,
             "choices": "all classes" if c.mode == "all" else f"top-{c.topk} of column {c.candidates_column}",
             "temperature": float(c.temperature), "max_tokens": int(c.max_tokens),
             "logprobs": bool(c.logprobs), "image_size": int(c.image_size),
             "image_format": c.image_format, "constraint": "structured_outputs.choice",
             "num_classes": len(self.class_names)}
        if c.mode == "topk":
            p.update({"candidates_column": c.candidates_column, "topk": int(c.topk)})
        if self.server_models:
            p["server_model"] = self.server_models     # root, max_model_len (from /v1/models)
        return p

    def content_provenance(self) -> Dict:
        """What determines the column's bytes: the model (by its served name: name different
        weights differently), the prompts and how the choices are put in, the choice mode,
        the decoding parameters, the image size and format. Not: server URLs, concurrency,
        timeouts, retries (they change when an answer comes, never what it is); the model's
        root as /v1/models reports it is recorded in provenance, not hashed (a moved copy of
        the weights, or a per-node path, gives the same column)."""
        p = dict(self.provenance())
        p.pop("server_model", None)
        return p


def probe_servers(client: VlmClient, model: str) -> Dict:
    """Ask every server for its models: the served name must be listed, and the servers that
    answer must serve the same weights under it. Returns {id, root, max_model_len} of the model.
    Servers that do not answer are left to the client (marked down when requests fail); none
    answering is an error naming the URLs."""
    found = client.models()
    cards, down, problems = {}, [], []
    for url, res in found.items():
        if isinstance(res, str):
            down.append(f"{url} ({res})")
            continue
        card = next((m for m in res if m.get("id") == model), None)
        if card is None:
            problems.append(f"{url} serves {[m.get('id') for m in res]}, not {model!r}")
        else:
            cards[url] = {k: card.get(k) for k in ("id", "root", "max_model_len") if card.get(k) is not None}
    if problems:
        raise ConfigError("config key 'vlm.model': the model is not served where vlm.urls point: " + "; ".join(problems)
                         + " (set vlm.model to the served name, vLLM's --served-model-name)")
    if not cards:
        raise AllServersDownError("no vLLM server answered GET /v1/models: " + "; ".join(down)
                                  + ". Start the server(s) (or vlm.server.launch=true) or fix vlm.urls.")
    roots = {json.dumps(c, sort_keys=True) for c in cards.values()}
    if len(roots) > 1:
        raise ConfigError(f"the servers in vlm.urls serve different models under {model!r}: {cards}")
    if down:
        print(f"warning: not answering (the client retries them and uses the others): "
              f"{'; '.join(down)}", flush=True)
    return next(iter(cards.values()))


# ---------------------------------------------------------------------- the command
def _fatal_errors() -> tuple:
    """What stops `coreg-annotate vlm` with a message (nothing committed is lost)."""
    errs = [AllServersDownError]
    try:
        from annotate.vllm_server import VllmServerError
        errs.append(VllmServerError)
    except ImportError:
        pass
    return tuple(errs)


class ProgressLine:
    """A line every `every_s` seconds while the annotation runs (a terminal: 5 s; a log file:
    30 s), and one at the end: images/s, requests/s, abstentions, failures, retries, latency."""

    def __init__(self, labeler: VlmLabeler, client: VlmClient, every_s: Optional[float] = None):
        self.labeler, self.client = labeler, client
        self.every_s = every_s if every_s is not None else (5.0 if sys.stdout.isatty() else 30.0)
        self.t0 = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlm-progress", daemon=True)

    def line(self) -> str:
        dt = max(time.time() - self.t0, 1e-9)
        st, tot = self.client.stats(), self.labeler.totals
        r = st["retries"]
        in_flight = sum(s["in_flight"] for s in st["servers"].values())
        down = [u for u, s in st["servers"].items() if s["down"]]
        return (f"vlm: {self.labeler.images_done} images ({self.labeler.images_done / dt:.1f}/s), "
                f"{st['answered']} answers ({st['answered'] / dt:.1f} requests/s), "
                f"{in_flight} in flight, {tot['abstentions']} abstentions, "
                f"{st['failed']} failed requests, {st['retries_total']} retries "
                f"({', '.join(f'{k} {v}' for k, v in r.items())}), latency p50 "
                f"{st['latency_s']['p50']} s p95 {st['latency_s']['p95']} s"
                + (f"; down: {', '.join(down)}" if down else ""))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            print(self.line(), flush=True)

    def __enter__(self) -> "ProgressLine":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        print(self.line(), flush=True)


def annotate_vlm(cfg, task_index: int = 0, num_tasks: int = 1) -> Dict:
    """`coreg-annotate vlm`: label this task's share of the shards of vlm.splits into the column
    vlm.column, through the servers at vlm.urls, or through one server this task starts and
    stops (vlm.server.launch=true). A run that loses every server stops with an error naming
    them; the shard being written is not committed and the rerun resumes from there."""
    from annotate.cli import _annotation_report
    from annotate.columns import requested_splits, write_column

    v = cfg.vlm
    manifest = read_manifest(cfg.data.root)
    splits = requested_splits(cfg.data.root, manifest, v.splits, "vlm.splits")
    if v.server.launch and not v.model:
        v.model = v.server.model            # vLLM's default served name is the model argument
    errors = ErrorLog()
    t0 = time.time()
    with contextlib.ExitStack() as stack:
        urls = list(v.urls)
        if v.server.launch:
            from annotate.vllm_server import VllmServer, default_log_path
            server = stack.enter_context(VllmServer(v.server, served_model_name=v.model,
                                                    log_path=default_log_path(cfg, task_index)))
            urls = [server.url]
            print(f"vlm: started {v.server.module} serving {v.model!r} at {server.url}", flush=True)
        client = stack.enter_context(VlmClient(
            urls, api_key=v.api_key, max_concurrency=v.max_concurrency, timeout_s=v.timeout_s,
            max_retries=v.max_retries, backoff_base_s=v.backoff_base_s, backoff_max_s=v.backoff_max_s))
        served = probe_servers(client, v.model)
        labeler = VlmLabeler(v, manifest.classes, client=client, server_models=served)
        print(f"vlm: {v.model!r} ({served.get('root', '?')}) on {len(urls)} server(s), "
              f"{len(labeler.prompts)} prompt(s), mode {v.mode}, up to {v.max_concurrency} requests "
              f"in flight per server -> column '{v.column}'", flush=True)
        stack.enter_context(ProgressLine(labeler, client))
        stats = write_column(cfg.data.root, manifest, v.column, splits, labeler,
                             batch_size=v.batch_size, single_template=0,
                             overwrite=cfg.annotator.overwrite, redo_errors=cfg.annotator.redo_errors,
                             task_index=task_index, num_tasks=num_tasks, errors=errors)
        client_stats = client.stats()
        summary = {"labeler": dict(labeler.totals), "client": client_stats,
                   "images": labeler.images_done, "server_model": served}
    return _annotation_report(cfg, stats, errors, time.time() - t0, single_template=v.prompts[0],
                              name="vlm_annotation_stats.json", extra={"vlm": summary},
                              task=(task_index, num_tasks))


__all__ = ["RAW", "ProgressLine", "VlmLabeler", "annotate_vlm", "encode_image", "probe_servers",
           "prompt_text", "topk_choices"]
