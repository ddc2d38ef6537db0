"""The VLM annotator (annotate/vlm_labeler.py, vlm_client.py) against the fake vLLM server
(annotate/fake_vllm.py) over real HTTP with the official openai client: candidate sets, votes and
raw answers; CLIP-proposes-VLM-chooses (mode=topk); retries, timeouts, abstentions, dead servers,
balancing; provenance (stale / overwrite / --redo-errors); kill -9 and resume byte-identically."""
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from annotate.cli import main as cli_main
from annotate.columns import write_column
from annotate.fake_vllm import FakeVllm, answer_probability
from annotate.provenance import StaleColumnError
from annotate.vlm_client import VlmClient
from annotate.vlm_labeler import (RAW, annotate_vlm, encode_image, probe_servers, prompt_text,
                                  topk_choices)
from coreg_dist.config import ConfigError, load_config
from coreg_dist.shards.format import (CAND, TOPI, TOPP, VOTES, column_shard_path, image_shard_path,
                                      read_column_info, read_manifest, stats_path)
from coreg_dist.shards.reader import ErrorLog, iter_joined, iter_tar
from tests.helpers import ROOT, make_dataset

C = 4
NAMES = [f"class{c}" for c in range(C)]
PROMPTS = ["P0: what is it?", "P1: which class?", "P2: name it."]
QUIET = dict(stream=open(os.devnull, "w"))


def bar_class(image: bytes) -> int:
    """The class tests/helpers.class_images drew: the row band of the bright bar."""
    a = np.asarray(Image.open(io.BytesIO(image)).convert("L"), dtype=np.float32)
    return int(a.mean(1).argmax()) // max(1, a.shape[0] // C)


def oracle(image: bytes, text: str, choices):
    """P0 answers the true class, P1 the next one, P2 something that is not a choice."""
    y = bar_class(image)
    if text.startswith("P0"):
        return NAMES[y]
    if text.startswith("P1"):
        return NAMES[(y + 1) % C]
    return "not a class"


@pytest.fixture()
def ds(tmp_path):
    root = str(tmp_path / "ds")
    make_dataset(root, n_train=24, n_test=8, num_classes=C, shard_size=8, size=16)
    return root, tmp_path


@pytest.fixture()
def fake():
    servers = []

    def start(**kw):
        s = FakeVllm("tiny", "/models/tiny", **kw).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def overrides(root, tmp, urls, *extra):
    return [f"data.root={root}", f"run.out_dir={tmp}/run", "vlm.model=tiny",
            "vlm.urls=[" + ",".join(urls) + "]", "vlm.batch_size=4", "vlm.max_concurrency=8",
            "vlm.backoff_base_s=0.001", "vlm.backoff_max_s=0.01",
            "vlm.prompts=[" + ",".join(f"'{p}'" for p in PROMPTS) + "]", *extra]


def tars(root, column):
    folder = os.path.join(root, "columns", column)
    return {n: open(os.path.join(folder, n), "rb").read()
            for n in sorted(os.listdir(folder)) if n.endswith(".tar")}


def marker(root, column, shard):
    return json.load(open(stats_path(column_shard_path(root, column, shard))))


def records(root, split, column="llava"):
    return {s["key"]: (s[column], s["image"], s["cls"])
            for s in iter_joined(root, split, [column], errors=ErrorLog(**QUIET))}


