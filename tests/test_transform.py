"""ImageTransform / probe_image / channels_for_mode: every image is generated here with PIL."""
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from coreg_dist.data.transform import (ImageDecodeError, ImageTransform, channels_for_mode,
                                       probe_image)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def check_output(out, channels, size):
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8
    assert out.shape == (channels, size, size)
    assert out.flags.c_contiguous and out.flags.writeable


def split_image(w, h, left=(255, 0, 0), right=(0, 0, 255)):
    """RGB image, left half one colour, right half another."""
    a = np.empty((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2:] = right
    return Image.fromarray(a, "RGB")


# ------------------------------------------------------------------------ fast path, basics
def test_grey_28_png_is_bit_identical():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    data = encode(Image.fromarray(pixels, "L"), "PNG")
    out = ImageTransform(size=28, channels=1)(data)
    check_output(out, 1, 28)
    expected = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(out[0], expected)
    assert np.array_equal(out[0], pixels)
    assert probe_image(data) == ("L", 28, 28)
    # grey -> 3 channels: replicated
    out3 = ImageTransform(size=28, channels=3)(data)
    check_output(out3, 3, 28)
    assert all(np.array_equal(out3[c], pixels) for c in range(3))


def test_rgb_32_png_to_1_and_3_channels():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB")
    data = encode(img, "PNG")
    out3 = ImageTransform(32, 3)(data)
    check_output(out3, 3, 32)
    assert np.array_equal(out3, pixels.transpose(2, 0, 1))
    out1 = ImageTransform(32, 1)(data)
    check_output(out1, 1, 32)
    assert np.array_equal(out1[0], np.asarray(img.convert("L")))    # PIL's luma formula


def test_pil_image_input_matches_bytes():
    img = split_image(64, 48)
    t = ImageTransform(16, 3)
    assert np.array_equal(t(img), t(encode(img, "PNG")))
    assert img.size == (64, 48) and img.mode == "RGB"                  # input not modified


@pytest.mark.parametrize("resize", ["center_crop", "stretch", "pad"])
def test_one_pixel_image(resize):
    data = encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")
    out = ImageTransform(32, 3, resize=resize)(data)
    check_output(out, 3, 32)
    if resize != "pad":
        assert (out[:, 16, 16] == [10, 200, 30]).all()
        assert (out == np.array([10, 200, 30], np.uint8)[:, None, None]).all()
    else:
        assert out.any()


# --------------------------------------------------------------------------- resizing
def test_large_jpeg_downscale_keeps_centre_split():
    img = split_image(3000, 2000)
    data = encode(img, "JPEG", quality=90)
    out = ImageTransform(32, 3)(data)                                  # center_crop
    check_output(out, 3, 32)
    # 3000x2000 -> 48x32, centre crop keeps source x in 500..2500: split at column 16.
    red, blue = out[0].astype(int), out[2].astype(int)
    assert (red[:, :14] > 200).all() and (blue[:, :14] < 60).all()
    assert (blue[:, 18:] > 200).all() and (red[:, 18:] < 60).all()
    # The JPEG draft shortcut agrees with a full decode + resize.
    full = ImageTransform(32, 3)(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(out.astype(int) - full.astype(int)).max() <= 16
    assert probe_image(data) == ("RGB", 3000, 2000)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos", "box"])
def test_interpolations(interpolation):
    data = encode(split_image(300, 200), "PNG")
    out = ImageTransform(24, 3, interpolation=interpolation)(data)
    check_output(out, 3, 24)
    assert out[0, :, :8].min() > 200 and out[2, :, -8:].min() > 200


@pytest.mark.parametrize("resize", ["center_crop", "stretch", "pad"])
def test_very_wide_image(resize):
    img = Image.new("RGB", (500, 20), (200, 100, 50))
    out = ImageTransform(32, 3, resize=resize)(encode(img, "PNG"))
    check_output(out, 3, 32)
    colour = np.array([200, 100, 50], np.uint8)[:, None]
    if resize in ("center_crop", "stretch"):
        assert (out.reshape(3, -1) == colour).all()                    # covers everything
    else:
        # 500x20 -> 32x1 (20 * 32/500 = 1.28 -> 1 row), padded symmetrically: row 15.
        assert (out[:, 15, :] == colour).all()
        assert not out[:, :15].any() and not out[:, 16:].any()


def test_pad_tall_image_zero_columns():
    img = Image.new("L", (10, 40), 180)
    out = ImageTransform(16, 1, resize="pad")(encode(img, "PNG"))
    check_output(out, 1, 16)
    # 10x40 -> 4x16, left/right borders of 6 columns each.
    assert (out[0, :, 6:10] == 180).all()
    assert not out[0, :, :6].any() and not out[0, :, 10:].any()


# ------------------------------------------------------------------------ modes
def test_palette_png_with_transparency():
    img = Image.new("P", (8, 8), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    img.paste(1, (0, 0, 4, 8))                      # left half index 1 (green), right index 0
    data = encode(img, "PNG", transparency=0)       # index 0 (red) fully transparent
    assert probe_image(data)[0] == "P"
    out = ImageTransform(8, 3)(data)
    check_output(out, 3, 8)
    assert (out[:, :, :4] == np.array([0, 255, 0], np.uint8)[:, None, None]).all()
    assert not out[:, :, 4:].any()                  # transparent red -> black


def test_rgba_alpha_composited_over_black():
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., :3] = (250, 120, 40)
    a[:, :4, 3] = 255
    a[:, 4:6, 3] = 0
    a[:, 6:, 3] = 128
    data = encode(Image.fromarray(a, "RGBA"), "PNG")
    out = ImageTransform(8, 3)(data)
    check_output(out, 3, 8)
    assert (out[:, :, :4] == np.array([250, 120, 40], np.uint8)[:, None, None]).all()
    assert not out[:, :, 4:6].any()
    assert np.allclose(out[:, :, 6:].astype(int),
                       np.array([125, 60, 20])[:, None, None], atol=1)
    out1 = ImageTransform(8, 1)(data)
    assert not out1[0, :, 4:6].any()


def test_la_image():
    grey = Image.new("L", (10, 10), 200)
    alpha = Image.new("L", (10, 10), 255)
    alpha.paste(0, (0, 0, 10, 5))
    data = encode(Image.merge("LA", (grey, alpha)), "PNG")
    assert probe_image(data) == ("LA", 10, 10)
    out = ImageTransform(10, 1)(data)
    check_output(out, 1, 10)
    assert not out[0, :5].any() and (out[0, 5:] == 200).all()
    out3 = ImageTransform(10, 3)(data)
    assert (out3 == out3[:1]).all()


def test_cmyk_jpeg():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))                # red
    data = encode(img, "JPEG", quality=95)
    assert probe_image(data)[0] == "CMYK"
    out = ImageTransform(8, 3)(data)
    check_output(out, 3, 8)
    assert out[0].min() > 220 and out[1].max() < 40 and out[2].max() < 40


