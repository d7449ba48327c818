"""The perceptual distance: zero on identical images, growing with the noise, differentiable,
frozen, and refused for images no shipped network was trained on."""
import pytest
import torch

from unifusion import data
from unifusion.perceptual import perceptual_distance

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n=16):
    return data.digits("test").x[:n]


def _shapes(n=8, res=32):
    return data.load(f"shapes-{res}-test:{n}").arrays()[0]


@pytest.mark.parametrize("images", [_digits, _shapes, lambda: _shapes(4, 64)], ids=["digits", "shapes32", "shapes64"])
def test_zero_on_identical_and_growing_with_noise(images):
    x = images()
    assert torch.equal(perceptual_distance(x, x.clone()), torch.zeros(len(x)))
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x.shape, generator=g)
    d = torch.stack([perceptual_distance(x, x + s * eps) for s in (0.02, 0.1, 0.3, 0.8)])  # (levels, B)
    assert (d > 0).all() and (d <= 4).all()
    assert (d[1:] > d[:-1]).all(), d  # monotone in the noise level, image by image


def test_symmetric_and_per_image():
    x = _digits(6)
    y = x.flip(0)
    d = perceptual_distance(x, y)
    assert d.shape == (6,)
    torch.testing.assert_close(d, perceptual_distance(y, x))
    torch.testing.assert_close(d[:3], perceptual_distance(x[:3], y[:3]))  # each row on its own


@pytest.mark.parametrize("images", [_digits, _shapes], ids=["digits", "shapes"])
def test_gradient_flows_to_x_and_the_network_is_frozen(images):
    y = images()
    x = (y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
    d = perceptual_distance(x, y)
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # a small step against the gradient lowers the distance
    with torch.no_grad():
        assert perceptual_distance(x - 1e-2 * x.grad / x.grad.abs().max(), y).sum() < d.sum()
    from unifusion import perceptual
    assert all(not p.requires_grad for body in perceptual._CACHE.values() for p in body.parameters())


def test_other_shapes_are_refused():
    for shape in [(4, 2), (4, 1, 16, 16), (4, 3, 8, 8), (4, 4, 32, 32), (4, 1, 28, 28)]:
        x = torch.zeros(shape)
        with pytest.raises(ValueError, match="no shipped feature network for images of shape .*use --distance l2"):
            perceptual_distance(x, x)
    with pytest.raises(ValueError, match="same shape"):
        perceptual_distance(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))
