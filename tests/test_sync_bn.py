"""SyncBatchNorm (coreg_dist/models/sync_bn.py): one process vs nn.BatchNorm, and two gloo ranks
that split a global batch vs one nn.BatchNorm on the whole batch."""
from __future__ import annotations

import copy
import datetime
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from coreg_dist.models.sync_bn import SyncBatchNorm, _sync_batch_norm, convert_sync_batchnorm

TOL = dict(rtol=1e-4, atol=1e-5)   # float32 sums in another order (thread count varies across the suite)


def _identity_reduce(t, group):
    return t


def _set_affine(bn: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(1 + 0.5 * torch.randn(bn.weight.shape, generator=g))
        if bn.bias is not None:
            bn.bias.copy_(0.5 * torch.randn(bn.bias.shape, generator=g))


def _batch(shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An input with per-channel offsets/scales (so mean and variance matter) and a fixed
    upstream gradient G (the loss is sum(out * G) / N)."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    cshape = [1, c] + [1] * (len(shape) - 2)
    offset = 3 * torch.randn(cshape, generator=g)
    scale = torch.rand(cshape, generator=g) * 2 + 0.1
    x = torch.randn(shape, generator=g) * scale + offset
    return x, torch.randn(shape, generator=g)


def _run_steps(bn: nn.Module, shape, steps: int, seed: int, rows=None, n_global=None):
    """Forward/backward ``steps`` batches; per step record out, x.grad, weight/bias grads."""
    rec = []
    for s in range(steps):
        x, gout = _batch(shape, seed + s)
        n = n_global or x.shape[0]
        if rows is not None:
            x, gout = x[rows[0]:rows[1]], gout[rows[0]:rows[1]]
        x = x.clone().requires_grad_(True)
        bn.zero_grad(set_to_none=False)
        out = bn(x)
        (out * gout).sum().div(n).backward()  # sum over ranks == full-batch mean loss
        rec.append({"out": out.detach(), "xgrad": x.grad,
                    "wgrad": None if bn.weight is None else bn.weight.grad.clone(),
                    "bgrad": None if bn.bias is None else bn.bias.grad.clone()})
    return rec


def _stats(bn: nn.Module) -> dict:
    return {k: v.clone() for k, v in bn.state_dict().items()}


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape,ref_cls", [((6, 3, 5, 4), nn.BatchNorm2d),
                                           ((7, 4), nn.BatchNorm1d),
                                           ((5, 4, 6), nn.BatchNorm1d)])
def test_not_distributed_equals_batchnorm(shape, ref_cls, momentum):
    ref, sbn = ref_cls(shape[1], momentum=momentum), SyncBatchNorm(shape[1], momentum=momentum)
    _set_affine(ref, 1)
    _set_affine(sbn, 1)
    for a, b in zip(_run_steps(ref, shape, 3, 10), _run_steps(sbn, shape, 3, 10)):
        for k in a:
            torch.testing.assert_close(b[k], a[k], **TOL)
    for k, v in _stats(ref).items():
        torch.testing.assert_close(_stats(sbn)[k], v, **TOL)
    ref.eval(), sbn.eval()
    x, _ = _batch(shape, 99)
    torch.testing.assert_close(sbn(x), ref(x), **TOL)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine,bias", [(True, True), (False, True)])