# ---------------------------------------------------------------------- what is stored
def test_candidate_sets_votes_and_raw_answers_for_known_answers(ds, fake):
    root, tmp = ds
    f = fake(answer_fn=oracle)
    report = annotate_vlm(load_config(None, overrides(root, tmp, [f.url])))
    n = 0
    for split in ("train", "test"):
        for key, (col, img, y) in records(root, split).items():
            n += 1
            assert y == bar_class(_png(img))          # the oracle sees what the labels say
            nxt = (y + 1) % C
            assert col[CAND].dtype == np.int16 and col[CAND].tolist() == sorted({y, nxt})
            assert col[VOTES].dtype == np.int16 and col[VOTES].tolist() == [y, nxt, -1]
            assert col[RAW] == [NAMES[y], NAMES[nxt], "not a class"]
            assert col[TOPI].shape == (3, 1) and col[TOPI][:, 0].tolist() == [y, nxt, -1]
            assert col[TOPP].dtype == np.float16 and col[TOPP][2, 0] == 0
            # the stored probability is exp(sum of the answer's token logprobs), from the
            # exact image bytes and prompt text the labeler sent
            sent = base64.b64decode(encode_image(img, 336, "png").split(",", 1)[1])
            p0 = answer_probability(sent, prompt_text(PROMPTS[0], NAMES))
            assert col[TOPP][0, 0] == np.float16(p0)
    assert n == 32 and f.answered == 3 * 32
    m = marker(root, "llava", "train-000000")
    assert m["labeler_stats"]["requests"] == 24 and m["labeler_stats"]["abstentions"] == 8
    assert m["labeler_stats"]["abstained_not_a_choice"] == 8 and m["labeler_stats"]["retries"] == 0
    assert m["provenance"]["server_model"] == {"id": "tiny", "root": "/models/tiny", "max_model_len": 4096}
    info = read_column_info(root, "llava")
    assert info["complete"] and info["provenance"]["prompts"] == PROMPTS
    train = info["splits"]["train"]
    # P0 is always right, P1 never, P2 abstains; the plurality of (y, y+1) is the lower class
    assert train["per_template_acc"] == [1.0, 0.0, 0.0] and train["coverage"] == 1.0
    ys = [y for _, _, y in records(root, "train").values()]
    assert train["template_avg_acc"] == pytest.approx(np.mean([y != C - 1 for y in ys]))
    assert report["vlm"]["labeler"]["abstentions"] == 32


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_garbage_and_cut_answers_are_abstentions_never_a_crash(ds, fake):
    root, tmp = ds
    f = fake(garbage_rate=0.3, length_rate=0.3)
    errors = ErrorLog(**QUIET)
    cfg = load_config(None, overrides(root, tmp, [f.url], "vlm.splits=[train]"))
    from annotate.vlm_labeler import VlmLabeler
    with VlmClient([f.url], max_concurrency=8) as client:
        lab = VlmLabeler(cfg.vlm, NAMES, client=client, server_models=probe_servers(client, "tiny"))
        write_column(root, read_manifest(root), "llava", ["train"], lab, batch_size=4, errors=errors)
    stats = [marker(root, "llava", f"train-00000{i}")["labeler_stats"] for i in range(3)]
    abst = sum(s["abstentions"] for s in stats)
    assert abst == sum(s["abstained_not_a_choice"] + s["abstained_unfinished"] for s in stats)
    assert 10 <= abst <= 60 and sum(s["requests"] for s in stats) == 72
    abstained_in_records, err_records = 0, 0
    for i in range(3):
        for key, fields in iter_tar(column_shard_path(root, "llava", f"train-00000{i}")):
            if "err.txt" in fields:
                err_records += 1
                assert fields["err.txt"].decode().startswith("LabelError: every annotator abstained")
                continue
            votes = np.load(io.BytesIO(fields["votes.npy"]), allow_pickle=False).tolist()
            raw = json.loads(fields[RAW])
            # "~garbage~" (not a choice) and "cla" (cut short: finish_reason length) abstain
            assert [v == -1 for v in votes] == [t not in NAMES for t in raw]
            assert set(raw) - set(NAMES) <= {"~garbage~", "cla"}
            abstained_in_records += votes.count(-1)
    assert abstained_in_records + 3 * err_records == abst
    assert errors.counts.get("label_error", 0) == err_records
    assert sum(marker(root, "llava", f"train-00000{i}")["error_records"] for i in range(3)) == err_records


