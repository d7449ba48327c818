"""The greedy level search of few-step sampling (evaluation/level_search.py): the optimum of a
synthetic metric and of exact Gaussian denoisers (where it is known in closed form), the stored
grid as the model's default, and one clear error per bad request."""
import math

import pytest
import torch

from unifusion import cli, models
from unifusion import config as C
from unifusion import data as datasets
from unifusion.evaluation import level_search as LS
from unifusion.training import loop as L

from .test_fewstep import RUN, _gaussian

pytestmark = pytest.mark.usefixtures("one_thread")


def test_greedy_search_finds_a_known_optimum_one_level_at_a_time():
    target = {1: 2.0, 2: 0.3}  # the best level i given the earlier ones

    def score(levels):
        return (math.log(levels[-1]) - math.log(target[len(levels) - 1])) ** 2
    levels, trials = LS.greedy_levels(score, math.inf, 3, 0.01, 100.0)
    assert levels[0] == math.inf and levels[1] > levels[2] > 0.01
    assert levels[1] == pytest.approx(2.0, rel=0.1) and levels[2] == pytest.approx(0.3, rel=0.1)
    assert {t["level"] for t in trials} == {1, 2} and all(0.01 * (1 - 1e-9) <= t["sigma"] <= 100 * (1 + 1e-9) for t in trials)
    assert all(t["sigma"] < levels[1] for t in trials if t["level"] == 2)  # below the level above
    # an optimum above the range: the best candidate is at its top, strictly below the first level
    levels, _ = LS.greedy_levels(lambda lv: -lv[-1], 80.0, 2, 0.002, 80.0)
    assert 40 < levels[1] < 80


def _flow_model(v=0.49):
    """A flow model on 2-D data whose denoiser is the exact one of data N(0, v I)."""
    spec = C.model_spec(C.from_dict({**RUN, "data": "moons"}), datasets.load("moons"))
    model = models.build(spec).eval()
    model.denoise = _gaussian(v)
    return model


def test_euler_on_an_exact_gaussian_denoiser_picks_the_data_scale():
    """Euler from sigma = inf at NFE 2 on data N(0, c^2): x = s c^2 / (c^2 + s^2) n, whose spread
    c^2 s / (c^2 + s^2) is largest (closest to c) at s = c: the searched level is c."""
    c = 0.7
    model = _flow_model(c * c)

    def spread_error(x, cond=None):
        return abs(float(x.std()) - c)
    cal = LS.search_levels(model, 2, metric=spread_error, sampler="euler", n=64)
    level = float(cal.sigmas[1])
    assert cal.sampler == "euler" and cal.nfe == 2 and math.isinf(cal.sigmas[0]) and cal.sigmas[-1] == 0
    assert level == pytest.approx(c, rel=0.05)
    assert model.spec.sigma_range()[0] <= level <= LS.INF_HIGH
    r = cal.reference
    assert r["score"] <= r["default_score"] and r["seeds"] == [LS.SEARCH_SEED, LS.SEARCH_SEED + 63]
    assert r["default_grid"] == model.spec.grid["name"] and cal.evaluations == len(r["trials"])


def test_consistency_sampling_on_an_exact_gaussian_denoiser_matches_the_closed_form():
    """Consistency sampling (any denoiser) from sigma_max S on N(0, c^2): one jump gives spread
    a = S c^2 / (c^2 + S^2); renoised to s and denoised, c^2 sqrt(a^2 + s^2) / (c^2 + s^2): the
    searched level is the s that brings it closest to c."""
    c, S = 0.7, 80.0
    spec = C.model_spec(C.from_dict({**RUN, "data": "moons", "process": "edm", "parametrization": "edm",
                                     "noise_density": "lognormal"}), datasets.load("moons"))
    model = models.build(spec).eval()
    model.denoise = _gaussian(c * c)
    assert model.spec.sigma_range()[1] == S
    a = S * c * c / (c * c + S * S)
    s = torch.logspace(-3, math.log10(S), 20001, dtype=torch.float64)[:-1]
    best = float(s[(c * c * (a * a + s * s).sqrt() / (c * c + s * s) - c).abs().argmin()])
    cal = LS.search_levels(model, 2, metric=lambda x, cond=None: abs(float(x.std()) - c), sampler="consistency", n=64)
    assert float(cal.sigmas[1]) == pytest.approx(best, rel=0.05)


def test_the_stored_levels_are_the_models_default_for_that_pair(tmp_path):
    model = _flow_model()
    folder = models.save(model, tmp_path / "model")
    cal = LS.search_levels(model, 2, metric=lambda x, cond=None: abs(float(x.std()) - 0.7), sampler="euler", n=32)
    LS.store(folder, cal)
    loaded = models.load(folder)
    assert LS.is_search(loaded.spec.calibration("euler", 2)) and loaded.spec.calibration("euler", 3) is None
    seen = []

    def spy(x, sigma, **c):
        seen.append(float(sigma[0]))
        return torch.zeros_like(x)
    loaded.denoise = spy
    loaded.sample(seeds=range(2), sampler="euler", nfe=2)
    assert seen[0] == math.inf and seen[1] == pytest.approx(float(cal.sigmas[1]), rel=1e-6)  # float32 sigma
    seen.clear()
    loaded.sample(seeds=range(2), sampler="euler", nfe=2, grid="uniform_t")  # a named grid wins
    assert seen[1] != pytest.approx(float(cal.sigmas[1]), rel=1e-3)


def test_each_bad_request_gets_one_clear_error(tmp_path, capsys):
    model = _flow_model()
    def metric(x, cond=None):
        return 0.0
    cases = [(dict(nfe=1), "needs NFE >= 2"), (dict(nfe=2, sampler="heun"), "one denoiser call per level"),
             (dict(nfe=11), "NFE <= 10"), (dict(nfe=2, low=5.0, high=1.0), "0 < low < high"),
             (dict(nfe=2, n=2), "n >= 4"), (dict(nfe=2, metric=None), "a metric or a reference")]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            LS.search_levels(model, **{"metric": metric, "sampler": "euler", **kw})

    class OnePass:
        one_pass, spec = True, type("S", (), {"family": "flow-glow"})()
    with pytest.raises(ValueError, match="a flow-glow model has no noise levels"):
        LS.check_model(OnePass(), "euler", 2)
    with pytest.raises(ValueError, match="give a model folder or a finished run"):
        LS.model_folder(tmp_path)
    # the command line: one line each, exit code 2, before anything is sampled
    run = L.train(C.from_dict({**RUN, "out": str(tmp_path / "run")}), progress=False)["out"]
    for extra, match in [(["--nfe", "1"], "needs NFE >= 2"), (["--sweep"], "drop --sweep"),
                         (["--grid", "karras"], "drop --grid"), (["--search-range", "3,1"], "0 < LOW < HIGH"),
                         (["--sampler", "dpmpp_2m"], "one denoiser call per level")]:
        argv = ["eval", "--checkpoint", run, "--n", "8", "--search-levels"] + extra
        argv += ([] if "--sampler" in extra else ["--sampler", "euler"]) + ([] if "--nfe" in extra else ["--nfe", "2"])
        assert cli.main(argv) == 2
        assert match in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", run, "--n", "8", "--search-range", "0.1,2"]) == 2
    assert "--search-range is for --search-levels" in capsys.readouterr().err
    ckpt = next((tmp_path / "run" / "checkpoints").iterdir())  # a checkpoint folder is no model folder
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--n", "8", "--search-levels", "--sampler", "euler",
                     "--nfe", "2"]) == 2
    assert "give a model folder or a finished run" in capsys.readouterr().err
