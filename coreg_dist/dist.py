"""One collectives object for every global quantity, the identity in one process.

    torchrun --nproc_per_node=2 -m train.cli --config configs/demo.yaml     # 2 ranks, gloo on CPU
    coll, device = init_distributed(cfg)
    total = coll.sum(np.array([n_local, loss_sum]))      # every rank gets the global sums
    lo, hi = coll.min(x.min()), coll.max(x.max())
    keys = coll.all_gather(local_keys)                   # rank order, concatenated on dim 0

Every quantity that is global in Co-Reg (distribution-alignment mean, division-loss min/max, GMM
sufficient statistics, |P| / |U| counts and so the number of steps, prototypes, the MoCo queue,
evaluation counts, error counts) goes through this object, so a method never tests the world
size: in one process each call returns its input. Every rank must make the same calls in the
same order (that is what keeps them from hanging); the trainer arranges that by giving every
rank the same number of steps and ending each sweep with a collective all reach.

`bytes_sent` counts the payload this rank contributes per kind of call (objects by their
pickled size; the backward all-reduce of a gathered-with-gradient tensor under all_reduce): the
benchmark reads it to show that nothing of size N (or N x C) is ever communicated. Gradient
all-reduces belong to the engine (DDP's buckets), not to this object.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List, Tuple, Union

import numpy as np
import torch
import torch.distributed as tdist

Number = Union[int, float]


class Collectives:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 comm_device: str = "cpu"):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.comm_device = torch.device(comm_device)    # where tensors must be for the backend
        self.bytes_sent: Dict[str, int] = {"all_reduce": 0, "all_gather": 0, "object": 0}
        self.calls: Dict[str, int] = {"all_reduce": 0, "all_gather": 0, "object": 0}

    # ------------------------------------------------------------------ facts
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _count(self, kind: str, nbytes: int) -> None:
        self.calls[kind] += 1
        self.bytes_sent[kind] += int(nbytes)

    # ------------------------------------------------------------------ reductions
    def _reduce(self, x, op):
        """Element-wise reduction of a number, numpy array or tensor; returns the same kind."""
        if isinstance(x, torch.Tensor):
            t = x.detach().clone()
            self._count("all_reduce", t.numel() * t.element_size())
            if self.distributed:
                moved = t.to(self.comm_device)
                tdist.all_reduce(moved, op=op)
                t = moved.to(x.device)
            return t
        arr = np.asarray(x)
        integer = np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool
        t = torch.as_tensor(arr.astype(np.int64 if integer else np.float64))
        self._count("all_reduce", t.numel() * t.element_size())
        if self.distributed:
            moved = t.to(self.comm_device)
            tdist.all_reduce(moved, op=op)
            t = moved.cpu()
        out = t.numpy()
        if np.ndim(x) == 0 and not isinstance(x, np.ndarray):
            return out.item()
        return out

    def sum(self, x):
        return self._reduce(x, tdist.ReduceOp.SUM)

    def min(self, x):
        return self._reduce(x, tdist.ReduceOp.MIN)

    def max(self, x):
        return self._reduce(x, tdist.ReduceOp.MAX)

    def allreduce_fn(self):
        """The `allreduce(np.ndarray) -> np.ndarray` hook coreg_dist.gmm takes."""
        return lambda a: self.sum(np.asarray(a, dtype=np.float64))

    # ------------------------------------------------------------------ gathers
    def all_gather(self, t: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order.

        Sizes along dim 0 may differ between ranks (padded for the transfer). `grad=True` keeps
        the autograd graph (gradients flow back to each rank's own rows, summed over ranks);
        it requires equal sizes, which training batches have."""
        if t.dtype == torch.bool and self.distributed:     # gloo has no bool all_gather
            return self.all_gather(t.to(torch.uint8)).bool()
        self._count("all_gather", t.numel() * t.element_size())
        if not self.distributed:
            return t
        if grad:
            return _AllGatherWithGrad.apply(t.to(self.comm_device), self, self.rank).to(t.device)
        src = t.detach().to(self.comm_device)
        n = torch.tensor([src.shape[0]], dtype=torch.int64, device=self.comm_device)
        self._count("all_gather", 8)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        tdist.all_gather(sizes, n)
        sizes = [int(s.item()) for s in sizes]
        m = max(sizes)
        if src.shape[0] < m:
            pad = torch.zeros((m - src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype,
                              device=src.device)
            src = torch.cat([src, pad])
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        tdist.all_gather(parts, src.contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)

    def all_gather_object(self, obj: Any) -> List[Any]:
        """Small Python objects (counts, error examples, per-shard index rows), in rank order."""
        import pickle
        self._count("object", len(pickle.dumps(obj)))
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    # ------------------------------------------------------------------ modules
    @torch.no_grad()
    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) over ranks, so that
        every rank evaluates and checkpoints the same network."""
        if not self.distributed:
            return
        for b in module.buffers():
            if b.is_floating_point():
                self._count("all_reduce", b.numel() * b.element_size())
                t = b.to(self.comm_device)
                tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
                b.copy_(t.to(b.device) / self.world_size)

    def parameters_in_sync(self, modules) -> bool:
        """True when every rank holds bit-identical parameters (a checksum per rank, gathered)."""
        if not self.distributed:
            return True
        digest = 0.0
        with torch.no_grad():
            for m in modules:
                for i, p in enumerate(m.parameters()):
                    digest += float(p.detach().double().mul(1.0 + 1e-3 * i).sum())
        sums = self.all_gather_object(digest)
        return all(s == sums[0] for s in sums)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather (equal sizes) whose backward sums every rank's gradient for this rank's rows
    (all-reduce, then this rank's slice): the gradient one device would compute for the global
    batch, once DDP averages it. (torch.distributed.nn's version warns on every call in 2.13.)"""

    @staticmethod
    def forward(ctx, t, coll: "Collectives", rank: int):
        parts = [torch.empty_like(t) for _ in range(coll.world_size)]
        tdist.all_gather(parts, t.contiguous())
        ctx.coll, ctx.rank, ctx.n = coll, rank, t.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        ctx.coll._count("all_reduce", grad.numel() * grad.element_size())
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None, None


