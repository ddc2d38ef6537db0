"""Turn one stored image (its bytes as they came, or a PIL image) into a fixed-size uint8 array.

The shards hold every image exactly as it was ingested: PNG, JPEG, WebP, BMP, GIF, TIFF, of any
size and any PIL mode. The streaming training loader calls an :class:`ImageTransform` once per
sample, inside its DataLoader worker processes, and gets back a C-contiguous, writable
``uint8`` array of shape ``(channels, size, size)``:

    transform = ImageTransform(size=32, channels=3)             # built by the caller
    pixels = transform(sample_bytes)                           # (3, 32, 32) uint8

Nothing valid is dropped: an image of any size or aspect ratio is resized to the training
resolution (a 1x1 image is upscaled, a 3000x2000 photo downscaled), and any PIL mode is
converted to grey or RGB, so every decodable image yields a sample. Only bytes that are not a
decodable image raise :class:`ImageDecodeError` (a ``ValueError``) whose message names PIL's
exception type and text; the caller reports the sample by shard/key/source path and skips it.

Steps and the choices made:

* Decode: ``Image.open`` then a forced ``load()``, so truncated or corrupt data fails here and
  not later in a collate function. PIL's default pixel limit ``Image.MAX_IMAGE_PIXELS`` is kept,
  and both its ``DecompressionBombWarning`` (over the limit) and ``DecompressionBombError``
  (over twice the limit) become :class:`ImageDecodeError`. Multi-frame files (animated GIF or
  WebP, multi-page TIFF) give their **first frame**. Large JPEG downscales use PIL's
  ``draft`` (DCT-domain scaling by 1/2, 1/4 or 1/8, keeping at least 3x the needed size
  per side) except for ``interpolation="nearest"``. The warning filter is set with
  ``warnings.catch_warnings``, which is process-wide: call the transform from worker
  processes (as the DataLoader does), not from several threads of one process.
* EXIF orientation is applied (``ImageOps.exif_transpose``), so a portrait photo stored
  landscape with orientation 6 comes out portrait.
* Mode conversion to 8-bit grey ("L") or RGB:
    - **Alpha is composited over black** (``value * alpha / 255``, rounded): RGBA, LA, PA,
      premultiplied RGBa/La, palette images with transparency (through RGBA) and colour-keyed
      ``transparency`` of L/RGB/1 images. A fully transparent pixel is 0 whatever its colour.
    - Palette images without transparency: their palette colours (RGB). CMYK, YCbCr, LAB,
      HSV, RGBX: PIL's conversion to RGB.
    - **16/32-bit integer modes** ("I;16", "I;16B", "I;16L", "I;16N", "I", ...) **and float
      mode "F" are scaled by their actual value range**: ``[min(0, vmin), max(0, vmax)]`` maps
      linearly onto ``0..255`` (for the usual non-negative image: ``v * 255 / vmax``, so a 12-bit
      image stored in 16 bits is not nearly black and its maximum is 255; 0 stays black). NaN
      counts as 0, +/-inf as the range's ends. PIL's own ``convert("L")`` clips such values at
      255 (most 16-bit images turn white) and is not used for them.
    - Mode "1": 0/255. RGB to one channel: PIL's "L" luma (``L = R*299/1000 + G*587/1000 +
      B*114/1000``). Grey to three channels: the grey plane replicated.
* Resize with PIL (``reducing_gap=3.0`` for fast, near-identical large downscales), one of:
    - ``"center_crop"`` (default): scale the shorter side to ``size`` and keep the centre square
      (one resampling, the crop box given in source coordinates);
    - ``"stretch"``: resize to ``size x size`` ignoring the aspect ratio;
    - ``"pad"``: scale the longer side to ``size`` (the other side at least 1 pixel) and pad
      symmetrically with zeros (black) to a square; an odd leftover puts the extra zero row or
      column at the bottom/right.
  Fast path: an image already ``size x size`` is not resampled at all, so its pixels are kept
  exactly (a 28x28 grey PNG at ``size=28, channels=1`` equals ``np.asarray(Image.open(...))``).
"""
from __future__ import annotations

import io
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageDecodeError", "ImageTransform", "probe_image", "channels_for_mode",
           "RESIZE_MODES", "INTERPOLATIONS"]

RESIZE_MODES = ("center_crop", "stretch", "pad")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_REDUCING_GAP = 3.0
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})

