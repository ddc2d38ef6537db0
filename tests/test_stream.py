"""The training data path (coreg_dist/data/stream.py) on tiny real WebDataset shards written by
the project's own writers: shard dealing, world-size and worker invariance of the global batch,
equal steps, exact resume, routing on per-sample state, sweeps, URL sources, damage, the
shuffle buffer's bound, and a folder of mixed image sizes and modes."""
import functools
import io
import os
import shutil
import threading
from collections import Counter
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

import coreg_dist.data.stream as stream_mod
from annotate.cli import annotate_synthetic
from coreg_dist.config import load_config
from coreg_dist.data.stream import (PassSpec, Route, ShardSource, StreamContext, StreamPlan,
                                    assign_shards, iterate_pass, iterate_sweep, join_shard,
                                    plan_streams, rank_streams, sweep_shards)
from coreg_dist.data.transform import ImageTransform
from coreg_dist.shards.format import CAND, column_shard_path, image_shard_path
from coreg_dist.shards.reader import iter_tar
from coreg_dist.shards.writer import ShardWriter
from coreg_dist.state import FieldSpec, ShardState, StateStore
from tests.helpers import class_images, make_dataset, png

K = 4
SHAPE = (1, 16, 16)
TRAIN = [f"train-{i:06d}" for i in range(6)]
FIELDS = {"w": FieldSpec((), "float32", 0.0),
          "p": FieldSpec((), "float32", 0.0, per_candidate=True)}
HI = Route("hi", 8, field="w", op=">", value=0.5)
LO = Route("lo", 8, field="w", op="<=", value=0.5)


def idx(key: str) -> int:
    return int(key.split("_")[1])


def is_member(key: str) -> bool:
    return idx(key) % 7 != 3           # every 7th key is left out of the state (not a member)


def w_of(key: str) -> float:
    return 1.0 if idx(key) % 2 == 0 else 0.0


def p_of(key: str, cls: int) -> float:
    return float(100 * idx(key) + cls + 1)


def read_cands(root, column, shard):
    return {k: np.load(io.BytesIO(f[CAND])).astype(np.int64)
            for k, f in iter_tar(column_shard_path(root, column, shard))}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """6 train shards of 16 images, a `synthetic` candidate column and state version 0 with
    a scalar field `w` (1 for even keys) and a per-candidate field `p` (100*i + class + 1)."""
    root = str(tmp_path_factory.mktemp("ds"))
    run = str(tmp_path_factory.mktemp("run"))
    make_dataset(root, n_train=96, n_test=16, num_classes=K, shard_size=16, size=16)
    annotate_synthetic(load_config(None, [f"data.root={root}", f"run.out_dir={root}/ann",
                                          "synthetic.q=0.3", "synthetic.eta=0.2"]))
    store = StateStore(run, FIELDS)
    cands, shard_index, keys_of = {}, {}, {}
    for shard in TRAIN:
        c = read_cands(root, "synthetic", shard)
        cands.update(c)
        keys_of[shard] = [k for k, _ in iter_tar(image_shard_path(root, shard))]
        keys = [k for k in keys_of[shard] if is_member(k)]
        w = np.array([w_of(k) for k in keys], np.float32)
        p = np.array([p_of(k, int(cl)) for k in keys for cl in c[k]], np.float32)
        store.write(0, ShardState(shard, keys, [len(c[k]) for k in keys], FIELDS, {"w": w, "p": p}))
        shard_index[shard] = {"n": len(keys), "hi": int((w > 0.5).sum()), "lo": int((w <= 0.5).sum())}
    store.commit(0, {"version": 0, "shards": shard_index})
    ctx = StreamContext(source=ShardSource(root), num_classes=K,
                        transform=ImageTransform(size=16, channels=1), column="synthetic",
                        state_root=run, state_version=0, state_fields=tuple(FIELDS.items()))
    return dict(root=root, run=run, ctx=ctx, index=shard_index, cands=cands, keys_of=keys_of)