@pytest.mark.parametrize("shape", [(6, 3, 5, 4), (7, 4), (5, 4, 6)])
def test_sync_arithmetic_equals_batchnorm(shape, affine, bias, momentum):
    """The distributed code path with an identity all-reduce (one 'rank') must be batch norm."""
    c = shape[1]
    ref = nn.BatchNorm2d(c, momentum=momentum, affine=affine)  # F.batch_norm is dim-agnostic
    _set_affine(ref, 2)
    rm, rv = torch.rand(c), torch.rand(c) + 0.5
    ref.running_mean.copy_(rm), ref.running_var.copy_(rv)
    own_rm, own_rv = rm.clone(), rv.clone()
    weight = None if ref.weight is None else ref.weight.detach().clone().requires_grad_(True)
    bias_ = None if ref.bias is None else ref.bias.detach().clone().requires_grad_(True)
    for step in range(3):
        x, gout = _batch(shape, 20 + step)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ref.zero_grad(set_to_none=False)
        ref.num_batches_tracked.add_(1)
        factor = momentum if momentum is not None else 1.0 / (step + 1)
        ya = F.batch_norm(xa, ref.running_mean, ref.running_var, ref.weight, ref.bias, True, factor, ref.eps)
        for p in (weight, bias_):
            if p is not None:
                p.grad = None
        yb = _sync_batch_norm(xb, weight, bias_, own_rm, own_rv, factor, ref.eps, None,
                              all_reduce=_identity_reduce)
        (ya * gout).sum().backward()
        (yb * gout).sum().backward()
        torch.testing.assert_close(yb, ya, **TOL)
        torch.testing.assert_close(xb.grad, xa.grad, **TOL)
        if affine:
            torch.testing.assert_close(weight.grad, ref.weight.grad, **TOL)
            torch.testing.assert_close(bias_.grad, ref.bias.grad, **TOL)
        torch.testing.assert_close(own_rm, ref.running_mean, **TOL)
        torch.testing.assert_close(own_rv, ref.running_var, **TOL)


def test_sync_arithmetic_two_pass_is_accurate_with_large_mean():
    """|mean| >> std in float32: the two-pass variance stays close to a float64 reference."""
    g = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(64, 3, 8, 8, generator=g)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = _sync_batch_norm(x, None, None, rm, rv, 1.0, 1e-5, None, all_reduce=_identity_reduce)
    ref = F.batch_norm(x.double(), None, None, training=True, eps=1e-5)
    # float32 spacing at 1e4 is ~1e-3: that much error (from rounding the mean) is unavoidable,
    # native float32 BatchNorm shows 5e-4 here; a plain float32 sum of x gave 1.7e-3.
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=8e-4)
    torch.testing.assert_close(rv.double(), x.double().var(dim=(0, 2, 3)), rtol=1e-4, atol=0)


def test_single_value_per_channel_raises_like_batchnorm():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.BatchNorm1d(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        SyncBatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        _sync_batch_norm(torch.randn(1, 3), None, None, None, None, 0.1, 1e-5, None,
                         all_reduce=_identity_reduce)
    SyncBatchNorm(3).eval()(torch.randn(1, 3))  # eval mode: fine, as for nn.BatchNorm
    with pytest.raises(ValueError, match="2D"):
        SyncBatchNorm(3)(torch.randn(3))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2, padding=1),
                                      nn.BatchNorm2d(5, momentum=None), nn.ReLU())
        self.fc = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6, affine=False)

    def forward(self, x):
        return self.bn(self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)))