def test_16bit_png_scaled_by_its_range():
    values = np.linspace(0, 4095, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    data = encode(Image.fromarray(values), "PNG")
    mode = probe_image(data)[0]
    assert mode.startswith("I")
    # PIL's own conversion clips: almost everything white.
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("L")) == 255).mean() > 0.9
    out = ImageTransform(64, 1)(data)
    check_output(out, 1, 64)
    assert out.max() == 255 and out.min() == 0
    assert (out == 255).mean() < 0.01
    assert abs(float(out.mean()) - 127.5) < 2
    expected = np.floor(values.astype(np.float64) * 255 / 4095 + 0.5).astype(np.uint8)
    assert np.array_equal(out[0], expected)


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_other_integer_modes(mode):
    values = (np.arange(100, dtype=np.int64).reshape(10, 10) * 300)
    img = Image.fromarray(values.astype(np.int32), "I")
    if mode != "I":
        img = img.convert(mode) if mode != "I;16B" else Image.frombytes(
            "I;16B", (10, 10), values.astype(">u2").tobytes())
    out = ImageTransform(10, 1)(img)
    assert out.max() == 255 and out.min() == 0 and out[0, 0, 1] == round(300 * 255 / 29700)


def test_float_tiff():
    values = np.linspace(0.0, 2.5, 16 * 16, dtype=np.float32).reshape(16, 16)
    data = encode(Image.fromarray(values, "F"), "TIFF")
    assert probe_image(data) == ("F", 16, 16)
    out = ImageTransform(16, 1)(data)
    check_output(out, 1, 16)
    assert out[0, 0, 0] == 0 and out[0, -1, -1] == 255
    assert np.array_equal(out[0], np.floor(values / 2.5 * 255 + 0.5).astype(np.uint8))
    # negative values and NaN do not break it
    neg = values - 1.0
    neg[0, 0] = np.nan
    out = ImageTransform(16, 1)(Image.fromarray(neg, "F"))
    assert out.max() == 255 and out[0, 0, 1] == 0


def test_bilevel_bmp():
    img = Image.new("1", (8, 8), 0)
    img.paste(1, (0, 0, 4, 8))
    data = encode(img, "BMP")
    assert probe_image(data) == ("1", 8, 8)
    out = ImageTransform(8, 1)(data)
    check_output(out, 1, 8)
    assert (out[0, :, :4] == 255).all() and not out[0, :, 4:].any()
    assert set(np.unique(ImageTransform(8, 3)(data))) == {0, 255}


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (12, 12), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50,
                  loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = ImageTransform(12, 3)(data)
    check_output(out, 3, 12)
    assert (out == np.array([255, 0, 0], np.uint8)[:, None, None]).all()
    # A PIL image left at a later frame is taken back to the first.
    img = Image.open(io.BytesIO(data))
    img.seek(2)
    assert (ImageTransform(12, 3)(img)[0] == 255).all()