# ---------------------------------------------------------------------- CLIP proposes, the VLM chooses
class ScoresLabeler:
    """A CLIP-like column with known scores: 2 templates, top-3 stored; sample i's template
    average ranks class (i % 4) first, then (i + 2) % 4, then (i + 1) % 4."""
    needs_images = False

    def label(self, images, true, keys):
        B = len(keys)
        topi = np.zeros((B, 2, 3), np.int16)
        topp = np.zeros((B, 2, 3), np.float16)
        for j, k in enumerate(keys):
            i = int(k.rsplit("_", 1)[1])
            a, b, c = i % 4, (i + 2) % 4, (i + 1) % 4
            topi[j] = [[a, b, c], [b, a, c]]
            topp[j] = [[0.6, 0.3, 0.1], [0.45, 0.4, 0.15]]    # average: a .5, b .375, c .125
        Y = np.zeros((B, 4), bool)
        for j in range(B):
            Y[j, topi[j, :, 0]] = True
        errs = ["no scores for this one" if k == "train_00005" else "" for k in keys]
        return {"Y": Y, "votes": topi[:, :, 0], "topi": topi, "topp": topp, "errors": errs}

    def provenance(self):
        return {"annotator": "scores-test"}


def test_topk_mode_offers_the_candidate_columns_top_classes(ds, fake):
    root, tmp = ds
    write_column(root, read_manifest(root), "clip", ["train"], ScoresLabeler(), errors=ErrorLog(**QUIET))
    f = fake()
    f.keep_log = True
    annotate_vlm(load_config(None, overrides(root, tmp, [f.url], "vlm.mode=topk", "vlm.topk=2",
                                             "vlm.candidates_column=clip", "vlm.column=top2",
                                             "vlm.splits=[train]")))
    offered = {}
    for entry in f.requests_log:
        offered.setdefault(tuple(entry["choices"]), 0)
        offered[tuple(entry["choices"])] += 1
    recs = {k: v for k, v in records(root, "train", "top2").items() if CAND in v[0]}
    assert len(recs) == 23                       # train_00005: the input column's error record
    for key, (col, _, _) in recs.items():
        i = int(key.rsplit("_", 1)[1])
        top2 = sorted({i % 4, (i + 2) % 4})
        assert set(col[CAND].tolist()) <= set(top2)
        assert all(NAMES[v] in [NAMES[c] for c in top2] for v in col[VOTES].tolist() if v >= 0)
    # every request offered exactly a sample's top-2 (listed in class order), never more
    assert set(offered) <= {tuple(NAMES[c] for c in sorted({a, (a + 2) % 4})) for a in range(4)}
    assert sum(offered.values()) == 23 * 3
    err = dict(iter_tar(column_shard_path(root, "top2", "train-000000")))["train_00005"]
    assert err["err.txt"].decode() == ("LabelError: candidates column 'clip' has an error record "
                                       "for this sample")
    m = marker(root, "top2", "train-000000")
    assert m["content_inputs"]["input_columns"] == {"clip": marker(root, "clip", "train-000000")["content_hash"]}
    assert m["labeler_stats"]["samples_without_choices"] == 1


def test_topk_choices_from_scores_or_candidate_set():
    rec = {TOPI: np.array([[2, 0, 1], [0, 2, 3]], np.int16),
           TOPP: np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]], np.float16)}
    assert topk_choices(rec, 2, 5) == [0, 2]         # averages 0: .45, 2: .4, 1: .1, 3: .05
    assert topk_choices(rec, 9, 5) == [0, 1, 2, 3]   # class 4 has no stored score: left out
    assert topk_choices({CAND: np.array([3, 1], np.int16)}, 1, 5) == [1, 3]   # no scores: the set
    vlm = {TOPI: np.array([[1], [-1]], np.int16), TOPP: np.array([[0.9], [0.0]], np.float16)}
    assert topk_choices(vlm, 3, 5) == [1]            # an abstention (-1) counts for nothing


