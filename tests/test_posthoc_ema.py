"""Post-hoc EMA (Karras et al. 2024): the power-function profiles, their closed-form inner products,
the least-squares reconstruction, and the trainer's snapshots (exact across a resume)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from unifusion import cli, models
from unifusion import config as C
from unifusion.training import ema as E
from unifusion.training import loop as L

from .test_training import TINY


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_sigma_rel_and_gamma_are_inverse(sigma_rel):
    assert math.isclose(E.gamma_to_sigma_rel(E.sigma_rel_to_gamma(sigma_rel)), sigma_rel, rel_tol=1e-10)


def test_the_profile_std_is_sigma_rel_and_the_inner_products_match_quadrature():
    tau = np.linspace(0, 1, 400001)

    def p(t, g):
        return np.where(tau <= t, (g + 1) * np.clip(tau, 0, None) ** g / t ** (g + 1), 0.0)
    for s in (0.05, 0.1, 0.2):
        g = E.sigma_rel_to_gamma(s)
        w = p(1.0, g)
        mean = np.trapezoid(w * tau, tau)
        assert math.isclose(math.sqrt(np.trapezoid(w * tau**2, tau) - mean**2), s, rel_tol=1e-4)
    for (t1, g1), (t2, g2) in [((0.6, 3.0), (1.0, 7.0)), ((1.0, 16.9), (0.9, 16.9)), ((0.3, 1.5), (0.8, 0.5))]:
        numeric = np.trapezoid(p(t1, g1) * p(t2, g2), tau)
        assert math.isclose(float(E._profile_dot(t1, g1, t2, g2)), numeric, rel_tol=1e-3)


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


def test_an_untracked_length_is_reconstructed_from_two_tracked_ones():
    """Weights following a known trajectory: the EMA of a third length, tracked directly, against
    its reconstruction from snapshots of the two tracked lengths every 25 steps."""
    net = Scalar()
    tracked, third = E.PowerEMA(net, (0.05, 0.10)), E.PowerEMA(net, (0.075,))
    snaps = []
    for k in range(1, 1001):
        with torch.no_grad():
            net.w.copy_(torch.tensor([math.sin(k / 80), k / 1000, math.cos(k / 300) ** 2]))
        tracked.update(net)
        third.update(net)
        if k % 25 == 0:
            tensors, meta = tracked.snapshot()
            snaps.append((int(meta["step"]), tracked.gammas, {n: t.clone() for n, t in tensors.items()}))
    weights, info = E.reconstruct(snaps, 0.075)
    direct = third.shadows[0]["w"]
    assert info["profile_error"] < 0.01
    assert float((weights["w"] - direct).abs().max()) < 5e-3
    # and a tracked length at the last snapshot is that snapshot itself
    again, info = E.reconstruct(snaps, 0.10)
    assert info["profile_error"] < 1e-6
    torch.testing.assert_close(again["w"], tracked.shadows[1]["w"], rtol=1e-4, atol=1e-6)


def _cfg(tmp_path, **kw):
    return C.from_dict({**TINY, "steps": 40, "checkpoint_every": 20, "posthoc_every": 10, "out": str(tmp_path / "run"),
                        **kw})


def test_a_run_records_snapshots_and_a_tracked_profile_reconstructs_to_1e_4(tmp_path):
    res = L.train(_cfg(tmp_path), progress=False)
    snaps = E.read_snapshots(tmp_path / "run" / "posthoc")
    assert [s[0] for s in snaps] == [10, 20, 30, 40]
    out = tmp_path / "ema"
    assert cli.main(["ema", "--checkpoint", res["out"], "--std", "0.05,0.10", "--out", str(out)]) == 0
    for i, std in enumerate((0.05, 0.10)):
        model = models.load(out / f"std-{std:.3f}")
        tracked = {k[len(f"{i}/"):]: v for k, v in snaps[-1][2].items() if k.startswith(f"{i}/")}
        for name, t in model.state_dict().items():
            if name in tracked:
                torch.testing.assert_close(t, tracked[name], rtol=1e-4, atol=1e-4 * float(tracked[name].abs().max()))
        assert model.sample(seeds=[0, 1], nfe=4).shape == (2, 2)


def test_snapshots_are_identical_after_a_resume(tmp_path):
    """A run killed after step 30 (its last checkpoint at 20, snapshot 30 already written, here
    garbled): the resumed run writes snapshots 30 and 40 equal to an uninterrupted run's."""
    import shutil
    L.train(_cfg(tmp_path / "a"), progress=False)
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-00000040")
    shutil.rmtree(b / "model")
    (b / "posthoc" / "step-00000040.safetensors").unlink()
    (b / "posthoc" / "step-00000030.safetensors").write_bytes(b"garbled by the kill")
    L.train(_cfg(tmp_path / "b", resume=True), progress=False)
    sa, sb = (E.read_snapshots(d / "posthoc") for d in (a, b))
    assert [s[0] for s in sa] == [s[0] for s in sb] == [10, 20, 30, 40]
    for (_, _, ta), (_, _, tb) in zip(sa, sb):
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


def test_bad_requests_get_one_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="--posthoc-stds"):
        C.from_dict({"posthoc_stds": "0.05,0.5"})
    L.train(_cfg(tmp_path, posthoc_every=0, steps=4, checkpoint_every=4), progress=False)
    assert cli.main(["ema", "--checkpoint", str(tmp_path / "run"), "--std", "0.1"]) == 2
    assert "--posthoc-every" in capsys.readouterr().err
    L.train(_cfg(tmp_path / "b"), progress=False)
    assert cli.main(["ema", "--checkpoint", str(tmp_path / "b" / "run"), "--std", "0.1,0.01"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reconstructed" in err and "stds in about [" in err
    assert not (tmp_path / "b" / "run" / "posthoc-ema").exists()  # nothing written when one std fails