def test_webp():
    img = split_image(40, 30)
    data = encode(img, "WEBP", lossless=True)
    out = ImageTransform(30, 3)(data)
    check_output(out, 3, 30)
    assert out[0, :, :8].min() > 200 and out[2, :, -8:].min() > 200
    rgba = Image.new("RGBA", (20, 20), (255, 255, 255, 0))
    out = ImageTransform(20, 3)(encode(rgba, "WEBP", lossless=True))
    assert not out.any()


def test_exif_rotated_jpeg():
    img = split_image(40, 20)                       # stored landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6                                # rotate 90 degrees clockwise to display
    data = encode(img, "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    assert probe_image(data) == ("RGB", 20, 40)     # width/height swapped
    out = ImageTransform(16, 3, resize="pad")(data)
    check_output(out, 3, 16)
    # Displayed portrait 20x40 -> 8x16 padded left/right by 4; red on top, blue below.
    assert not out[:, :, :4].any() and not out[:, :, 12:].any()
    assert out[0, :6, 4:12].min() > 200 and out[2, :6, 4:12].max() < 60
    assert out[2, 10:, 4:12].min() > 200 and out[0, 10:, 4:12].max() < 60


# ------------------------------------------------------------------------ errors
def test_truncated_png():
    rng = np.random.default_rng(2)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(ImageDecodeError) as info:
        ImageTransform(32, 3)(data[: len(data) // 2])
    msg = str(info.value)
    assert "cannot decode image" in msg and ("OSError" in msg or "SyntaxError" in msg)
    assert "truncated" in msg or "broken" in msg


def test_random_and_empty_bytes():
    junk = np.random.default_rng(3).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match="UnidentifiedImageError"):
        ImageTransform(32, 3)(junk)
    with pytest.raises(ImageDecodeError, match="UnidentifiedImageError"):
        probe_image(junk)
    for empty in (b"", bytearray()):
        with pytest.raises(ImageDecodeError, match="empty"):
            ImageTransform(32, 3)(empty)
        with pytest.raises(ImageDecodeError, match="empty"):
            probe_image(empty)
    assert issubclass(ImageDecodeError, ValueError)


def test_decompression_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warn_size = encode(Image.new("L", (12, 12)), "PNG")                # 144 > 100: PIL warns
    error_size = encode(Image.new("L", (32, 32)), "PNG")               # 1024 > 200: PIL raises
    for data in (warn_size, error_size):
        with pytest.raises(ImageDecodeError, match="(?i)decompression"):
            ImageTransform(8, 1)(data)
        with pytest.raises(ImageDecodeError, match="(?i)decompression"):
            probe_image(data)
    ImageTransform(8, 1)(encode(Image.new("L", (10, 10)), "PNG"))      # at the limit: fine


@pytest.mark.parametrize("kwargs, key", [
    (dict(size=0, channels=3), "data.image_size"),
    (dict(size=-5, channels=3), "data.image_size"),
    (dict(size=2.5, channels=3), "data.image_size"),
    (dict(size=True, channels=3), "data.image_size"),
    (dict(size=32, channels=2), "data.channels"),
    (dict(size=32, channels=4), "data.channels"),
    (dict(size=32, channels=3, resize="crop"), "data.resize"),
    (dict(size=32, channels=3, interpolation="cubic"), "data.interpolation"),
])
def test_validation_names_config_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        ImageTransform(**kwargs)


def test_numpy_int_size_accepted():
    t = ImageTransform(np.int64(16), np.int64(1))
    assert type(t.size) is int and type(t.channels) is int and t.shape == (1, 16, 16)


def test_pickle_round_trip():
    t = ImageTransform(24, 1, resize="pad", interpolation="lanczos")
    t2 = pickle.loads(pickle.dumps(t))
    assert t2 == t and hash(t2) == hash(t)
    data = encode(split_image(50, 30), "PNG")
    assert np.array_equal(t(data), t2(data))


# ------------------------------------------------------------------------ channels_for_mode
@pytest.mark.parametrize("mode, channels", [
    ("1", 1), ("L", 1), ("LA", 1), ("La", 1), ("I", 1), ("I;16", 1), ("I;16B", 1),
    ("I;16L", 1), ("I;16N", 1), ("F", 1),
    ("RGB", 3), ("RGBA", 3), ("RGBa", 3), ("RGBX", 3), ("P", 3), ("PA", 3), ("CMYK", 3),
    ("YCbCr", 3), ("LAB", 3), ("HSV", 3),
])
def test_channels_for_mode(mode, channels):
    assert channels_for_mode(mode) == channels


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                                  "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "I;16B", "F"])
def test_every_mode_converts(mode):
    img = Image.new(mode, (20, 10))
    for channels in (1, 3):
        check_output(ImageTransform(8, channels)(img), channels, 8)