def run_pass(ctx, spec, plans, n_streams, start=0, **kw):
    kw.setdefault("shuffle_buffer", 8)
    return list(iterate_pass(ctx, spec, plans, n_streams, start, image_shape=SHAPE, **kw))


def by_stream(step):
    """{stream: {part: (keys, images)}} of one StepData, split by its per-stream sizes."""
    out = {}
    for name, part in step.parts.items():
        off = 0
        for s, n in zip(step.streams, step.sizes[name]):
            out.setdefault(s, {})[name] = (part.keys[off:off + n], part.images[off:off + n])
            off += n
        assert off == len(part)
    return out


def global_batches(rank_runs):
    """Per step and part, the chunks of every stream of every rank, in stream order."""
    n_steps = {len(r) for r in rank_runs}
    assert len(n_steps) == 1, f"ranks ran different numbers of steps: {n_steps}"
    out = []
    for t in range(n_steps.pop()):
        chunks = {}
        for r in rank_runs:
            assert r[t].step == rank_runs[0][t].step
            for s, parts in by_stream(r[t]).items():
                assert s not in chunks, f"stream {s} on two ranks"
                chunks[s] = parts
        step = {}
        for name in chunks[min(chunks)]:
            keys = [k for s in sorted(chunks) for k in chunks[s][name][0]]
            imgs = np.concatenate([chunks[s][name][1] for s in sorted(chunks)])
            step[name] = (keys, imgs)
        out.append(step)
    return out


# ---------------------------------------------------------------------------- 1. assign_shards
def test_assign_shards_deterministic_balanced_and_complete():
    rng = np.random.default_rng(5)
    names = [f"s{i:03d}" for i in range(40)]
    weights = [int(x) for x in rng.integers(0, 50, len(names))]
    weights[3] = weights[17] = weights[30] = 0
    for n_streams in (1, 3, 7):
        a = assign_shards(names, weights, n_streams, seed=11)
        assert a == assign_shards(names, weights, n_streams, seed=11)
        flat = [s for stream in a for s in stream]
        weighted = [n for n, w in zip(names, weights) if w > 0]
        assert sorted(flat) == sorted(weighted)                # each weighted shard exactly once
        assert Counter(flat).most_common(1)[0][1] == 1
        for z in ("s003", "s017", "s030"):
            assert z not in flat                               # zero-weight shards left out
        w = dict(zip(names, weights))
        loads = [sum(w[s] for s in stream) for stream in a]
        assert max(loads) - min(loads) <= max(weights), loads
    # the seed matters (shard order within streams / dealing)
    assert assign_shards(names, weights, 3, seed=11) != assign_shards(names, weights, 3, seed=12)


def test_assign_shards_fallback_for_empty_streams():
    names = ["a", "b", "c", "d"]
    a = assign_shards(names, [5, 0, 7, 0], 4, seed=3)
    assert sorted(len(s) for s in a) == [1, 1, 2, 2]
    owners = [s for s in a if len(s) == 1]
    assert sorted(x for s in owners for x in s) == ["a", "c"]  # dealt once each
    for s in a:
        if len(s) == 2:                                         # an empty stream reads them all
            assert sorted(s) == ["a", "c"]
    assert assign_shards(names, [0, 0, 0, 0], 3, seed=3) == [[], [], []]


def test_sweep_shards_partition_with_more_shards_than_ranks():
    counts = {f"t-{i:03d}": 10 + i for i in range(9)}
    parts = [sweep_shards(counts, r, 3, seed=1) for r in range(3)]
    assert all(p == sorted(p) for p in parts)
    assert sorted(s for p in parts for s in p) == sorted(counts)
    assert parts == [sweep_shards(counts, r, 3, seed=1) for r in range(3)]