# ---------------------------------------------------------------------- retries, timeouts, failures
@pytest.mark.parametrize("status,cause", [(500, "5xx"), (429, "429")])
def test_retries_on_server_errors_then_success_are_counted(ds, fake, status, cause):
    root, tmp = ds
    clean = fake()
    annotate_vlm(load_config(None, overrides(root, tmp, [clean.url], "vlm.splits=[train]",
                                             "vlm.column=clean")))
    flaky = fake(fail_attempts=2, fail_status=status)
    report = annotate_vlm(load_config(None, overrides(root, tmp, [flaky.url], "vlm.splits=[train]")))
    assert flaky.by_status[status] == 144 and flaky.answered == 72 and flaky.chat_requests == 216
    assert report["vlm"]["client"]["retries"][cause] == 144
    assert sum(marker(root, "llava", f"train-00000{i}")["labeler_stats"][f"retries_{cause}"]
               for i in range(3)) == 144
    assert tars(root, "llava") == tars(root, "clean")     # retried answers are the same answers


def test_a_timeout_is_retried(ds, fake):
    root, tmp = ds
    f = fake(delay_attempts=1, delay_s=1.5)
    report = annotate_vlm(load_config(None, overrides(root, tmp, [f.url], "vlm.splits=[test]",
                                                      "vlm.timeout_s=0.4", "vlm.max_concurrency=24",
                                                      "vlm.batch_size=8")))
    assert report["vlm"]["client"]["retries"]["timeout"] == 24
    assert report["vlm"]["client"]["failed"] == 0
    assert marker(root, "llava", "test-000000")["labeler_stats"]["retries_timeout"] == 24
    assert len(records(root, "test")) == 8


def test_failed_requests_give_error_records_that_redo_errors_retries(ds, fake):
    root, tmp = ds
    clean = fake()
    annotate_vlm(load_config(None, overrides(root, tmp, [clean.url], "vlm.splits=[test]", "vlm.column=clean")))
    down = fake(fail_attempts=100, fail_status=503)
    ov = overrides(root, tmp, [down.url], "vlm.splits=[test]", "vlm.max_retries=2")
    annotate_vlm(load_config(None, ov))
    m = marker(root, "llava", "test-000000")
    assert m["error_records"] == 8 and m["labeler_stats"]["failures"] == 24
    err = dict(iter_tar(column_shard_path(root, "llava", "test-000000")))["test_00000"]["err.txt"].decode()
    assert err.startswith("LabelError: every annotator abstained or failed: prompt 0: failed "
                          "(HTTP 5xx after 2 retries)")
    assert read_column_info(root, "llava")["splits"]["test"]["error_records"] == 8
    # the server recovers: --redo-errors relabels exactly the error records
    healthy = fake()
    assert cli_main(["vlm", *overrides(root, tmp, [healthy.url], "vlm.splits=[test]"), "--redo-errors"]) == 0
    assert healthy.answered == 24
    assert tars(root, "llava") == tars(root, "clean")
    assert marker(root, "llava", "test-000000")["redo_errors"] == {"retried": 8, "still_failing": 0}


def test_a_rejected_request_is_not_retried(fake):
    f = fake()
    with VlmClient([f.url], max_retries=3, backoff_base_s=0.001) as client:
        bad = {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
            {"type": "text", "text": "?"}]}], "extra_body": {"structured_outputs": {"choice": ["a"]}}}
        r = client.submit(bad).result()
        assert r.error.startswith("HTTP 400: Failed to load image") and r.retries == {}
        r = client.submit(dict(bad, model="other")).result()
        assert r.error == "HTTP 404: The model `other` does not exist."
        assert client.stats()["failed_by"]["4xx"] == 2 and f.chat_requests == 2
        with pytest.raises(ConfigError, match=rf"{f.url} serves \['tiny'\], not 'llava'"):
            probe_servers(client, "llava")


