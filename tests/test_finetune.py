"""Reward fine-tuning (training/finetune.py, rewards.py, training/lora.py): the three methods end
to end through the CLI on a tiny 2-D model, exact resume, 2 ranks == 1 rank, every bad input of
the issue (one line, exit 2, nothing written), non-finite rewards skipped and counted, the built-in
rewards (the tilted mixture against quadrature), the advantages, and LoRA's merge."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from unifusion import checkpoint, models, rewards
from unifusion import config as C
from unifusion import data as datasets
from unifusion.cli import main
from unifusion.training import finetune as FT
from unifusion.training import lora

from .test_text_to_image import encoder, t2i  # noqa: F401  (fixtures: a tiny text encoder and a text-to-image run)

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--reward", "quadratic", "--batch-size", "16", "--group-size", "4", "--nfe", "4", "--log-every", "1",
        "--checkpoint-every", "2"]


def _model(folder, **kw):
    """An untrained tiny flow-matching MLP on the 8-class gmm toy, saved as a model folder."""
    cfg = C.from_dict({"data": "gmm", "network": "mlp-2d", "network_args": {"hidden": 32, "depth": 2, "emb_dim": 32},
                       "process": "flow", "parametrization": "velocity", "noise_density": "uniform_t",
                       "out": str(folder), **kw})
    torch.manual_seed(0)
    model = models.build(C.model_spec(cfg, datasets.load(cfg.data)))
    return models.save(model, folder)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("toy") / "model")


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the three methods, end to end
@pytest.mark.parametrize("method, extra", [
    ("grpo", ["--kl-beta", "0.1", "--lora-rank", "2", "--ema-half-life", "100"]),
    ("ddpo", ["--inner-epochs", "2", "--timestep-fraction", "0.5"]),
    ("grpo", ["--kl-beta", "0.1", "--kl", "step", "--window", "2", "--micro-batch", "7", "--cfg", "1.5"]),
    ("draft", ["--sampler", "flow_sde", "--kl-beta", "0.1", "--draft-k", "2", "--lora-rank", "2"]),
])
def test_each_method_runs_and_writes_an_ordinary_model_folder(toy, tmp_path, method, extra):
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(toy), "--method", method, "--steps", "3", "--out", str(out),
                 *TINY, *extra]) == 0
    recs = _log(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(math.isfinite(r["reward"]) and r["skipped"] == 0 for r in recs)
    if "--kl-beta" in extra:
        assert all(r["kl"] >= 0 for r in recs)
    m = models.load(out / "model")  # the adapters merged into the network's own keys
    assert m.spec.training["finetuned"]["method"] == method
    assert main(["sample", "--checkpoint", str(out), "--nfe", "4", "--n", "4", "--out", str(tmp_path / "s.npz"),
                 "--sampler", "euler"]) == 0


def _tensors(out):
    return checkpoint.load(out)[0]


@pytest.mark.parametrize("method, extra", [
    ("grpo", ["--kl-beta", "0.1", "--lora-rank", "2", "--ema-half-life", "50", "--window", "2"]),
    ("draft", ["--sampler", "flow_sde", "--kl-beta", "0.05", "--draft-k", "2"]),
])
def test_resume_is_bit_identical(toy, tmp_path, method, extra):
    """4 steps at once == 2 steps, stop, `--out DIR --resume --steps 4` (weights, adapters, optimizer, EMA)."""
    args = ["--model", str(toy), "--method", method, *TINY, *extra]
    assert main(["finetune", *args, "--steps", "4", "--out", str(tmp_path / "one")]) == 0
    assert main(["finetune", *args, "--steps", "2", "--out", str(tmp_path / "two")]) == 0
    assert main(["finetune", "--out", str(tmp_path / "two"), "--resume", "--steps", "4"]) == 0
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    for group in a:
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), (group, k)
    assert [r["step"] for r in _log(tmp_path / "two")] == [1, 2, 3, 4]
    # a resumed run may not change what is learned
    assert main(["finetune", "--out", str(tmp_path / "two"), "--resume", "--steps", "5", "--lr", "1"]) == 2


def test_two_ranks_equal_one_rank(toy, tmp_path):
    """Same global batch of 16: 2 gloo ranks (8 trajectories each) vs 1 rank, grpo with the path KL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["finetune", "--model", str(toy), "--method", "grpo", "--kl-beta", "0.1", "--steps", "2", *TINY]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "unifusion", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=200, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _tensors(tmp_path / "one")["model"], _tensors(tmp_path / "two")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    ra, rb = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["reward"] for r in ra] == pytest.approx([r["reward"] for r in rb], rel=1e-5)