def test_sweep_shards_never_sweeps_a_shard_twice():
    counts = {"test-000000": 24}
    parts = [sweep_shards(counts, r, 2, seed=0) for r in range(2)]
    assert sorted(s for p in parts for s in p) == ["test-000000"], parts


# ---------------------------------------------------------------------------- 2. invariance
def test_global_batch_independent_of_world_size_and_workers(ds):
    spec = PassSpec("p", 0, 6, (HI, LO))
    plans = plan_streams(spec, ds["index"], 4, (0, 1, 2))
    assert [p.stream for p in plans] == [0, 1, 2, 3]
    one = run_pass(ds["ctx"], spec, rank_streams(plans, 0, 1), 4)
    r0, r1 = rank_streams(plans, 0, 2), rank_streams(plans, 1, 2)
    assert [p.stream for p in r0] == [0, 2] and [p.stream for p in r1] == [1, 3]
    two = [run_pass(ds["ctx"], spec, r0, 4), run_pass(ds["ctx"], spec, r1, 4)]
    g1, g2 = global_batches([one]), global_batches(two)
    assert len(g1) == len(g2) == 6
    for t, (a, b) in enumerate(zip(g1, g2)):
        for name in ("hi", "lo"):
            assert a[name][0] == b[name][0], f"step {t} part {name}: keys differ"
            assert len(a[name][0]) == 8
            assert a[name][1].shape == (8,) + SHAPE
            assert np.array_equal(a[name][1], b[name][1]), f"step {t} part {name}: images differ"
    # the batches are not trivially equal: steps differ from each other
    assert g1[0]["hi"][0] != g1[1]["hi"][0]

    # DataLoader workers: the same StepData sequence as in-process
    mine = rank_streams(plans, 0, 1)
    w0 = run_pass(ds["ctx"], spec, mine, 4, num_workers=0)
    w2 = run_pass(ds["ctx"], spec, mine, 4, num_workers=2, prefetch=2)
    assert [d.step for d in w0] == [d.step for d in w2] == list(range(6))
    for a, b in zip(w0, w2):
        assert a.streams == b.streams == [0, 1, 2, 3]
        assert a.sizes == b.sizes
        assert a.taken == b.taken
        for name in ("hi", "lo"):
            assert a.parts[name].keys == b.parts[name].keys
            assert np.array_equal(a.parts[name].images, b.parts[name].images)
            assert np.array_equal(a.parts[name].Y, b.parts[name].Y)


def test_rank_owning_no_stream_is_refused(ds):
    spec = PassSpec("p", 0, 2, (HI,))
    with pytest.raises(ValueError, match="owns no stream"):
        run_pass(ds["ctx"], spec, [], 4)


# ---------------------------------------------------------------------------- 3. equal steps
def test_short_stream_cycles_to_equal_steps(ds):
    small, big = TRAIN[:1], TRAIN[1:]
    routed_small = {k for k in ds["keys_of"][small[0]] if is_member(k) and w_of(k) > 0.5}
    plans = [StreamPlan(0, (tuple(small),), (101,), (ds["index"][small[0]]["hi"],)),
             StreamPlan(1, (tuple(big),), (202,), (sum(ds["index"][s]["hi"] for s in big),))]
    k = 15
    spec = PassSpec("p", 0, k, (Route("hi", 6, field="w"),))
    # stream 0 has far fewer routed samples than the pass takes from it
    assert len(routed_small) * 3 < k * 6 // 2
    steps = run_pass(ds["ctx"], spec, plans, 2, shuffle_buffer=4)
    assert [d.step for d in steps] == list(range(k))
    prev = {0: 0, 1: 0}
    seen0 = Counter()
    for d in steps:
        assert d.sizes == {"hi": [3, 3]}
        chunks = by_stream(d)
        seen0.update(chunks[0]["hi"][0])
        for s in (0, 1):
            assert d.taken[s]["hi"] > prev[s]
            prev[s] = d.taken[s]["hi"]
    assert prev == {0: 3 * k, 1: 3 * k}
    assert set(seen0) <= routed_small
    assert max(seen0.values()) >= 3              # cycled: samples of stream 0 came back


