"""uf.sample's per-evaluation bookkeeping: no host read per denoiser call, few extra kernels, and the
non-finite report still names the first bad sigma."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import unifusion as uf
from unifusion.samplers import grids, make_denoise
from tests.oracles import mixture_2d, noise

HOST_READS = ("item", "__bool__", "__float__", "__int__", "tolist")


class HostReads:
    """Counts calls of the Tensor methods that copy a value to the host (a sync on a GPU)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in HOST_READS:
            orig = getattr(torch.Tensor, name)

            def spy(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, spy)


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def free(x, sigma):
    return x * 0.5


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "unipc", "lms"])
def test_host_reads_do_not_grow_with_the_number_of_evaluations(monkeypatch, sampler):
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 80
    uf.sample(free, x0, sampler, nfe=4)  # warm-up outside the spy
    spy = HostReads(monkeypatch)
    counts = []
    for nfe in (4, 20):
        spy.count = 0
        uf.sample(free, x0, sampler, nfe=nfe)
        counts.append(spy.count)
    assert counts[0] == counts[1]  # the grid (made on the CPU), the noise check before, the sample's after


def test_check_finite_reads_once_per_evaluation(monkeypatch):
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * 80
    spy = HostReads(monkeypatch)
    uf.sample(free, x0, "euler", nfe=4)
    plain = spy.count
    spy.count = 0
    uf.sample(free, x0, "euler", nfe=4, check_finite=True)
    assert spy.count == plain + 4


def test_bookkeeping_adds_two_kernels_per_evaluation():
    """Per evaluation the wrapper runs the sigma tensor and one (min, max) reduction besides the solver's own
    work (a bare Euler loop makes the sigma tensor too, so the difference per evaluation is one op)."""
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 80

    def bare(n):
        sig = grids.make("karras", n, 0.002, 80.0).tolist()
        x = x0
        for s, s_next in zip(sig[:-1], sig[1:]):
            x = torch.lerp(free(x, torch.full((1,), s)), x, s_next / s)
        return x

    extra = {}
    for n in (10, 30):
        with CountOps() as ours:
            uf.sample(free, x0, "euler", nfe=n)
        with CountOps() as theirs:
            bare(n)
        extra[n] = ours.ops - theirs.ops
    assert extra[30] - extra[10] == 20


def test_shape_is_checked_on_the_first_evaluation_only():
    D = make_denoise(lambda x, s: x[:, :1] if s[0] < 1 else x, 2)
    x = torch.zeros(2, 3)
    D(x, 2.0)
    assert D(x, 0.5).shape == (2, 1)  # not checked again
    with pytest.raises(ValueError, match="shaped like x"):
        make_denoise(lambda x, s: x[:, :1], 2)(x, 2.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_first_bad_sigma_is_named_for_nan_and_both_infinities(bad, dtype):
    """Bad at one band of sigmas only (finite before and after): the report names the band's first level."""
    gm = mixture_2d()
    sig = grids.karras(10, 0.002, 80.0)
    first_bad = float(sig[(sig < 5.0) & (sig > 1.0)][0])

    def D(x, s):
        out = gm.denoise(x.double(), s.double()).to(dtype)
        return torch.where(((s < 5.0) & (s > 1.0))[:, None], torch.full_like(out, bad), out)
    with pytest.warns(RuntimeWarning, match=f"first returned NaN or inf at sigma={first_bad:.6g}"):
        uf.sample(D, noise(2, 2).to(dtype), "euler", nfe=10)
    with pytest.raises(FloatingPointError, match=f"NaN or inf at sigma={first_bad:.6g}"):
        uf.sample(D, noise(2, 2).to(dtype), "euler", nfe=10, check_finite=True)


def test_one_bad_element_among_huge_finite_ones_is_found():
    """Finite values near the dtype's limit do not read as non-finite (no sum that could overflow)."""
    def D(x, s):
        out = torch.full_like(x, 3e38)
        if float(s[0]) < 1.0:
            out[0, 1] = math.nan
        return out
    sig = grids.karras(10, 0.002, 80.0)
    with pytest.warns(RuntimeWarning, match=f"at sigma={float(sig[sig < 1.0][0]):.6g}"):
        uf.sample(D, noise(2, 2).float(), "euler", nfe=10)


@pytest.mark.parametrize("first_bad", [0, 31, 32, 33, 70, 99])
def test_first_nonfinite_across_chunks(first_bad):
    D = make_denoise(lambda x, s: x * (math.nan if s[0] >= first_bad else 1.0), 2)
    for i in range(100):
        D(torch.ones(2, 3), float(i))
    assert D.first_nonfinite() == float(first_bad)
    assert make_denoise(lambda x, s: x, 2).first_nonfinite() is None