def test_a_restarted_server_gets_its_full_concurrency_back(fake):
    """A server that dies and comes back on the same port: the requests that lost their
    connection go to it again after the cooldown, and it is filled up to max_concurrency
    again (not one request at a time)."""
    first = fake(slots=4, latency_s=0.05, die_after=8)
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
               "extra_body": {"structured_outputs": {"choice": ["a", "b"]}}}
    with VlmClient([first.url], max_concurrency=4, max_retries=5, backoff_base_s=0.05,
                   backoff_max_s=0.2) as client:
        futs = [client.submit(dict(payload, messages=[{"role": "user", "content": f"q{i}"}]))
                for i in range(40)]
        t0 = time.time()
        while not first.dead:
            assert time.time() - t0 < 20
            time.sleep(0.005)
        second = fake(slots=4, latency_s=0.05, port=first.port)
        results = [f.result(timeout=60) for f in futs]
        stats = client.stats()
    assert all(r.error == "" and r.text in ("a", "b") for r in results)
    # requests in service when the first server died were dropped and answered by the second
    assert first.answered <= 8 and second.answered >= 32
    assert first.answered + second.answered >= 40
    assert stats["retries"]["connection"] >= 1 and stats["failed"] == 0
    assert second.max_in_flight == 4


def test_every_server_down_is_a_clear_error_and_the_rerun_finishes(ds, fake, capsys):
    root, tmp = ds
    clean = fake()
    # one server dies after 20 answers (in shard train-000002: 8 images x 1 prompt per shard),
    # the other never answers (a closed port)
    dying = fake(die_after=20)
    closed = FakeVllm("tiny").start()
    closed.stop()
    ov = overrides(root, tmp, [dying.url, closed.url], "vlm.prompts=['P0: what is it?']",
                   "vlm.max_retries=2", "vlm.batch_size=8", "vlm.max_concurrency=2")
    ref = overrides(root, tmp, [clean.url], "vlm.prompts=['P0: what is it?']", "vlm.column=ref")
    annotate_vlm(load_config(None, ref))
    # the dead URL is found at start (a warning), the dying one stops the run mid-shard
    t0 = time.time()
    assert cli_main(["vlm", *ov]) == 1
    assert time.time() - t0 < 30
    err = capsys.readouterr().err
    assert "every vLLM server is down" in err and dying.url in err and closed.url in err
    done = sorted(n for n in os.listdir(os.path.join(root, "columns", "llava")) if n.endswith(".stats.json"))
    assert done == ["train-000000.stats.json", "train-000001.stats.json"]
    assert not os.path.exists(column_shard_path(root, "llava", "train-000002"))
    before = tars(root, "llava")
    assert before == {n: v for n, v in tars(root, "ref").items() if n in before}
    # a new server (another URL: URLs are not part of the content hash): the rerun finishes
    again = fake()
    ov2 = overrides(root, tmp, [again.url], "vlm.prompts=['P0: what is it?']")
    assert cli_main(["vlm", *ov2]) == 0
    assert again.answered == 32 - 16                  # committed shards were not asked again
    assert tars(root, "llava") == tars(root, "ref")
    assert read_column_info(root, "llava")["complete"]


def test_two_servers_share_the_load_within_their_bounds(ds, fake):
    root, tmp = ds
    a, b = fake(slots=2, latency_s=0.02), fake(slots=2, latency_s=0.02)
    report = annotate_vlm(load_config(None, overrides(root, tmp, [a.url, b.url], "vlm.max_concurrency=3",
                                                      "vlm.batch_size=8", "vlm.logprobs=false")))
    assert a.answered + b.answered == 96
    assert abs(a.answered - b.answered) <= 16
    assert a.max_in_flight <= 3 and b.max_in_flight <= 3       # the per-URL bound holds
    assert a.max_in_flight == 3 and b.max_in_flight == 3       # and is used
    sent = [s["sent"] for s in report["vlm"]["client"]["servers"].values()]
    assert sent == [a.chat_requests, b.chat_requests]
    col = next(iter(records(root, "test").values()))[0]
    assert TOPI not in col and TOPP not in col and len(col[VOTES]) == 3   # no logprobs: no scores