def env_world() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (torchrun, deepspeed,
    accelerate and srun wrappers all set these)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(cfg, device: str) -> Tuple[Collectives, str]:
    """Join the process group the launcher describes (if any); returns (collectives, device).

    One process: the identity collectives and `device` unchanged. Several: gloo on CPU, NCCL on
    CUDA (`dist.backend` overrides), each rank on cuda:LOCAL_RANK when CUDA is used, and a
    collective timeout of `dist.timeout_s` so a dead rank fails the others instead of hanging
    them forever.
    """
    rank, world, local = env_world()
    if world <= 1:
        return Collectives(), device
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend,
                                 timeout=datetime.timedelta(seconds=cfg.dist.timeout_s))
    comm = device if backend == "nccl" else "cpu"
    return Collectives(tdist.get_rank(), tdist.get_world_size(), local, comm), device


def collective_failure(exc: BaseException, cfg) -> "str | None":
    """A clear message when exc is a collective that failed because a peer died or timed out
    (gloo: connection closed / reset / timeout; NCCL: watchdog, remote error); None otherwise."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return None
    text = f"{type(exc).__name__}: {exc}"
    signs = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out",
             "timed out", "timeout", "Timeout", "NCCL", "DistBackendError", "DistNetworkError",
             "ProcessGroup", "gloo", "Socket")
    if not (isinstance(exc, getattr(tdist, "DistError", ())) or any(s in text for s in signs)):
        return None
    first = text.splitlines()[0][:300]
    return (f"error: rank {tdist.get_rank()} of {tdist.get_world_size()}: a collective failed ({first}). "
            f"Another rank has most likely died (killed, out of memory) or stopped answering within "
            f"dist.timeout_s={cfg.dist.timeout_s}s; see its log. The newest complete checkpoint is "
            f"intact: rerun with --resume latest.")


def shutdown_distributed() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
