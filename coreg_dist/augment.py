"""Batched, device-agnostic image augmentation for Co-Reg (plain torch).

All functions take a float batch ``x`` of shape (B, C, H, W) with values in
[0, 1] and return a new batch of the same shape, dtype and device, clamped to
[0, 1].  Work is vectorised over the batch: RandAugment groups samples by
operation and loops over the ~14 operations, never over samples.

Reproducibility: every random number is drawn from the ``generator`` argument
(on the generator's device, then moved to ``x.device``), always in the same
order and amount for a given batch shape, independently of the image content
and of which ops were picked.  So a generator in a given state yields identical
outputs, which is what exact resume of training needs.  With
``generator=None`` torch's global CPU RNG is used.

RandAugment follows the FixMatch/Co-Reg-style variant: ``n_ops`` ops per
sample drawn uniformly from :data:`RANDAUG_OPS`, each with its own magnitude
``m ~ U(0, 1)`` per sample mapped onto the op's range, and a
random sign for the signed ops.  Ranges (checked against PIL's ImageOps /
ImageEnhance up to 8-bit rounding):

  Identity, AutoContrast, Equalize    no magnitude
  Rotate                              +-30 deg * m
  ShearX / ShearY                     +-0.3 * m (about the image centre)
  TranslateX / TranslateY             +-0.3 * m * image size
  Solarize                            invert pixels >= 1 - m
  Posterize                           keep 4 + floor(5 m) bits (4..8)
  Color, Contrast, Brightness,        enhance factor 0.1 + 1.8 m
  Sharpness                           (1 = unchanged; Color is a no-op on 1 channel)

Geometric ops are bilinear (``affine_grid``/``grid_sample``) and fill with
0.5 gray, as FixMatch's (128, 128, 128) fill.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["weak_augment", "strong_augment", "random_cutout", "RANDAUG_OPS"]

_GRAY = 0.5  # fill of geometric ops and default Cutout fill (= 0 after 0.5/0.5 normalisation)


# --------------------------------------------------------------------------- #
# randomness helpers: always on the generator's device, then moved to x.device
# --------------------------------------------------------------------------- #
def _rand(n: int | tuple, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    size = (n,) if isinstance(n, int) else n
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(size, generator=generator, device=gdev).to(device)


def _randint(high: int, n: int | tuple, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    size = (n,) if isinstance(n, int) else n
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, high, size, generator=generator, device=gdev).to(device)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # grid_sample / histogram code wants fp32 (or fp64); half inputs are upcast.
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


# --------------------------------------------------------------------------- #
# weak augmentation: random crop with padding + horizontal flip
# --------------------------------------------------------------------------- #
def weak_augment(
    x: torch.Tensor,
    *,
    pad: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
    pad_mode: str = "constant",
) -> torch.Tensor:
    """Random ``pad``-px crop (zero padding, or ``pad_mode="reflect"``) + flip (p=0.5).

    Crop and flip are done in a single ``torch.gather``: each sample gets its own
    row/column offsets, and a flipped sample simply reads its columns in reverse.
    Random numbers drawn: B*2 crop offsets, then B flip coins if ``flip``.
    """
    B, C, H, W = x.shape
    dev = x.device
    offs = _randint(2 * pad + 1, (B, 2), generator, dev)  # (dy, dx) in [0, 2*pad]
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad), mode=pad_mode)  # constant mode pads zeros
    else:
        xp = x
    Wp = W + 2 * pad
    rows = offs[:, :1] + torch.arange(H, device=dev)  # (B, H)
    cols = torch.arange(W, device=dev).expand(B, W)
    if flip:
        flipped = _rand(B, generator, dev) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    cols = cols + offs[:, 1:]  # (B, W)
    idx = (rows[:, :, None] * Wp + cols[:, None, :]).view(B, 1, H * W).expand(B, C, H * W)
    out = torch.gather(xp.reshape(B, C, -1), 2, idx).view(B, C, H, W)
    return out.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- #
# Cutout
# --------------------------------------------------------------------------- #
def _cutout_at(x: torch.Tensor, size: int, centres: torch.Tensor, fill: float) -> torch.Tensor:
    """Fill a ``size`` x ``size`` square centred at ``centres`` (B, 2) = (cy, cx).

    The square spans [c - size//2, c - size//2 + size) and is clipped at the
    image border (DeVries & Taylor), so holes near the edge are smaller.
    """
    B, C, H, W = x.shape
    lo = centres - size // 2  # (B, 2)
    ys = torch.arange(H, device=x.device)[None, :]
    xs = torch.arange(W, device=x.device)[None, :]
    in_y = (ys >= lo[:, :1]) & (ys < lo[:, :1] + size)  # (B, H)
    in_x = (xs >= lo[:, 1:]) & (xs < lo[:, 1:] + size)  # (B, W)
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
    return x.masked_fill(mask, fill)


def random_cutout(
    x: torch.Tensor,
    size: int | None = None,
    *,
    fill: float = _GRAY,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cutout of one ``size``-px square hole per sample at a uniform random centre.

    ``size=None`` means ``min(H, W) // 2``; ``size <= 0`` disables it (but still
    draws the B*2 centre coordinates so the random stream stays aligned).
    """
    B, C, H, W = x.shape
    size = min(H, W) // 2 if size is None else int(size)
    cy = _randint(H, B, generator, x.device)
    cx = _randint(W, B, generator, x.device)
    if size <= 0:
        return x
    return _cutout_at(x, size, torch.stack([cy, cx], 1), fill)


# --------------------------------------------------------------------------- #
# RandAugment ops.  Signature: op(x, m, sign) with x (N, C, H, W) in [0, 1],
# m (N,) magnitude in [0, 1], sign (N,) in {-1, +1}.
# --------------------------------------------------------------------------- #
def _lerp(lo: float, hi: float, m: torch.Tensor) -> torch.Tensor:
    return (lo + (hi - lo) * m).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance: factor 0 -> degenerate, 1 -> original, >1 extrapolates."""
    return (degenerate + factor * (x - degenerate)).clamp(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:  # ITU-R 601-2 luma, as PIL's convert("L")
        r, g, b = x.unbind(1)
        return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
    return x.mean(1, keepdim=True)


def _identity(x, m, s):
    return x


def _auto_contrast(x, m, s):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = hi - lo
    ok = scale > 1e-6  # constant channels are left unchanged
    return torch.where(ok, (x - lo) / torch.where(ok, scale, torch.ones_like(scale)), x)


def _equalize(x, m, s):
    """Per-channel histogram equalisation on 8-bit levels (torchvision's algorithm)."""
    N, C, H, W = x.shape
    q = (x * 255).round().long().clamp_(0, 255).view(N, C, H * W)
    hist = torch.zeros(N, C, 256, dtype=torch.long, device=x.device).scatter_add_(2, q, torch.ones_like(q))
    # count in the last non-empty bin
    last = 255 - (hist > 0).flip(2).long().argmax(2, keepdim=True)
    step = (H * W - hist.gather(2, last)) // 255  # (N, C, 1)
    cdf = hist.cumsum(2)
    lut = (cdf - hist + step // 2) // step.clamp(min=1)  # exclusive cumsum + rounding
    lut = lut.clamp_(0, 255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device).expand_as(lut))
    return lut.gather(2, q).view(N, C, H, W).to(x.dtype) / 255.0


def _solarize(x, m, s):
    thr = _lerp(1.0, 0.0, m)  # threshold 256 - v, v ~ U(0, 256)
    return torch.where(x >= thr, 1.0 - x, x)


def _posterize(x, m, s):
    bits = (4 + (m * 5).floor()).clamp(max=8)  # keep 4..8 bits
    shift = (2.0 ** (8 - bits)).view(-1, 1, 1, 1)
    q = (x * 255).round().clamp(0, 255)
    return (q / shift).floor() * shift / 255.0


def _color(x, m, s):
    if x.shape[1] != 3:  # saturation is meaningless for gray images
        return x
    return _blend(_gray(x), x, _lerp(0.1, 1.9, m))


def _contrast(x, m, s):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(mean, x, _lerp(0.1, 1.9, m))


def _brightness(x, m, s):
    return _blend(torch.zeros_like(x), x, _lerp(0.1, 1.9, m))


def _sharpness(x, m, s):
    N, C, H, W = x.shape
    k = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(C, 1, 3, 3)
    blurred = F.conv2d(x, k, groups=C)  # valid conv: PIL keeps the 1-px border unchanged
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = blurred
    return _blend(degenerate, x, _lerp(0.1, 1.9, m))


def _affine(x: torch.Tensor, A: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Warp with an output->input map in centred pixel coords: p_in = A p_out + t.

    A (N, 2, 2), t (N, 2) in (x, y) pixel units, converted to affine_grid's
    normalised coords (align_corners=False) so non-square images are handled.
    Out-of-image pixels get the 0.5 gray fill via the shift-by-fill trick.
    """
    N, C, H, W = x.shape
    S = torch.tensor([W / 2.0, H / 2.0], dtype=x.dtype, device=x.device)
    theta = torch.cat([A * S[None, None, :] / S[None, :, None], (t / S)[:, :, None]], dim=2)
    grid = F.affine_grid(theta, (N, C, H, W), align_corners=False)
    out = F.grid_sample(x - _GRAY, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + _GRAY


def _eye(m: torch.Tensor) -> torch.Tensor:
    return torch.eye(2, dtype=m.dtype, device=m.device).repeat(m.shape[0], 1, 1)


def _rotate(x, m, s):
    ang = (s * m * 30.0) * (math.pi / 180.0)  # +-30 degrees
    cos, sin = ang.cos(), ang.sin()
    A = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    return _affine(x, A, torch.zeros_like(A[:, 0]))


def _shear(axis: int) -> Callable:
    def op(x, m, s):
        A = _eye(m)
        A[:, axis, 1 - axis] = s * m * 0.3  # shear factor +-0.3
        return _affine(x, A, torch.zeros_like(A[:, 0]))

    return op


def _translate(axis: int) -> Callable:
    def op(x, m, s):
        size = x.shape[3] if axis == 0 else x.shape[2]
        t = torch.zeros(m.shape[0], 2, dtype=m.dtype, device=m.device)
        t[:, axis] = s * m * 0.3 * size  # +-30% of the image size
        return _affine(x, _eye(m), t)

    return op


# Order matters for reproducibility: op k is picked when the drawn index is k.
_OPS: dict[str, Callable] = {
    "Identity": _identity,
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Rotate": _rotate,
    "Solarize": _solarize,
    "Color": _color,
    "Posterize": _posterize,
    "Contrast": _contrast,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "TranslateX": _translate(0),
    "TranslateY": _translate(1),
}
RANDAUG_OPS: tuple[str, ...] = tuple(_OPS)


def _rand_augment(x: torch.Tensor, n_ops: int, generator: torch.Generator | None, ops: tuple[str, ...]) -> torch.Tensor:
    """Apply ``n_ops`` rounds; in each, every sample gets one op from ``ops``."""
    B, dev = x.shape[0], x.device
    fns = [_OPS[name] for name in ops]
    for _ in range(n_ops):
        # Draw everything up front (3*B numbers per round) so the stream does not
        # depend on which ops were chosen.
        op_idx = _randint(len(fns), B, generator, dev)
        mag = _rand(B, generator, dev).to(x.dtype)
        sign = torch.where(_rand(B, generator, dev) < 0.5, -1.0, 1.0).to(x.dtype)
        out = x.clone()
        for k, fn in enumerate(fns):
            if fn is _identity:
                continue
            sel = (op_idx == k).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            out[sel] = fn(x[sel], mag[sel], sign[sel]).clamp(0.0, 1.0)
        x = out
    return x


def strong_augment(
    x: torch.Tensor,
    *,
    pad: int = 4,
    flip: bool = True,
    n_ops: int = 1,
    cutout: int | None = None,
    generator: torch.Generator | None = None,
    cutout_fill: float = _GRAY,
    pad_mode: str = "constant",
    ops: tuple[str, ...] = RANDAUG_OPS,
) -> torch.Tensor:
    """Weak augment, then RandAugment (``n_ops`` random ops per sample), then Cutout.

    ``cutout``: side of the square hole; ``None`` -> ``min(H, W) // 2`` (16 for
    32 px, 14 for 28 px), ``0`` disables it.  ``cutout_fill`` defaults to 0.5
    gray, i.e. 0 after the default mean/std 0.5 normalisation.  ``ops`` may
    restrict the op list (names from :data:`RANDAUG_OPS`).
    """
    unknown = set(ops) - set(_OPS)
    if unknown:
        raise ValueError(f"unknown RandAugment ops {sorted(unknown)}; known: {list(RANDAUG_OPS)}")
    dtype = x.dtype
    out = weak_augment(x.to(_work_dtype(x)), pad=pad, flip=flip, generator=generator, pad_mode=pad_mode)
    out = _rand_augment(out, n_ops, generator, tuple(ops))
    out = random_cutout(out, cutout, fill=cutout_fill, generator=generator)
    return out.clamp_(0.0, 1.0).to(dtype)