def test_cycles_reorder_shards_by_seed(ds):
    """Without a shuffle buffer the sample order shows the shard order: cycle 0 is the plan's,
    later cycles are seeded permutations of it, the same on a rerun."""
    shards = tuple(TRAIN[:4])
    n_hi = sum(ds["index"][s]["hi"] for s in shards)
    plan = StreamPlan(0, (shards,), (77,), (n_hi,))
    spec = PassSpec("p", 0, n_hi * 6 // 4, (Route("hi", 4, field="w"),))

    def shard_orders():
        keys = [k for d in run_pass(ds["ctx"], spec, [plan], 1, shuffle_buffer=1)
                for k in d.parts["hi"].keys]
        owner = {k: s for s in shards for k in ds["keys_of"][s]}
        orders = []
        for c in range(0, len(keys) - len(keys) % n_hi, n_hi):    # a cycle = n_hi samples
            cycle = keys[c:c + n_hi]
            assert sorted(cycle) == sorted(keys[:n_hi])            # each routed sample once
            orders.append(tuple(dict.fromkeys(owner[k] for k in cycle)))
        return orders

    orders = shard_orders()
    assert len(orders) >= 5
    assert orders[0] == shards
    assert all(sorted(o) == sorted(shards) for o in orders)
    assert len(set(orders[1:])) > 1
    assert shard_orders() == orders


# ---------------------------------------------------------------------------- 4. resume
def test_resume_from_taken_counts_replays_exactly(ds):
    spec = PassSpec("p", 0, 14, (HI, LO))
    plans = plan_streams(spec, ds["index"], 2, (7, 3, 1))
    full = run_pass(ds["ctx"], spec, plans, 2, shuffle_buffer=16)
    assert len(full) == 14
    assert any(d.taken[0]["hi"] > plans[0].counts[0] for d in full)   # the run cycles too
    for t in (1, 6, 13):
        taken = full[t - 1].taken
        resumed_plans = [replace(p, skip=tuple(taken[p.stream][r.name] for r in spec.routes))
                         for p in plans]
        resumed = run_pass(ds["ctx"], spec, resumed_plans, 2, start=t, shuffle_buffer=16)
        assert [d.step for d in resumed] == list(range(t, 14))
        for a, b in zip(full[t:], resumed):
            assert a.taken == b.taken
            for name in ("hi", "lo"):
                assert a.parts[name].keys == b.parts[name].keys, f"resume at {t}, step {a.step}"
                assert np.array_equal(a.parts[name].images, b.parts[name].images)
    # without the skip the resumed steps would not match (the check above can fail)
    wrong = run_pass(ds["ctx"], spec, plans, 2, start=6, shuffle_buffer=16)
    assert [d.parts["hi"].keys for d in wrong] != [d.parts["hi"].keys for d in full[6:]]


# ---------------------------------------------------------------------------- 5. routing
def test_routes_attach_and_membership(ds):
    spec = PassSpec("p", 0, 10, (HI, LO), attach=("p", "w"))
    plans = plan_streams(spec, ds["index"], 2, (1, 1, 1))
    steps = run_pass(ds["ctx"], spec, plans, 2, shuffle_buffer=4)
    seen = set()
    for d in steps:
        hi, lo = d.parts["hi"], d.parts["lo"]
        assert len(hi) == len(lo) == 8
        assert all(w_of(k) == 1.0 for k in hi.keys), hi.keys
        assert all(w_of(k) == 0.0 for k in lo.keys), lo.keys
        for part in (hi, lo):
            assert all(is_member(k) for k in part.keys), part.keys
            assert part.attach["p"].shape == (len(part), K)
            assert part.attach["p"].dtype == np.float32
            np.testing.assert_array_equal(part.attach["w"], [w_of(k) for k in part.keys])
            for i, key in enumerate(part.keys):
                cand = ds["cands"][key]
                want = np.zeros(K, np.float32)
                want[cand] = [p_of(key, int(c)) for c in cand]
                np.testing.assert_array_equal(part.attach["p"][i], want, err_msg=key)
                assert part.Y[i].tolist() == [c in set(cand.tolist()) for c in range(K)]
            seen.update(part.keys)
    all_keys = [k for s in TRAIN for k in ds["keys_of"][s]]
    assert seen <= {k for k in all_keys if is_member(k)}
    assert any(not is_member(k) for k in all_keys)         # there were non-members to leave out


def test_attach_with_buffer_spanning_many_shards(ds):
    spec = PassSpec("p", 0, 4, (Route("all", 8),), attach=("p",))
    plans = plan_streams(spec, ds["index"], 1, (0, 0, 0))
    assert len(plans[0].shards[0]) == 6             # one stream, buffer = all its 80 samples
    steps = run_pass(ds["ctx"], spec, plans, 1, shuffle_buffer=1000)
    assert len(steps) == 4
    for d in steps:
        for i, key in enumerate(d.parts["all"].keys):
            cand = ds["cands"][key]
            assert d.parts["all"].attach["p"][i][cand].tolist() == [p_of(key, int(c)) for c in cand]


# ---------------------------------------------------------------------------- 6. sweeps
def sweep_all(ctx, shards, batch_size=5, **kw):
    return list(iterate_sweep(ctx, shards, batch_size, image_shape=SHAPE, **kw))


def test_sweep_every_member_once_in_per_shard_batches(ds):
    shards = TRAIN[1:4]
    for workers in (0, 2):
        batches = sweep_all(ds["ctx"], shards, attach=("w",), num_workers=workers)
        keys = [k for b in batches for k in b.part.keys]
        members = [k for s in shards for k in ds["keys_of"][s] if is_member(k)]
        assert sorted(keys) == sorted(members) and len(keys) == len(set(keys))
        lasts = Counter(b.shard for b in batches if b.last)
        assert lasts == Counter(shards)
        for b in batches:
            assert len(b.part) <= 5
            assert set(b.part.shards) <= {b.shard}
            assert all(k in ds["keys_of"][b.shard] for k in b.part.keys)
            np.testing.assert_array_equal(b.part.attach["w"], [w_of(k) for k in b.part.keys])
        for s in shards:                     # `last` ends each shard's batches
            mine = [i for i, b in enumerate(batches) if b.shard == s]
            if workers == 0:                 # in process: shard after shard (workers interleave)
                assert mine == list(range(mine[0], mine[-1] + 1))
            assert batches[mine[-1]].last and not any(batches[i].last for i in mine[:-1])
    # without state (version -1) every image of the shard is swept
    no_state = replace(ds["ctx"], state_version=-1)
    keys = [k for b in sweep_all(no_state, shards) for k in b.part.keys]
    assert sorted(keys) == sorted(k for s in shards for k in ds["keys_of"][s])


def test_sweep_last_batch_may_be_empty_and_need_label(tmp_path):
    root = str(tmp_path)
    imgs, labels = class_images(10, K, 16, seed=3)
    with ShardWriter(image_shard_path(root, "train-000000")) as w:
        for i in range(10):
            fields = {"png": png(imgs[i])}
            if i % 3 != 0:
                fields["cls"] = int(labels[i])
            w.write(f"u_{i:03d}", fields)
    w.commit({})
    ctx = StreamContext(source=ShardSource(root), num_classes=K,
                        transform=ImageTransform(size=16, channels=1))
    every = sweep_all(ctx, ["train-000000"], batch_size=5)
    assert [len(b.part) for b in every] == [5, 5, 0] and [b.last for b in every] == [False, False, True]
    assert [b.part.true.tolist() for b in every[:2]] == [
        [-1 if i % 3 == 0 else int(labels[i]) for i in range(j, j + 5)] for j in (0, 5)]
    labeled = sweep_all(ctx, ["train-000000"], batch_size=5, need_label=True)
    keys = [k for b in labeled for k in b.part.keys]
    assert keys == [f"u_{i:03d}" for i in range(10) if i % 3 != 0]
    assert all((b.part.true >= 0).all() for b in labeled)
    assert sum(b.last for b in labeled) == 1 and labeled[-1].last


# ---------------------------------------------------------------------------- 7. URL sources
def sweep_signature(ctx, shards):
    out = []
    for b in sweep_all(ctx, shards, attach=("p",)):
        out.append((b.shard, b.last, b.part.keys, b.part.images.tobytes(), b.part.Y.tobytes(),
                    b.part.attach["p"].tobytes(), [e[0] for e in b.errors]))
    return out


def test_pipe_and_http_sources_match_local_files(ds, monkeypatch):
    shards = TRAIN[:2]
    local = sweep_signature(ds["ctx"], shards)
    assert sum(len(b[2]) for b in local) == sum(ds["index"][s]["n"] for s in shards)
    piped = replace(ds["ctx"], source=ShardSource(ds["root"], url_template="pipe:cat " + ds["root"] + "/{path}"))
    assert sweep_signature(piped, shards) == local
    spec = PassSpec("p", 0, 3, (HI,))
    plans = plan_streams(spec, ds["index"], 2, (4, 4, 4))
    a, b = run_pass(ds["ctx"], spec, plans, 2), run_pass(piped, spec, plans, 2)
    assert [d.parts["hi"].keys for d in a] == [d.parts["hi"].keys for d in b]

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: webdataset's gopen opens http:// URLs with curl")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=ds["root"]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        http = replace(ds["ctx"], source=ShardSource(ds["root"], url_template=f"http://127.0.0.1:{port}/{{path}}"))
        assert sweep_signature(http, shards) == local
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---------------------------------------------------------------------------- 8. damage
@pytest.fixture()
def damaged(tmp_path):
    """train-000000: key d0_03 has garbage png bytes; its column lacks d0_05, has extra d0_99.
    train-000001: image shard cut in half. train-000002: no column shard at all."""
    root = str(tmp_path / "dmg")
    imgs, labels = class_images(24, K, 16, seed=9)
    keys = {}
    for s in range(3):
        shard = f"train-{s:06d}"
        keys[shard] = [f"d{s}_{i:02d}" for i in range(8)]
        with ShardWriter(image_shard_path(root, shard)) as w:
            for i, key in enumerate(keys[shard]):
                data = png(imgs[8 * s + i])
                if key == "d0_03":
                    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
                w.write(key, {"png": data, "cls": int(labels[8 * s + i])})
        w.commit({})
        if s == 2:
            continue
        col = [k for k in keys[shard] if k != "d0_05"] + (["d0_99"] if s == 0 else [])
        with ShardWriter(column_shard_path(root, "synthetic", shard)) as w:
            for key in col:
                w.write(key, {CAND: np.array([idx(key) % K], dtype=np.int16)})
        w.commit({})
    full = open(image_shard_path(root, "train-000001"), "rb").read()
    with open(image_shard_path(root, "train-000001"), "wb") as f:
        f.write(full[: len(full) // 2])
    ctx = StreamContext(source=ShardSource(root), num_classes=K,
                        transform=ImageTransform(size=16, channels=1), column="synthetic")
    return root, ctx, keys


def kinds(events):
    return {(e[0], e[1], e[2]) for e in events}


def test_join_reports_damage_and_keeps_good_samples(damaged):
    root, ctx, keys = damaged
    errors = []
    got = [s["key"] for s in join_shard(ctx, "train-000000", errors)]
    assert got == [k for k in keys["train-000000"] if k != "d0_05"]     # corrupt bytes pass the join
    assert kinds(errors) == {("missing_label", "train-000000", "d0_05"),
                             ("orphan_label", "train-000000", "d0_99")}
    errors = []
    got = [s["key"] for s in join_shard(ctx, "train-000001", errors)]
    assert 0 < len(got) < 8 and got == keys["train-000001"][:len(got)]
    assert [(e[0], e[1], e[2]) for e in errors] == [("truncated_shard", "train-000001", got[-1])]
    errors = []
    assert list(join_shard(ctx, "train-000002", errors)) == []          # does not raise
    assert [(e[0], e[1]) for e in errors] == [("unreadable_shard", "train-000002")]
    assert errors[0][3].endswith(os.path.join("synthetic", "train-000002.tar"))


def test_stream_and_sweep_report_damage_and_keep_going(damaged):
    root, ctx, keys = damaged
    shards = ["train-000000", "train-000001", "train-000002"]
    batches = list(iterate_sweep(ctx, shards, 4, image_shape=SHAPE))
    swept = [k for b in batches for k in b.part.keys]
    good0 = [k for k in keys["train-000000"] if k not in ("d0_03", "d0_05")]
    assert swept[:len(good0)] == good0
    n1 = len(swept) - len(good0)
    assert 0 < n1 < 8 and swept[len(good0):] == keys["train-000001"][:n1]
    events = kinds(e for b in batches for e in b.errors)
    assert events == {("corrupt_image", "train-000000", "d0_03"),
                      ("missing_label", "train-000000", "d0_05"),
                      ("orphan_label", "train-000000", "d0_99"),
                      ("truncated_shard", "train-000001", keys["train-000001"][n1 - 1]),
                      ("unreadable_shard", "train-000002", "")}
    assert Counter(b.shard for b in batches if b.last) == Counter(shards)

    # the training stream: cycles over the damage, reports it, yields only good samples
    plan = StreamPlan(0, (tuple(shards),), (5,), (24,))
    spec = PassSpec("p", 0, 12, (Route("all", 4),))
    steps = run_pass(ctx, spec, [plan], 1, shuffle_buffer=6)
    assert len(steps) == 12
    taken = [k for d in steps for k in d.parts["all"].keys]
    assert len(taken) == 48
    assert set(taken) <= set(good0) | set(keys["train-000001"][:n1])
    assert set(taken) == set(good0) | set(keys["train-000001"][:n1])   # ~3 cycles reach them all
    ev = kinds(e for d in steps for e in d.errors)
    assert {e[0] for e in ev} == {"corrupt_image", "missing_label", "orphan_label",
                                  "truncated_shard", "unreadable_shard"}
    assert ("corrupt_image", "train-000000", "d0_03") in ev


# ---------------------------------------------------------------------------- 9. bounded buffer
def test_shuffle_buffer_holds_at_most_its_size(ds, monkeypatch):
    real = stream_mod.wds_shuffle
    live = {"now": 0, "max": 0, "bufsizes": []}

    def counted(src):
        for s in src:
            live["now"] += 1
            live["max"] = max(live["max"], live["now"])
            yield s

    def wrapper(data, bufsize=1000, initial=100, rng=None, **kw):
        live["bufsizes"].append(bufsize)
        for s in real(counted(data), bufsize=bufsize, initial=initial, rng=rng, **kw):
            live["now"] -= 1
            yield s

    monkeypatch.setattr(stream_mod, "wds_shuffle", wrapper)
    spec = PassSpec("p", 0, 20, (Route("all", 4),))
    plans = plan_streams(spec, ds["index"], 1, (2, 2, 2))
    assert plans[0].counts[0] > 10
    steps = run_pass(ds["ctx"], spec, plans, 1, shuffle_buffer=10)
    assert len(steps) == 20
    assert live["bufsizes"] == [10]
    assert live["max"] == 10       # filled to its size, never beyond (one reader: one buffer)
    # samples pulled from the source minus samples handed out = what the buffer holds now
    assert 0 <= live["now"] <= 10


# ---------------------------------------------------------------------------- 10. mixed folder
def test_folder_of_mixed_sizes_and_modes_loses_no_image(tmp_path):
    src = tmp_path / "pets"
    rng = np.random.default_rng(4)
    files = {}

    def save(cls, name, img, fmt, **kw):
        (src / cls).mkdir(parents=True, exist_ok=True)
        img.save(src / cls / name, format=fmt, **kw)
        files[f"{cls}/{name}"] = img

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB")

    save("cat", "one.png", Image.fromarray(np.array([[200]], np.uint8), "L"), "PNG")
    save("cat", "big.jpg", rgb(3000, 2000), "JPEG", quality=70)
    save("cat", "rgba.png", Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), "RGBA"), "PNG")
    save("cat", "wide.png", rgb(500, 20), "PNG")
    save("dog", "pal.png", rgb(40, 30).convert("P"), "PNG")
    save("dog", "deep.png", Image.fromarray(rng.integers(0, 4096, (24, 24), dtype=np.uint16)), "PNG")
    save("dog", "cmyk.jpg", rgb(32, 32).convert("CMYK"), "JPEG")
    save("dog", "grey.png", Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), "L"), "PNG")
    save("dog", "rgb.png", rgb(32, 32), "PNG")
    (src / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    modes = {Image.open(src / p).mode for p in files}
    assert {"L", "RGB", "RGBA", "P", "I;16", "CMYK"} <= modes, modes

    root = str(tmp_path / "ds")
    from coreg_dist.data.ingest import ingest
    m = ingest(load_config(None, [f"data.root={root}", "data.source=folder",
                                  f"data.source_path={src}", "data.annotator_split=0",
                                  "data.test_size=2", "data.shard_size=4", "run.seed=0",
                                  "data.keep_broken=true"]))
    assert m.count("train") + m.count("test") == len(files) + 1      # ingest kept the corrupt file
    ctx = StreamContext(source=ShardSource(root), num_classes=m.num_classes,
                        transform=ImageTransform(size=32, channels=3), column="", state_version=-1)
    out, events = {}, []
    for split in ("train", "test"):
        for b in iterate_sweep(ctx, [e.name for e in m.shards(split)], batch_size=4,
                               image_shape=(3, 32, 32)):
            events += b.errors
            assert b.part.images.shape[1:] == (3, 32, 32)
            for i, key in enumerate(b.part.keys):
                out[key] = (split, b.part.images[i])
    # source path of each key, from the image shards' json
    path_of = {}
    for split in ("train", "test"):
        for e in m.shards(split):
            for key, f in iter_tar(image_shard_path(root, e.name)):
                path_of[key] = __import__("json").loads(f["json"])["path"]
    train_keys = {k for e in m.shards("train") for k, _ in iter_tar(image_shard_path(root, e.name))}
    assert {path_of[k] for k in out} == set(files)                     # every valid image came out
    assert {k for k, (sp, _) in out.items() if sp == "train"} == train_keys - {
        k for k, p in path_of.items() if p == "dog/broken.png"}
    assert [(e[0], path_of[e[2]]) for e in events] == [("corrupt_image", "dog/broken.png")]
    assert events[0][3] == "dog/broken.png"                            # reported with its source path
    for key, (_, img) in out.items():
        assert img.dtype == np.uint8 and img.shape == (3, 32, 32)
    one = next(img for k, (_, img) in out.items() if path_of[k] == "cat/one.png")
    assert (one == 200).all()                                           # 1x1 grey upscaled, replicated
    deep = next(img for k, (_, img) in out.items() if path_of[k] == "dog/deep.png")
    assert deep.max() > 128                                             # 16-bit scaled, not clipped/black