def test_images_are_shrunk_to_image_size_never_enlarged():
    def sent(img, size, fmt):
        url = encode_image(img, size, fmt)
        head, data = url.split(",", 1)
        return head, Image.open(io.BytesIO(base64.b64decode(data)))

    head, im = sent(Image.new("RGB", (300, 200), (200, 10, 10)), 96, "png")
    assert head == "data:image/png;base64" and im.size == (96, 64)
    head, im = sent(Image.new("RGBA", (20, 10)), 96, "jpeg")
    assert head == "data:image/jpeg;base64" and im.size == (20, 10) and im.mode == "RGB"
    head, im = sent(Image.new("I;16", (40, 40)), 32, "png")
    assert im.size == (32, 32) and im.mode == "RGB"


# ---------------------------------------------------------------------- provenance
def test_a_prompt_change_is_refused_until_overwrite_and_urls_do_not_matter(ds, fake):
    root, tmp = ds
    f = fake()
    ov = overrides(root, tmp, [f.url])
    annotate_vlm(load_config(None, ov))
    first = tars(root, "llava")
    mtimes = {n: os.stat(os.path.join(root, "columns", "llava", n)).st_mtime_ns for n in first}
    # another server, more concurrency, another timeout: the same column, nothing relabeled
    g = fake()
    annotate_vlm(load_config(None, overrides(root, tmp, [g.url], "vlm.max_concurrency=3",
                                             "vlm.timeout_s=9", "vlm.max_retries=1")))
    assert g.answered == 0
    assert mtimes == {n: os.stat(os.path.join(root, "columns", "llava", n)).st_mtime_ns for n in first}
    changed = [o for o in ov if not o.startswith("vlm.prompts=")] + ["vlm.prompts=['P0: what is it?','Px: new']"]
    with pytest.raises(StaleColumnError, match=r"shard train-000000 .*labeler\.prompts \(was"):
        annotate_vlm(load_config(None, changed))
    assert tars(root, "llava") == first                          # nothing written
    st = cli_main(["status", "--labeler", "vlm", "--json", *changed])
    assert st == 0
    annotate_vlm(load_config(None, changed + ["annotator.overwrite=true"]))
    assert marker(root, "llava", "test-000000")["provenance"]["prompts"] == ["P0: what is it?", "Px: new"]
    assert all(len(c[VOTES]) == 2 for c, _, _ in records(root, "train").values())
    assert read_column_info(root, "llava")["complete"]


