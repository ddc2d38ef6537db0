"""BatchNorm over the *global* batch of a multi-rank run, on CPU (gloo) as well as CUDA (NCCL).

Why this exists
---------------
With plain ``nn.BatchNorm2d`` every rank normalises with the statistics of its own shard, so
the same global batch gives different activations, gradients and running statistics depending
on how many ranks it is split over: training is not world-size invariant, and small per-rank
batches make the statistics noisy.  ``torch.nn.SyncBatchNorm`` fixes that, but only for
accelerator tensors -- on CPU it raises "SyncBatchNorm expected input tensor to be on GPU ...",
and our CPU runs use torchrun + gloo.  DeepSpeed does not convert BatchNorm layers either.
:class:`SyncBatchNorm` here works on any device the process group can reduce (gloo on CPU,
NCCL on CUDA) and normalises, in training mode, with the mean and biased variance of the
union of all ranks' batches; gradients flow to every rank's input exactly as for one big batch.

Usage::

    net = convert_sync_batchnorm(net)          # after net.to(device), before DDP wrapping
    # On a CUDA module the BN layers become torch.nn.SyncBatchNorm (prefer_torch_on_cuda=True,
    # the default); CPU layers -- or all layers with prefer_torch_on_cuda=False -- become ours.

Algorithm (training mode, ``torch.distributed`` initialised, world size > 1), per channel:

1. local count ``n_r`` and local sum -> one all-reduce (SUM) -> global count ``N`` and mean;
2. local sum of squared deviations *from the global mean* -> all-reduce -> biased variance.

Two passes instead of ``E[x^2] - E[x]^2`` because the latter cancels catastrophically when
|mean| >> std.  Precision: the activation-sized work (subtraction, squares, local sums,
normalisation) runs in float32 (or float64 for float64 inputs; half/bfloat16 inputs are upcast,
as native BatchNorm accumulates in float32 too), which keeps memory and speed close to native
BN (float64 accumulation over activations is ~40x slower on CPU).  The local sum of pass 1 is
taken after subtracting a per-channel shift (the rank's first value), so it stays accurate when
|mean| >> std.  The per-channel (C-sized, cheap) local sums are cast to **float64** before the
all-reduce, and the global mean, variance, 1/std and the running-stat update are computed in
float64, so combining many ranks' partial sums adds no error beyond that of the local sums.

The all-reduces are differentiable (:class:`_AllReduceSum`: its backward all-reduces the
gradient).  ``torch.distributed.nn.functional.all_reduce`` would do the same and works with
gloo, but torch 2.13 deprecates it and emits a ``FutureWarning`` on every call (i.e. every
BN layer and step), so we keep the six lines here.  Consequences, as for torch's SyncBatchNorm:
every rank must run the same BN layers in the same order, forward *and* backward (a rank whose
loss ignores a BN output would hang the others); a rank with an empty (0-row) batch is fine --
it contributes a count and sums of 0 and still joins every collective.  Weight/bias gradients
stay local (each rank's share); DDP's gradient all-reduce combines them as for any parameter.

Outside that case -- not distributed, world size 1, eval mode -- the module is exactly
``nn.BatchNorm`` (it calls ``F.batch_norm`` with the same arguments).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable SUM all-reduce: y = sum_r x_r on every rank, so dL/dx_r = sum_k dL/dy_k,
    which is again a SUM all-reduce (of the gradients).  Backward calls ``apply`` so double
    backward stays correct."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad.contiguous(), ctx.group), None


def _all_reduce_sum(tensor: Tensor, group) -> Tensor:
    return _AllReduceSum.apply(tensor, group)


def _sync_batch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None,
                     running_mean: Tensor | None, running_var: Tensor | None,
                     momentum: float, eps: float, group, all_reduce=_all_reduce_sum) -> Tensor:
    """Training-mode batch norm with statistics over the union of all ranks' batches.

    ``momentum`` is the exponential-average factor already resolved by the caller (``1/t`` for
    ``momentum=None``).  ``all_reduce(tensor, group)`` must be a differentiable SUM all-reduce;
    the tests pass the identity to check the arithmetic in one process.
    """
    num_channels = input.shape[1]
    dims = [0, *range(2, input.dim())]
    shape = [1, num_channels] + [1] * (input.dim() - 2)
    # Activation-sized work in >= float32 (see module docstring); per-channel stats in float64.
    compute_dtype = torch.promote_types(input.dtype, torch.float32)
    x = input.to(compute_dtype)

    # Pass 1: global count and mean.  The count rides along in the same all-reduce (exact in
    # float64 up to 2**53 values per channel) to save a collective.
    local_count = input.numel() // num_channels if num_channels else 0
    # Sum x - shift (shift = this rank's first value per channel, a constant to autograd) and
    # add count * shift back in float64: the float32 sum then runs over values of size ~std
    # instead of ~|mean|.  Plain float32 sums over N*H*W values lose ~log2(N) bits when
    # |mean| >> std (seen: mean error 2.5e-3 at mean 1e4, std 1), and float64 accumulation
    # costs ~40x a float32 sum on CPU.
    if local_count > 0:
        shift = x.detach()[(0, slice(None)) + (0,) * (input.dim() - 2)]
    else:
        shift = x.new_zeros(num_channels)
    local_sum = ((x - shift.reshape(shape)).sum(dims).to(torch.float64)
                 + local_count * shift.to(torch.float64))
    count_and_sum = torch.cat([local_sum.new_full((1,), float(local_count)), local_sum])
    count_and_sum = all_reduce(count_and_sum, group)
    # One host sync per layer: the count decides the error below and the unbiased correction.
    count = int(count_and_sum[0].item())
    if count == 1:
        # Same error as nn.BatchNorm, but judged on the *global* batch, so every rank sees the
        # same count and raises together (no rank is left waiting in a collective).
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()} on this rank and 1 value per channel over all ranks")
    denom = max(count, 1)  # count 0 (every rank empty): output is empty, avoid 0/0 = nan
    mean = count_and_sum[1:] / denom

    # Pass 2: squared deviations from the *global* mean (not E[x^2] - mean^2: cancellation).
    xmu = x - mean.to(compute_dtype).reshape(shape)
    sq_dev = all_reduce(xmu.square().sum(dims).to(torch.float64), group)
    var = sq_dev / denom  # biased: used for normalisation, as nn.BatchNorm does
    invstd = torch.rsqrt(var + eps)

    if running_mean is not None and running_var is not None and count > 0:
        # As nn.BatchNorm: unbiased variance (global count) into running_var; an empty global
        # batch leaves the buffers untouched (native BN does the same).
        with torch.no_grad():
            unbiased = sq_dev.detach() / (count - 1)
            running_mean.copy_(running_mean.double() * (1 - momentum) + mean.detach() * momentum)
            running_var.copy_(running_var.double() * (1 - momentum) + unbiased * momentum)

    # y = (x - mean) * (invstd * weight) + bias: only xmu is saved at activation size.
    scale = invstd.to(compute_dtype)
    if weight is not None:
        scale = scale * weight.to(compute_dtype)
    out = xmu * scale.reshape(shape)
    if bias is not None:
        out = out + bias.to(compute_dtype).reshape(shape)
    return out.to(input.dtype)


class SyncBatchNorm(_BatchNorm):
    """BatchNorm that, in training mode under ``torch.distributed`` with world size > 1,
    normalises with the statistics of the global batch (all ranks of ``process_group``,
    default: the world), on CPU/gloo or CUDA/NCCL.  Otherwise identical to ``nn.BatchNorm``.

    Accepts (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W) inputs, so it replaces
    BatchNorm1d/2d/3d.  Arguments as ``nn.BatchNorm2d`` plus ``process_group``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, bias: bool = True) -> None:
        # `bias=False` only exists in newer torch; pass it only when used (setup.py allows >=2.4).
        extra = {} if bias else {"bias": False}
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **extra)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2 or input.dim() > 5:
            raise ValueError(f"expected 2D, 3D, 4D or 5D input (got {input.dim()}D input)")

    def _group_world_size(self) -> tuple[object, int]:
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group, dist.get_world_size(group)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # Same bookkeeping as _BatchNorm.forward.
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        running_mean = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if not self.training or self.track_running_stats else None

        # Sync only when training (eval with track_running_stats=False uses local batch stats,
        # like torch's SyncBatchNorm) and there is somebody to sync with.
        group, world_size = self._group_world_size() if self.training else (None, 1)
        if world_size <= 1:
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                bn_training, exponential_average_factor, self.eps)
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels, got input of size {tuple(input.shape)}")
        return _sync_batch_norm(input, self.weight, self.bias, running_mean, running_var,
                                exponential_average_factor, self.eps, group)