def _bns(net: nn.Module):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_convert_sync_batchnorm_copies_state_and_outputs():
    torch.manual_seed(0)
    net = _Net()
    for i, bn in enumerate(_bns(net)):
        _set_affine(bn, i)
    net(torch.randn(8, 2, 6, 6))  # move running stats / num_batches_tracked away from init
    net.features[1].weight.requires_grad_(False)
    net.features[4].eval()
    ref = copy.deepcopy(net)
    params = {n: p for n, p in net.named_parameters()}

    conv = convert_sync_batchnorm(net)
    assert conv is net
    assert [type(m) for m in _bns(conv)] == [SyncBatchNorm] * 3
    for a, b in zip(_bns(ref), _bns(conv)):
        assert (a.eps, a.momentum, a.affine, a.track_running_stats, a.training) == \
               (b.eps, b.momentum, b.affine, b.track_running_stats, b.training)
    # Parameters are shared (optimizers keep working), requires_grad kept, buffers equal.
    for n, p in conv.named_parameters():
        assert p is params[n]
    assert not conv.features[1].weight.requires_grad
    for (ka, va), (kb, vb) in zip(ref.state_dict().items(), conv.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(vb, va, rtol=0, atol=0)

    x = torch.randn(8, 2, 6, 6)
    torch.testing.assert_close(conv(x), ref(x), **TOL)
    for (ka, va), (kb, vb) in zip(ref.state_dict().items(), conv.state_dict().items()):
        torch.testing.assert_close(vb, va, **TOL)
    ref.eval(), conv.eval()
    torch.testing.assert_close(conv(x), ref(x), **TOL)


def test_convert_top_level_and_idempotent():
    bn = nn.BatchNorm1d(5, eps=1e-3, momentum=0.3, track_running_stats=False)
    new = convert_sync_batchnorm(bn, prefer_torch_on_cuda=True)  # CPU: ours, not torch's
    assert type(new) is SyncBatchNorm and new.eps == 1e-3 and new.momentum == 0.3
    assert new.running_mean is None and not new.track_running_stats
    assert new.weight is bn.weight
    assert convert_sync_batchnorm(new) is new
    torch_sbn = nn.SyncBatchNorm(5)
    assert convert_sync_batchnorm(nn.Sequential(torch_sbn))[0] is torch_sbn
    if "bias" in nn.BatchNorm1d.__init__.__code__.co_varnames:  # torch versions with bias=False
        nb = convert_sync_batchnorm(nn.BatchNorm1d(5, bias=False))
        assert nb.bias is None and nb.weight is not None
        nb(torch.randn(4, 5))


# ----------------------------------------------------------------------------- two processes
#
# Each case: a global batch (shape), the rows each rank takes, and the reference is one
# nn.BatchNorm on the whole batch.  All cases run in one pair of spawned processes (startup
# is the expensive part); each case is then asserted by its own test.

WORLD = 2
CASES = {
    # name: (module factory, global shape, [(start, stop) for rank 0, rank 1], steps)
    "bn2d_halves": (lambda: nn.BatchNorm2d(3), (8, 3, 5, 4), [(0, 4), (4, 8)], 3),
    "bn1d_uneven_cma": (lambda: nn.BatchNorm1d(4, momentum=None), (7, 4), [(0, 5), (5, 7)], 3),
    "bn1d_3d_input": (lambda: nn.BatchNorm1d(4, affine=False), (6, 4, 5), [(0, 2), (2, 6)], 2),
    "empty_rank": (lambda: nn.BatchNorm2d(3), (5, 3, 4, 4), [(0, 5), (5, 5)], 2),
}
NET_ROWS = [(0, 4), (4, 8)]


def _net_batch():
    x, _ = _batch((8, 2, 6, 6), 123)
    return x, torch.randn(8, 6, generator=torch.Generator().manual_seed(124))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, outdir: str) -> None:
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=60))
        res = {}
        for name, (factory, shape, rows, steps) in CASES.items():
            bn = convert_sync_batchnorm(factory())
            assert isinstance(bn, SyncBatchNorm)
            _set_affine(bn, 7)
            res[name] = {"steps": _run_steps(bn, shape, steps, 50, rows=rows[rank], n_global=shape[0]),
                         "stats": _stats(bn)}

        torch.manual_seed(0)
        net = convert_sync_batchnorm(_Net())
        x, gout = _net_batch()
        a, b = NET_ROWS[rank]
        xr = x[a:b].clone().requires_grad_(True)
        out = net(xr)
        (out * gout[a:b]).sum().div(x.shape[0]).backward()
        res["net"] = {"out": out.detach(), "xgrad": xr.grad, "stats": _stats(net),
                      "grads": {n: p.grad for n, p in net.named_parameters()}}

        # Global batch of one value per channel: every rank must raise, nobody hangs.
        try:
            SyncBatchNorm(3)(torch.randn(1 - rank, 3))
            res["single_value"] = None
        except ValueError as e:
            res["single_value"] = str(e)
        dist.barrier()
        dist.destroy_process_group()
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def two_ranks():
    """Run _worker on 2 spawned gloo ranks; return [rank0 results, rank1 results]."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, port, outdir), daemon=True) for r in range(WORLD)]
        for p in procs:
            p.start()
        # Poll rather than join one by one: when a rank dies, the other would otherwise sit in
        # a collective until gloo's 60 s timeout.
        deadline = 120.0
        end = time.monotonic() + deadline
        while any(p.is_alive() for p in procs) and time.monotonic() < end:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        still_running = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)

        def err(r):
            path = os.path.join(outdir, f"rank{r}.err")
            return open(path).read() if os.path.exists(path) else "(no traceback written)"

        failed = [r for r, p in enumerate(procs) if r not in still_running and p.exitcode != 0]
        if failed or still_running:
            report = "\n".join(f"--- rank {r}: exit code {procs[r].exitcode}\n{err(r)}" for r in failed)
            if failed:
                pytest.fail(f"worker rank(s) {failed} died (rank(s) {still_running} killed):\n{report}")
            pytest.fail(f"worker rank(s) {still_running} still running after {deadline:.0f}s "
                        "(deadlocked collective?)")
        yield [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_big_batch(two_ranks, name):
    factory, shape, rows, steps = CASES[name]
    ref = factory()
    _set_affine(ref, 7)
    expected = _run_steps(ref, shape, steps, 50)
    for step, exp in enumerate(expected):
        for r, (a, b) in enumerate(rows):
            got = two_ranks[r][name]["steps"][step]
            torch.testing.assert_close(got["out"], exp["out"][a:b], **TOL,
                                       msg=lambda m: f"{name} step {step} rank {r} out: {m}")
            torch.testing.assert_close(got["xgrad"], exp["xgrad"][a:b], **TOL,
                                       msg=lambda m: f"{name} step {step} rank {r} x.grad: {m}")
        for k in ("wgrad", "bgrad"):
            if exp[k] is None:
                continue
            total = sum(two_ranks[r][name]["steps"][step][k] for r in range(WORLD))
            torch.testing.assert_close(total, exp[k], **TOL, msg=lambda m: f"{name} step {step} {k}: {m}")
    for r in range(WORLD):
        for k, v in _stats(ref).items():
            torch.testing.assert_close(two_ranks[r][name]["stats"][k], v, **TOL,
                                       msg=lambda m: f"{name} rank {r} {k}: {m}")
            # Both ranks hold bitwise-identical running stats (same all-reduced numbers).
            assert torch.equal(two_ranks[r][name]["stats"][k], two_ranks[0][name]["stats"][k])


def test_two_ranks_converted_net_equals_one_big_batch(two_ranks):
    torch.manual_seed(0)
    ref = _Net()
    x, gout = _net_batch()
    x = x.clone().requires_grad_(True)
    out = ref(x)
    (out * gout).sum().div(x.shape[0]).backward()
    for r, (a, b) in enumerate(NET_ROWS):
        got = two_ranks[r]["net"]
        torch.testing.assert_close(got["out"], out.detach()[a:b], **TOL)
        torch.testing.assert_close(got["xgrad"], x.grad[a:b], **TOL)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got["stats"][k], v, **TOL, msg=lambda m: f"rank {r} {k}: {m}")
    for n, p in ref.named_parameters():
        total = sum(two_ranks[r]["net"]["grads"][n] for r in range(WORLD))
        torch.testing.assert_close(total, p.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"grad {n}: {m}")


def test_two_ranks_single_value_per_channel_raises_on_every_rank(two_ranks):
    for r in range(WORLD):
        assert two_ranks[r]["single_value"] is not None, f"rank {r} did not raise"
        assert "Expected more than 1 value per channel" in two_ranks[r]["single_value"]