def test_status_labeler_vlm_needs_no_server(ds, fake, capsys):
    root, tmp = ds
    f = fake()
    ov = overrides(root, tmp, [f.url])
    annotate_vlm(load_config(None, ov))
    f.stop()
    capsys.readouterr()
    assert cli_main(["status", "--labeler", "vlm", "--json", *ov]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["hash_checked"] and st["complete"] and st["splits"]["train"]["done"] == 3
    assert cli_main(["status", "--labeler", "vlm", "--json", *ov, "vlm.temperature=0.7"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["splits"]["train"]["stale"] == 3


# ---------------------------------------------------------------------- the fake as a process
def _wait_health(url, proc, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            return urllib.request.urlopen(url, timeout=1).status
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


def test_fake_server_starts_like_vllm_and_ignores_vllm_arguments():
    from annotate.vllm_server import free_port

    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "annotate.fake_vllm", "--model", "/w/llava",
                             "--served-model-name", "llava", "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert _wait_health(f"http://127.0.0.1:{port}/health", proc) == 200
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))
        assert [(m["id"], m["root"]) for m in models["data"]] == [("llava", "/w/llava")]
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0 and "ignored arguments: --dtype float32 --max-model-len 256 --enforce-eager" in out


def test_launch_true_starts_and_stops_its_own_server(ds):
    pytest.importorskip("annotate.vllm_server")
    root, tmp = ds
    ov = [o for o in overrides(root, tmp, ["http://127.0.0.1:9/v1"]) if not o.startswith("vlm.model=")]
    cfg = load_config(None, ov + ["vlm.server.launch=true", "vlm.server.module=annotate.fake_vllm",
                                  f"vlm.server.python={sys.executable}", "vlm.server.model=/w/tiny",
                                  "vlm.server.port=0", "vlm.server.startup_timeout_s=60",
                                  "vlm.splits=[test]"])
    report = annotate_vlm(cfg)
    assert report["vlm"]["server_model"]["root"] == "/w/tiny"
    assert marker(root, "llava", "test-000000")["provenance"]["model"] == "/w/tiny"
    url = next(iter(report["vlm"]["client"]["servers"]))
    with pytest.raises(OSError):                     # stopped with the run
        urllib.request.urlopen(url.replace("/v1", "/health"), timeout=2)


def test_capacity_benchmark_runs_and_reports(capsys):
    """bench/vlm_client.py at a smoke-test size (its numbers are not asserted: too short)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_vlm_client",
                                                  os.path.join(ROOT, "bench", "vlm_client.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    bench.main(["--images", "48", "--shard-size", "24", "--slots", "4", "--latency-s", "0.05",
                "--batch-size", "8"])
    out = capsys.readouterr().out
    assert "capacity:  80.0 requests/s (1 x 4 / 0.05)" in out
    assert "(48 in " in out and "slots were busy" in out and "machine:" in out
    assert "warning" not in out


# ---------------------------------------------------------------------- kill -9, resume
def test_killed_array_tasks_resume_to_byte_identical_shards(tmp_path, fake):
    """20 shards of 8 images, 2 prompts, 2 array tasks as `coreg-annotate vlm` processes, both
    SIGKILLed midway, rerun: every label shard equals an uninterrupted run's, byte for byte."""
    root = str(tmp_path / "ds")
    make_dataset(root, n_train=160, n_test=0, num_classes=C, shard_size=8, size=16)
    ref_root = str(tmp_path / "ref")
    shutil.copytree(root, ref_root)
    f = fake(slots=4, latency_s=0.05)                  # 80 requests/s: 320 requests take 4 s
    ov = lambda r: overrides(r, tmp_path, [f.url], "vlm.prompts=['P0: what?','P1: which?']",
                             "vlm.splits=[train]", "vlm.batch_size=4", "vlm.max_concurrency=4")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")

    def task(i):
        return subprocess.Popen([sys.executable, "-m", "annotate.cli", "vlm", "--task-index", str(i),
                                 "--num-tasks", "2", *ov(root)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    folder = os.path.join(root, "columns", "llava")
    procs = [task(0), task(1)]
    t0 = time.time()
    while time.time() - t0 < 120:
        committed = [n for n in os.listdir(folder) if n.endswith(".stats.json")] if os.path.isdir(folder) else []
        if len(committed) >= 6:
            break
        assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    committed = [n for n in os.listdir(folder) if n.endswith(".stats.json")]
    assert 6 <= len(committed) < 20, committed        # killed midway
    procs = [task(0), task(1)]
    for p in procs:
        out = p.communicate(timeout=180)[0]
        assert p.returncode == 0, out
    annotate_vlm(load_config(None, ov(ref_root)))      # the uninterrupted run
    assert tars(root, "llava") == tars(ref_root, "llava")
    assert len(tars(root, "llava")) == 20
    assert not [n for n in os.listdir(folder) if ".tmp-" in n]
    for e in read_manifest(root).shards("train"):
        img_keys = [k for k, _ in iter_tar(image_shard_path(root, e.name))]
        assert [k for k, _ in iter_tar(column_shard_path(root, "llava", e.name))] == img_keys
    assert read_column_info(root, "llava")["complete"]