def test_a_few_step_student_with_its_consistency_sampler(tmp_path):
    cfg = C.from_dict({"data": "gmm", "network": "mlp-2d", "network_args": {"hidden": 32, "depth": 2, "emb_dim": 32},
                       "objective": "ict", "parametrization": "consistency", "out": str(tmp_path / "x")})
    torch.manual_seed(0)
    student = models.save(models.build(C.model_spec(cfg, datasets.load("gmm"))), tmp_path / "student")
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(student), "--sampler", "consistency", "--steps", "2", "--out", str(out),
                 *TINY, "--nfe", "3", "--kl-beta", "0.1"]) == 0
    assert models.load(out / "model").spec.family == "student"


def test_a_text_model_for_prompt_alignment(t2i, tmp_path):
    """Captions in, the shapes classifier's log p(size, colour, shape named by the caption) as the reward, CFG on."""
    out = tmp_path / "ft"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle\na small blue square\n")
    assert main(["finetune", "--model", str(t2i), "--reward", "classifier", "--reward-args", "{target: caption}",
                 "--prompts", str(prompts), "--cfg", "2", "--nfe", "3", "--batch-size", "4", "--group-size", "2",
                 "--steps", "1", "--lora-rank", "1", "--kl-beta", "0.1", "--out", str(out)]) == 0
    rec = _log(out)[0]
    assert rec["reward"] < 0 and rec["kl"] >= 0


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written
@pytest.fixture(scope="module")
def others(tmp_path_factory):
    d = tmp_path_factory.mktemp("others")
    cfg = C.from_dict({"family": "flow-realnvp", "data": "gmm", "out": str(d / "x")})
    torch.manual_seed(0)
    flow = models.save(models.build(C.model_spec(cfg, datasets.load("gmm"))), d / "realnvp")
    digits = C.from_dict({"data": "digits", "network_args": {"model_channels": 8}, "out": str(d / "x")})
    img = models.save(models.build(C.model_spec(digits, datasets.load("digits"))), d / "digits")
    return {"flow": flow, "digits": img}


