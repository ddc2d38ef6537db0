"""Tests for coreg_dist.models: registry, backbones and CoRegNetwork."""
import pytest
import torch
import torch.nn.functional as F

from coreg_dist.models import (
    CoRegNetwork,
    build_backbone,
    build_network,
    list_backbones,
    register_backbone,
    to_channels_last,
)

CASES = [(1, 28), (3, 32), (3, 64)]  # (in_channels, image_size)


pytestmark = pytest.mark.usefixtures("one_thread_seeded")


def test_registry_lists_backbones():
    assert {"preact_resnet18", "small_cnn"} <= set(list_backbones())


def test_unknown_backbone_error_names_it_and_known_ones():
    with pytest.raises(ValueError) as exc:
        build_network("resnet9000", num_classes=10, in_channels=3, image_size=32)
    msg = str(exc.value)
    assert "resnet9000" in msg and "preact_resnet18" in msg and "small_cnn" in msg


def test_register_backbone_conflict():
    with pytest.raises(ValueError):
        register_backbone("small_cnn")(torch.nn.Identity)


@pytest.mark.parametrize("backbone,feat_dim", [("preact_resnet18", 512), ("small_cnn", 256)])
@pytest.mark.parametrize("in_ch,size", CASES)
def test_output_shapes_and_unit_norm(backbone, feat_dim, in_ch, size):
    net = build_network(backbone, num_classes=7, in_channels=in_ch, image_size=size, proj_dim=16)
    assert net.feat_dim == feat_dim
    x = torch.rand(2, in_ch, size, size)
    assert net.backbone(x).shape == (2, feat_dim)
    logits = net(x)
    assert logits.shape == (2, 7)
    logits2, z = net(x, with_proj=True)
    assert z.shape == (2, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(logits, logits2)


@pytest.mark.parametrize("size,stride,final", [(32, 1, 4), (64, 2, 4)])
def test_preact_first_stage_stride(size, stride, final):
    bb = build_backbone("preact_resnet18", in_channels=3, image_size=size)
    assert bb.first_stride == stride
    assert bb.layer1[0].conv1.stride == (stride, stride)
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        assert bb.layer1(bb.conv1(x)).shape[-1] == size // stride
        assert bb.forward_map(x).shape == (1, 512, final, final)


def test_small_cnn_min_size():
    build_backbone("small_cnn", in_channels=1, image_size=16)(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError):
        build_backbone("small_cnn", in_channels=1, image_size=8)


def test_normalisation_buffers():
    net = build_network("small_cnn", 3, in_channels=3, image_size=32, mean=[0.4, 0.5, 0.6], std=[0.2])
    assert net.mean.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])
    assert net.std.flatten().tolist() == pytest.approx([0.2] * 3)
    assert "mean" in net.state_dict() and "std" in net.state_dict()
    default = build_network("small_cnn", 3, in_channels=1, image_size=28)
    assert default.mean.item() == 0.5 and default.std.item() == 0.5
    with pytest.raises(ValueError):
        build_network("small_cnn", 3, in_channels=3, image_size=32, mean=[0.1, 0.2])


def test_different_seeds_different_init():
    torch.manual_seed(1)
    a = build_network("small_cnn", 10, 1, 28)
    torch.manual_seed(2)
    b = build_network("small_cnn", 10, 1, 28)
    torch.manual_seed(1)
    c = build_network("small_cnn", 10, 1, 28)
    wa, wb, wc = (n.backbone.features[0].weight for n in (a, b, c))
    assert not torch.equal(wa, wb)
    assert torch.equal(wa, wc)


@pytest.mark.parametrize("backbone", ["small_cnn", "preact_resnet18"])
def test_backward_produces_grads(backbone):
    net = build_network(backbone, 5, in_channels=1, image_size=28)
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 5, (4,))
    logits, z = net(x, with_proj=True)
    (F.cross_entropy(logits, y) + z.sum()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("backbone", ["small_cnn", "preact_resnet18"])
def test_bf16_autocast_forward(backbone):
    net = build_network(backbone, 5, in_channels=3, image_size=16).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, z = net(x, with_proj=True)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 5)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    assert torch.isfinite(logits.float()).all()
    assert (logits.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


@pytest.mark.parametrize("backbone", ["small_cnn", "preact_resnet18"])
def test_channels_last_same_logits(backbone):
    net = build_network(backbone, 5, in_channels=3, image_size=32).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref, zref = net(x, with_proj=True)
        to_channels_last(net)
        assert net.channels_last
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        out, z = net(x, with_proj=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z, zref, rtol=1e-4, atol=1e-4)


def test_module_to_device_moves_buffers():
    net = build_network("small_cnn", 5, in_channels=1, image_size=28).to(torch.float64)
    assert net.mean.dtype == torch.float64
    assert net(torch.rand(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64
    assert isinstance(net, CoRegNetwork)


@pytest.mark.parametrize("size,final", [(16, 2), (28, 4), (32, 4)])
def test_small_cnn_map_size(size, final):
    bb = build_backbone("small_cnn", in_channels=1, image_size=size)
    with torch.no_grad():
        assert bb.forward_map(torch.rand(1, 1, size, size)).shape == (1, 128, final, final)


def test_small_cnn_fits_a_batch():
    # Sanity check that the network is trainable: it memorises a tiny batch.
    net = build_network("small_cnn", 4, in_channels=1, image_size=16)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(16, 1, 16, 16), torch.arange(16) % 4
    first = None
    for _ in range(30):
        loss = F.cross_entropy(net(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
