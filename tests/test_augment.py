"""Tests for coreg_dist.augment (batched weak/strong augmentation)."""
import pytest
import torch

from coreg_dist import augment as A
from coreg_dist.augment import RANDAUG_OPS, random_cutout, strong_augment, weak_augment


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors: a second OpenMP thread only adds sync cost, and on a busy
    # shared 2-core machine it makes runs 10-100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ramp(B=4, C=1, H=12, W=12):
    """Asymmetric images (values grow left->right) that are never flip-invariant."""
    x = torch.linspace(0.05, 0.95, W).expand(B, C, H, W).clone()
    return x + 0.01 * torch.arange(H)[:, None] / H


@pytest.mark.parametrize("fn", [weak_augment, strong_augment])
@pytest.mark.parametrize("shape", [(8, 1, 28, 28), (5, 3, 32, 32), (3, 3, 20, 24)])
def test_shape_dtype_range(fn, shape):
    x = torch.rand(shape)
    out = fn(x, generator=gen())
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_half_precision_input_keeps_dtype():
    x = torch.rand(4, 3, 16, 16).to(torch.bfloat16)
    out = strong_augment(x, generator=gen())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


@pytest.mark.parametrize("fn,kw", [(weak_augment, {}), (strong_augment, {"n_ops": 2})])
def test_determinism(fn, kw):
    x = torch.rand(16, 3, 32, 32)
    a = fn(x, generator=gen(1), **kw)
    b = fn(x, generator=gen(1), **kw)
    c = fn(x, generator=gen(2), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generator_state_advances_identically():
    # Resume: a generator restored from a saved state replays the same stream.
    g = gen(3)
    x = torch.rand(8, 1, 28, 28)
    strong_augment(x, generator=g)
    state = g.get_state()
    a = strong_augment(x, generator=g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(a, strong_augment(x, generator=g2))


def test_random_stream_independent_of_content():
    # Same generator seed, different images: the same ops/offsets must be drawn,
    # so the generators end in the same state.
    g1, g2 = gen(5), gen(5)
    strong_augment(torch.rand(8, 3, 16, 16), generator=g1)
    strong_augment(torch.zeros(8, 3, 16, 16), generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_weak_identity_path_and_flip():
    x = ramp()
    for seed in range(5):
        assert torch.equal(weak_augment(x, pad=0, flip=False, generator=gen(seed)), x)
        out = weak_augment(x, pad=0, flip=True, generator=gen(seed))
        flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
        kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
        assert (flipped ^ kept).all()  # every sample is either flipped or untouched
    out = weak_augment(ramp(B=256), pad=0, flip=True, generator=gen())
    n_flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).sum().item()
    assert 90 < n_flipped < 166  # p = 0.5


def test_weak_crop_is_a_shifted_window():
    x = torch.rand(32, 2, 10, 10)
    pad = 3
    out = weak_augment(x, pad=pad, flip=False, generator=gen())
    xp = torch.nn.functional.pad(x, (pad,) * 4)
    for o, p in zip(out, xp):
        windows = [p[:, i:i + 10, j:j + 10] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
        assert any(torch.equal(o, w) for w in windows)
    assert not all(torch.equal(o, xi) for o, xi in zip(out, x))  # some samples moved


def test_weak_reflect_padding_has_no_zero_border():
    x = torch.rand(16, 1, 12, 12) * 0.5 + 0.25
    out = weak_augment(x, pad=4, pad_mode="reflect", generator=gen())
    assert out.min() >= 0.25


def test_cutout_square_of_right_size():
    x = torch.ones(3, 2, 28, 28)
    centres = torch.tensor([[14, 14], [10, 20], [0, 0]])
    out = A._cutout_at(x, 14, centres, fill=0.0)
    holes = out[:, 0] == 0
    assert torch.equal(holes[0].nonzero().amin(0), torch.tensor([7, 7]))
    assert holes[0].sum() == 14 * 14 and holes[1].sum() == 14 * 14
    assert holes[1, 3:17, 13:27].all()
    assert holes[2].sum() == 7 * 7  # clipped at the border
    assert torch.equal(out[:, 0], out[:, 1])  # same hole in every channel


@pytest.mark.parametrize("size,expected", [(None, 14), (6, 6)])
def test_random_cutout_fills_one_square(size, expected):
    x = torch.ones(64, 1, 28, 28)
    out = random_cutout(x, size, fill=0.0, generator=gen())
    holes = out[:, 0] == 0
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    for h in holes:
        ys, xs = h.nonzero().unbind(1)
        hh, ww = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert h.sum() == hh * ww  # a filled rectangle ...
        assert hh <= expected and ww <= expected  # ... at most size x size
    assert (holes.sum((1, 2)) == expected ** 2).any()  # unclipped holes are full squares
    assert torch.equal(random_cutout(x, 0, generator=gen()), x)


def test_strong_cutout_default_size_and_fill():
    x = torch.ones(32, 1, 28, 28)
    out = strong_augment(x, pad=0, flip=False, ops=("Identity",), generator=gen())
    holes = out[:, 0] == 0.5
    assert holes.sum((1, 2)).max() == 14 * 14
    out0 = strong_augment(x, pad=0, flip=False, ops=("Identity",), cutout=0, generator=gen())
    assert torch.equal(out0, x)


@pytest.mark.parametrize("op", RANDAUG_OPS)
@pytest.mark.parametrize("C", [1, 3])
def test_each_op_runs(op, C):
    x = torch.rand(6, C, 16, 16)
    out = strong_augment(x, pad=0, flip=False, cutout=0, ops=(op,), generator=gen())
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    if op == "Identity" or (op == "Color" and C == 1):
        assert torch.equal(out, x)


def test_unknown_op_rejected():
    with pytest.raises(ValueError, match="Blur"):
        strong_augment(torch.rand(2, 1, 16, 16), ops=("Blur",))


def test_equalize_flattens_histogram():
    x = torch.rand(2, 1, 32, 32) ** 4  # dark, skewed
    out = A._equalize(x, torch.ones(2), torch.ones(2))
    assert (out.mean() - 0.5).abs() < 0.05 and x.mean() < 0.3