@pytest.mark.parametrize("extra, match", [
    (["--reward", "tests.plugins.rewards:wrong_shape"], r"returned torch.float\d+ \(16, 1\)|\(2, 1\)"),
    (["--reward", "tests.plugins.rewards:all_nan"], "no finite value"),
    (["--sampler", "dpmpp_2m"], "is deterministic"),
    (["--sampler", "ddim", "--noise-level", "0"], "is deterministic"),
    (["--sampler", "pc"], "not single Gaussians"),
    (["--model", "{flow}"], "one inverse pass"),
    (["--reference", "{digits}", "--kl-beta", "0.1"], r"data shape \(1, 8, 8\)"),
    (["--method", "draft", "--reward", "tests.plugins.rewards:detached"], "not differentiable"),
    (["--method", "draft", "--reward", "compressibility"], "needs a model of images"),
    (["--reward", "nope"], "neither a built-in"),
    (["--reward", "tests.plugins.nothere:f"], "cannot import"),
    (["--reward-args", "{scale: -1}"], "scale must be > 0"),
    (["--window", "9"], "longer than"),
    (["--lr", "0"], "--lr must be"),
    (["--grid", "karas"], "grid 'karas'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(toy, others, tmp_path, capsys, extra, match):
    out = tmp_path / "ft"
    extra = [str(others[e[1:-1]]) if e in ("{flow}", "{digits}") else e for e in extra]
    base = ["--model", str(toy), "--steps", "2", *TINY]
    rc = main(["finetune", *base, *extra, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("unifusion: error:"), err
    import re
    assert re.search(match, err), err
    assert not out.exists()


def test_non_finite_rewards_are_skipped_and_counted(toy, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(toy), "--steps", "3", "--out", str(out), *TINY,
                 "--reward", "tests.plugins.rewards:some_nan"]) == 0
    recs = _log(out)
    assert sum(r["bad_rewards"] for r in recs) > 0 and recs[-1]["bad_rewards_total"] == sum(r["bad_rewards"] for r in recs)
    assert all(math.isfinite(r["reward"]) and r["skipped"] == 0 for r in recs)
    assert torch.isfinite(torch.cat([v.flatten() for v in _tensors(out)["model"].values()])).all()


def test_options_reach_a_user_reward(toy, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(toy), "--steps", "1", "--out", str(out), *TINY,
                 "--reward", "tests.plugins.rewards:first_coordinate", "--reward-args", "{factor: 0.0}",
                 "--method", "draft"]) == 0
    assert _log(out)[0]["reward"] == 0.0


# ---------------------------------------------------------------- rewards
def test_the_tilted_mixture_is_p_ref_exp_r_over_beta():
    """Quadrature on a fine 2-D grid of p(x) exp(r(x) / beta) against the closed-form tilted mixture:
    normaliser, mean and covariance."""
    from unifusion.evaluation.mixture import GaussianMixture
    gm = GaussianMixture.random(2, 3, seed=1, spread=1.0, scale=0.5)
    covs = gm.U @ torch.diag_embed(gm.lam) @ gm.U.transpose(1, 2)
    r = rewards.Quadratic(torch.tensor([0.4, -0.2]), 0.7)
    beta = 0.6
    w, mu, S = r.tilt(gm.weights, gm.means, covs, beta)
    tilted = GaussianMixture(w, mu, S)
    u = torch.linspace(-5, 5, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    dens = (gm.log_prob(grid) + r(grid) / beta).exp()
    dens = dens / dens.sum()
    mean = (dens[:, None] * grid).sum(0)
    cov = (dens[:, None, None] * (grid - mean)[:, :, None] * (grid - mean)[:, None, :]).sum(0)
    x, _ = tilted.sample(200_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.01, rtol=0)
    p_star = (gm.log_prob(grid) + r(grid) / beta)
    p_star = p_star - torch.logsumexp(p_star, 0)
    ref = tilted.log_prob(grid) + math.log((u[1] - u[0]) ** 2)
    torch.testing.assert_close(p_star[dens > 1e-6], ref[dens > 1e-6], atol=1e-4, rtol=0)


def _spec(shape, kind="none", classes=0):
    cond = {"kind": kind, **({"num_classes": classes} if classes else {})}
    return SimpleNamespace(data={"kind": "pixel", "shape": list(shape)}, conditioning=cond, num_classes=classes)


def test_classifier_reward_is_the_classifier_log_probability():
    from unifusion.networks.classifiers import load_digits_classifier
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    y = torch.tensor([0, 3, 3, 9, 1])
    net = load_digits_classifier()[0]
    lp = net.logits(x).log_softmax(1)
    r = rewards.load("classifier", _spec((1, 8, 8), "class", 10))
    torch.testing.assert_close(r(x, {"y": y}), lp[torch.arange(5), y])
    three = rewards.load("classifier", _spec((1, 8, 8)), {"target": 3})
    xg = x.clone().requires_grad_(True)
    val = three(xg, None)
    torch.testing.assert_close(val.detach(), lp[:, 3])
    val.sum().backward()
    assert xg.grad.abs().sum() > 0 and three.differentiable
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        rewards.load("classifier", _spec((1, 8, 8)))
    with pytest.raises(ValueError, match="no shipped classifier"):
        rewards.load("classifier", _spec((2,)), {"target": 1})


def test_shapes_targets_and_captions():
    from unifusion.networks.classifiers import load_shapes_classifier
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    heads = {k: v.log_softmax(1) for k, v in load_shapes_classifier()[0].logits(x).items()}
    red_circle = rewards.load("classifier", _spec((3, 32, 32)), {"target": "colour=red,shape=circle"})
    torch.testing.assert_close(red_circle(x, None), heads["colour"][:, 0] + heads["shape"][:, 0])
    text = rewards.load("classifier", _spec((3, 32, 32), "text"), {"target": "caption"})
    caps = ["a large blue square left of a small red circle", "a small white triangle", "a circle"]
    want = torch.stack([heads["size"][0, 1] + heads["colour"][0, 2] + heads["shape"][0, 1],
                        heads["size"][1, 0] + heads["colour"][1, 7] + heads["shape"][1, 2], heads["shape"][2, 0]])
    torch.testing.assert_close(text(x, {"caption": caps}), want)
    with pytest.raises(ValueError, match="head=value"):
        rewards.load("classifier", _spec((3, 32, 32)), {"target": "colour=pink"})


def test_compressibility_prefers_flat_images():
    r = rewards.load("compressibility", _spec((1, 8, 8)))
    flat, noisy = torch.zeros(2, 1, 8, 8), torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a, b = r(flat, None), r(noisy, None)
    assert a.shape == (2,) and (a < 0).all() and (a > b).all()
    png = rewards.load("incompressibility", _spec((3, 16, 16)), {"format": "png"})
    assert (png(torch.rand(2, 3, 16, 16) * 2 - 1, None) > 0).all() and not png.differentiable


# ---------------------------------------------------------------- advantages
def _cfg(**kw):
    return FT.FinetuneConfig(model="m", reward="r", **kw).validate()


def test_group_advantages_are_standardised_within_each_group():
    cfg = _cfg(method="grpo", adv_clip=0)
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, scale = FT.advantages(r, group, cfg, 2)
    for g in (0, 1):
        a = adv[group == g, 0]
        assert float(a.mean()) == pytest.approx(0, abs=1e-6) and float(a.std(unbiased=False)) == pytest.approx(1)
    assert torch.equal(adv[:, 0], adv[:, 1])
    assert scale[0] == pytest.approx(1 / float(r[:3].std(unbiased=False)))
    # the KL to go is a cost in reward units, divided by the same std
    kl = torch.tensor([[1.0, 0.0]] * 6)
    adv2, _ = FT.advantages(r, group, _cfg(method="grpo", adv_clip=0, kl_beta=0.5), 2, kl)
    torch.testing.assert_close(adv2, adv)  # a constant KL to go moves every return alike: the baseline takes it
    kl[0, 0] = 3.0
    adv3, _ = FT.advantages(r, group, _cfg(method="grpo", adv_clip=0, kl_beta=0.5), 2, kl)
    assert adv3[0, 0] < adv[0, 0] and torch.equal(adv3[3:], adv[3:])


def test_ddpo_rare_conditions_use_the_batch_and_nan_rows_are_dropped():
    cfg = _cfg(method="ddpo", min_count=3, adv_clip=0, normalize="group")
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), 5.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    adv, _ = FT.advantages(r, group, cfg, 1)
    assert adv[4, 0] == 0
    finite = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    torch.testing.assert_close(adv[[3, 5], 0], ((torch.tensor([4.0, 5.0]) - finite.mean()) / finite.std(unbiased=False)).float())
    assert float(adv[:3, 0].mean()) == pytest.approx(0, abs=1e-6)


# ---------------------------------------------------------------- LoRA
def test_lora_starts_as_the_network_and_merges_into_its_own_keys(toy):
    model = models.load(toy)
    x, s = torch.randn(6, 2), torch.rand(6) + 0.1
    y = {"y": torch.arange(6) % 8}
    before = model.denoise(x, s, **y).detach()
    names = lora.inject(model.net, 2, 4.0)
    assert names and all(not p.requires_grad for n, p in model.net.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(model.denoise(x, s, **y), before)
    with torch.no_grad():
        for m in lora.layers(model.net).values():
            m.lora_B.normal_()
    after = model.denoise(x, s, **y).detach()
    assert not torch.allclose(after, before)
    with lora.disabled(model.net):
        torch.testing.assert_close(model.denoise(x, s, **y), before)
    clean = models.load(toy)
    models.io.load_weights(clean, lora.merged_state_dict(model), "merged")
    torch.testing.assert_close(clean.denoise(x, s, **y), after, rtol=1e-5, atol=1e-5)
    ad = lora.Adapters(model)
    shifted = {f"params.{k}": v.detach() + 0.1 for k, v in ad.params.items()}
    models.io.load_weights(clean, lora.merged_state_dict(model, shifted), "merged")  # EMA values of A and B