def _on_cuda(module: torch.nn.Module) -> bool:
    return any(t.is_cuda for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None,
                           prefer_torch_on_cuda: bool = True) -> torch.nn.Module:
    """Replace every BatchNorm1d/2d/3d in ``module`` (recursively) by a synchronised one.

    Mirrors ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new layer *shares* the old
    one's weight and bias Parameters (so an optimizer built earlier keeps working and
    ``requires_grad`` is kept) and its running_mean / running_var / num_batches_tracked buffers,
    and copies eps, momentum, affine, track_running_stats and the training flag.  Layers that
    are already a SyncBatchNorm (ours or torch's) are left alone.  Returns ``module`` with its
    children replaced, or the new layer if ``module`` itself is a BatchNorm.

    The choice is made per layer, from where its parameters/buffers live: with
    ``prefer_torch_on_cuda=True`` (default) a layer on CUDA becomes ``torch.nn.SyncBatchNorm``
    (NCCL-tuned kernels, one fused collective), anything else becomes our
    :class:`SyncBatchNorm`; with ``False`` every layer becomes ours.  So convert *after* moving
    the model to its device.
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (SyncBatchNorm, torch.nn.SyncBatchNorm)):
        if hasattr(module, "has_uninitialized_params") and module.has_uninitialized_params():
            raise ValueError(f"cannot convert an uninitialised lazy BatchNorm ({type(module).__name__}); "
                             "run one forward first")
        cls = torch.nn.SyncBatchNorm if prefer_torch_on_cuda and _on_cuda(module) else SyncBatchNorm
        has_bias = getattr(module, "bias", None) is not None or not module.affine
        extra = {} if has_bias else {"bias": False}
        out = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats, process_group, **extra)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group, prefer_torch_on_cuda))
    return out