ImageInput = Union[bytes, bytearray, memoryview, Image.Image]


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (truncated, garbage, empty, decompression bomb...).

    The message names the cause (PIL's exception type and text). Callers catch it, report the
    sample (shard, key, source path) and skip it.
    """


def channels_for_mode(mode: str) -> int:
    """1 for the grey PIL modes ("1", "L", "LA", "La", "I", "I;16" and its variants, "F"),
    3 for everything else (RGB, RGBA, P, PA, CMYK, YCbCr, LAB, HSV, ...)."""
    if mode in _GREY_MODES or mode.startswith("I;") or mode.startswith("F;"):
        return 1
    return 3


def probe_image(data: ImageInput) -> Tuple[str, int, int]:
    """(PIL mode, width, height) of an image, width/height after EXIF orientation.

    Reads only the headers where PIL allows (a PNG whose EXIF may follow the pixel data is
    decoded to find it). Raises :class:`ImageDecodeError` for bytes PIL cannot identify.
    """
    stream = None if isinstance(data, Image.Image) else _as_stream(data)
    with _bomb_guard():
        try:
            img = data if stream is None else Image.open(stream)
            mode, (w, h) = img.mode, img.size
            _check_pixels(w, h)
        except ImageDecodeError:
            raise
        except Exception as exc:
            raise _decode_error(data, exc) from exc
        if _orientation(img) in (5, 6, 7, 8):
            w, h = h, w
    return mode, w, h


@dataclass(frozen=True)
class ImageTransform:
    """Bytes (or a PIL image) -> ``uint8`` array ``(channels, size, size)``, C-contiguous.

    Picklable (plain frozen dataclass), so it can be handed to DataLoader worker processes.
    See the module docstring for the decoding, mode-conversion and resize choices.

    Fields: ``size`` (output is ``size x size``; config ``data.image_size``), ``channels``
    (1 or 3; ``data.channels``), ``resize`` ("center_crop" | "stretch" | "pad";
    ``data.resize``), ``interpolation`` ("nearest" | "bilinear" | "bicubic" | "lanczos" |
    "box"; ``data.interpolation``).
    """
    size: int
    channels: int
    resize: str = "center_crop"
    interpolation: str = "bilinear"

    def __post_init__(self):
        if (isinstance(self.size, bool) or not isinstance(self.size, numbers.Integral)
                or self.size < 1):
            raise ValueError(f"data.image_size must be a positive integer (got {self.size!r})")
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3 (got {self.channels!r})")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"data.resize must be one of {', '.join(RESIZE_MODES)} "
                             f"(got {self.resize!r})")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"data.interpolation must be one of {', '.join(INTERPOLATIONS)} "
                             f"(got {self.interpolation!r})")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "channels", int(self.channels))

    @property
    def shape(self) -> Tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def __call__(self, data: ImageInput) -> np.ndarray:
        """Decode ``data`` (image bytes, or a PIL image: used at its first frame, seeking to it
        if needed) and return a new ``uint8`` array of shape ``(channels, size, size)``.

        Raises :class:`ImageDecodeError` when the data is not a decodable image.
        """
        img = _decode(data, self._draft_request)
        img = _to_grey_or_rgb(img)
        if self.channels == 1 and img.mode == "RGB":
            img = img.convert("L")
        arr = self._resize(img)                       # (S, S) or (S, S, 3), uint8
        if arr.ndim == 3:
            arr = arr.transpose(2, 0, 1)
        elif self.channels == 3:
            arr = np.broadcast_to(arr, (3,) + arr.shape)
        else:
            arr = arr[None]
        return np.array(arr, dtype=np.uint8, order="C", copy=True)

    # -------------------------------------------------------------------- internals
    def _resize(self, img: Image.Image) -> np.ndarray:
        s = self.size
        w, h = img.size
        if (w, h) == (s, s):                          # fast path: exact pixels
            return np.asarray(img)
        resample = INTERPOLATIONS[self.interpolation]
        if self.resize == "stretch":
            return np.asarray(img.resize((s, s), resample, reducing_gap=_REDUCING_GAP))
        if self.resize == "center_crop":
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
            return np.asarray(img.resize((s, s), resample, box=box, reducing_gap=_REDUCING_GAP))
        # pad
        scale = s / max(w, h)
        nw, nh = (min(s, max(1, round(w * scale))), min(s, max(1, round(h * scale))))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample, reducing_gap=_REDUCING_GAP)
        small = np.asarray(img)
        out = np.zeros((s, s) + small.shape[2:], dtype=np.uint8)
        top, left = (s - nh) // 2, (s - nw) // 2
        out[top:top + nh, left:left + nw] = small
        return out

    def _draft_request(self, w: int, h: int) -> Optional[Tuple[int, int]]:
        """Smallest (pre-orientation) size a JPEG may be DCT-scaled down to, or None."""
        if self.interpolation == "nearest":
            return None
        s = self.size
        if self.resize == "stretch":
            need = (s, s)                             # square: orientation does not matter
        else:
            scale = s / (min(w, h) if self.resize == "center_crop" else max(w, h))
            need = (w * scale, h * scale)
        req = tuple(max(1, math.ceil(n * _REDUCING_GAP)) for n in need)
        if w < 2 * req[0] or h < 2 * req[1]:
            return None                               # draft could not halve it anyway
        return req


# ------------------------------------------------------------------------ decoding
class _bomb_guard(warnings.catch_warnings):
    """PIL's DecompressionBombWarning raised as an error inside the block."""

    def __enter__(self):
        super().__enter__()
        warnings.simplefilter("error", Image.DecompressionBombWarning)


def _as_stream(data) -> io.BytesIO:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected image bytes or a PIL image, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("cannot decode image: empty data (0 bytes)")
    return io.BytesIO(data)


def _decode_error(data, exc: BaseException) -> ImageDecodeError:
    what = (f"{len(data)} bytes" if isinstance(data, (bytes, bytearray, memoryview))
            else "PIL image")
    return ImageDecodeError(f"cannot decode image ({what}): {type(exc).__name__}: {exc}")


def _check_pixels(w: int, h: int) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise ImageDecodeError(
            f"cannot decode image: {w}x{h} = {w * h} pixels exceeds PIL's decompression-bomb "
            f"limit Image.MAX_IMAGE_PIXELS = {limit}")


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1..8); 1 when absent or unreadable (a broken EXIF block does not
    make the pixels invalid)."""
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:
        return 1


def _decode(data: ImageInput, draft_request=None) -> Image.Image:
    """Open, take the first frame, fully load, apply EXIF orientation."""
    stream = None if isinstance(data, Image.Image) else _as_stream(data)
    with _bomb_guard():
        try:
            if stream is None:
                img = data
                if img.tell() != 0:
                    img.seek(0)
                _check_pixels(*img.size)
            else:
                img = Image.open(stream)
                _check_pixels(*img.size)
                if draft_request is not None and img.format == "JPEG":
                    req = draft_request(*img.size)
                    if req is not None:
                        img.draft(None, req)
            img.load()
        except ImageDecodeError:
            raise
        except Exception as exc:                      # PIL raises many types on bad data
            raise _decode_error(data, exc) from exc
    orientation = _orientation(img)
    if orientation in _TRANSPOSE:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:                             # EXIF too broken to rewrite: rotate anyway
            img = img.transpose(_TRANSPOSE[orientation])
    return img


# ------------------------------------------------------------------ mode conversion
def _has_alpha(img: Image.Image) -> bool:
    if img.mode in _ALPHA_MODES or img.info.get("transparency") is not None:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode.endswith("A")


def _over_black(img: Image.Image) -> Image.Image:
    """LA or RGBA -> L or RGB, composited over black: round(value * alpha / 255)."""
    a = np.asarray(img)
    colour = a[..., :-1].astype(np.uint16)
    out = ((colour * a[..., -1:] + 127) // 255).astype(np.uint8)
    if out.shape[-1] == 1:
        return Image.fromarray(out[..., 0], "L")
    return Image.fromarray(out, "RGB")


def _scale_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> L, [min(0, vmin), max(0, vmax)] onto 0..255."""
    try:
        a = np.asarray(img)
    except Exception:
        a = np.asarray(img.convert("F" if img.mode.startswith("F") else "I"))
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if finite.all():
        lo, hi = min(0.0, float(a.min(initial=0.0))), max(0.0, float(a.max(initial=0.0)))
    elif finite.any():
        lo = min(0.0, float(a[finite].min()))
        hi = max(0.0, float(a[finite].max()))
        a = np.nan_to_num(a, nan=0.0, posinf=hi, neginf=lo)
    else:
        lo, hi = 0.0, 0.0
        a = np.zeros_like(a)
    if hi <= lo:
        out = np.zeros(a.shape, dtype=np.uint8)
    else:
        out = np.clip(np.floor((a - lo) * (255.0 / (hi - lo)) + 0.5), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


def _to_grey_or_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit "L" (grey modes) or "RGB" (everything else)."""
    mode = img.mode
    if mode == "I" or mode.startswith("I;") or mode == "F" or mode.startswith("F;"):
        return _scale_to_l(img)
    if _has_alpha(img):
        if mode == "1":                               # colour key on a bilevel image
            grey = np.array(img.convert("L"))
            grey[grey == (255 if img.info["transparency"] else 0)] = 0
            return Image.fromarray(grey, "L")
        if mode in ("L", "LA", "La"):
            return _over_black(img if mode == "LA" else img.convert("LA"))
        return _over_black(img if mode == "RGBA" else img.convert("RGBA"))
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    try:
        return img.convert("RGB")                     # P, CMYK, YCbCr, LAB, HSV, RGBX, ...
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(f"cannot convert PIL mode {mode!r} to RGB: {exc}") from exc
