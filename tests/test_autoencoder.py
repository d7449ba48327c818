"""The autoencoder family (models/autoencoder.py): shapes, the KL term, the discriminator's
warm-up and gradient separation, exact resume, latent statistics, the diffusers wrapper,
check_autoencoder, PSNR / SSIM, and `unifusion autoencoder train` + `unifusion eval` end to end."""
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from unifusion import cli, models, networks, safeio
from unifusion import config as C
from unifusion import data as datasets
from unifusion.evaluation.reconstruction import psnr, reconstruction_report, ssim
from unifusion.models.autoencoder import (
    check_autoencoder,
    load_autoencoder,
    measure_latent_statistics,
    write_latent_statistics,
)
from unifusion import checkpoint
from unifusion.training import loop as L

TINY_NET = {"base_channels": 8, "ch_mult": [1, 2]}  # f = 2 on 8x8 digits


def ae_cfg(tmp_path, **kw):
    return C.from_dict({"family": "autoencoder", "data": "digits-train", "network_args": TINY_NET, "steps": 4,
                        "batch_size": 16, "checkpoint_every": 2, "sample_every": 0, "log_every": 1,
                        "warmup_steps": 1, "lr": 2e-3, "out": str(tmp_path / "ae"), **kw})


def tiny_model(**kw) -> models.AutoencoderModel:
    cfg = ae_cfg(Path("/nonexistent"), **kw)
    torch.manual_seed(0)
    return models.build(C.model_spec(cfg, datasets.load("digits-train")))


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits-train")


# ------------------------------------------------------------------ networks
@pytest.mark.parametrize("preset,f", [("ae-f4", 4), ("ae-f8", 8)])
@pytest.mark.parametrize("c", [3, 4, 8])
def test_encoder_decoder_shapes(preset, f, c):
    net = networks.build(preset, latent_channels=c, base_channels=8)
    x = torch.randn(2, 3, 32, 32)
    mean, logvar = net.encode(x)
    assert net.factor == f
    assert mean.shape == logvar.shape == (2, c, 32 // f, 32 // f)
    assert net.decode(mean).shape == x.shape
    assert logvar.min() >= -30 and logvar.max() <= 20
    desc = networks.describe(preset)
    assert set(desc["kwargs"]) == {"image_channels", "base_channels", "ch_mult", "num_res_blocks", "latent_channels",
                                   "mid_attention", "dropout"}


def test_patch_discriminator_patch_map_for_each_size():
    from unifusion.networks.autoencoder import PatchDiscriminator, discriminator_layers
    for size, layers in ((8, 1), (16, 2), (32, 3), (64, 3)):
        assert discriminator_layers(size) == layers
        d = PatchDiscriminator(3, 8, layers)
        out = d(torch.randn(2, 3, size, size))
        assert out.shape == (2, 1, size // 2 ** layers - 2, size // 2 ** layers - 2)


# ------------------------------------------------------------------ the loss
def test_kl_term_is_the_closed_form_per_pixel(digits, monkeypatch):
    model = tiny_model()
    x = digits.batch(list(range(3)))["x0"]
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    monkeypatch.setattr(model.net, "encode", lambda _: (mean, logvar))
    kl = model.terms({"x0": x}, torch.Generator().manual_seed(1))["kl"]
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1) / 64
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-6)
    # the loss is rec + kl_weight * kl (no perceptual, no discriminator here)
    t = model.terms({"x0": x, "eps": torch.zeros(3, 4, 4, 4)})
    loss = model({"x0": x, "eps": torch.zeros(3, 4, 4, 4)})
    torch.testing.assert_close(loss, t["rec"] + 1e-6 * t["kl"])
    torch.testing.assert_close(t["rec"], (model.net.decode(mean) - x).abs().flatten(1).mean(1))


def test_the_perceptual_term_enters_the_loss_with_its_weight(digits):
    from unifusion.perceptual import perceptual_distance
    model = tiny_model(perceptual_weight=0.5)
    batch = {**digits.batch(list(range(4))), "eps": torch.randn(4, 4, 4, 4)}
    t = model.terms(batch)
    torch.testing.assert_close(t["perceptual"], perceptual_distance(batch["x0"], t["x_rec"]))
    assert (t["perceptual"] > 0).all()
    torch.testing.assert_close(model(batch), t["rec"] + 1e-6 * t["kl"] + 0.5 * t["perceptual"])
    model(batch).sum().backward()
    assert model.net.decoder.conv_out.weight.grad.any()


def test_training_lowers_the_reconstruction_loss(digits):
    model = tiny_model(kl_weight=1e-4, rec_loss="l2")
    batch = digits.batch(list(range(64)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    eps = {"eps": torch.zeros(64, 4, 4, 4)}
    with torch.no_grad():
        before = model.terms({**batch, **eps})["rec"].mean()
    for step in range(30):
        loss = model({**batch}, torch.Generator().manual_seed(step)).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model.terms({**batch, **eps})["rec"].mean()
    assert after < 0.6 * before, (before, after)


def test_discriminator_is_off_before_disc_start_and_on_after(digits):
    model = tiny_model(disc_weight=0.5, disc_start=2).train()
    batch = {**digits.batch(list(range(4))), "eps": torch.randn(4, 4, 4, 4)}
    with torch.no_grad():  # no training pass: the counter stays
        model(batch)
    assert int(model.passes) == 0
    adv = []
    for _ in range(3):
        t = model.terms(batch)
        adv.append(t["adversarial"].detach())
        assert (t["gen"] != 0).all() and (t["disc"] > 0).all()  # computed from the start
    assert int(model.passes) == 3
    assert torch.equal(adv[0], torch.zeros(4)) and torch.equal(adv[1], torch.zeros(4))
    assert (adv[2] != 0).all()
    torch.testing.assert_close(adv[2], 0.5 * t["gen"].detach() + t["disc"].detach())


def test_adversarial_gradients_stay_on_their_side(digits):
    model = tiny_model(disc_weight=1.0, disc_start=0).train()
    batch = {**digits.batch(list(range(4))), "eps": torch.randn(4, 4, 4, 4)}
    t = model.terms(batch)
    t["gen"].sum().backward(retain_graph=True)
    assert all(p.grad is None or not p.grad.any() for p in model.disc.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.net.decoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.net.encoder.parameters())
    model.zero_grad(set_to_none=True)
    t["disc"].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.net.parameters())
    assert all(p.grad is not None for p in model.disc.parameters())
    assert any(p.grad.any() for p in model.disc.parameters())


def test_a_run_resumed_after_a_kill_equals_the_uninterrupted_one(tmp_path):
    """With the discriminator switching on at step 3 of 4: the resumed run (from the step-2
    checkpoint) ends with the uninterrupted run's weights, EMA, optimizer state and pass count."""
    cfg = ae_cfg(tmp_path / "a", disc_weight=0.5, disc_start=3)
    L.train(cfg, progress=False)
    a, b = tmp_path / "a" / "ae", tmp_path / "b" / "ae"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-00000004")
    shutil.rmtree(b / "model")
    L.train(C.from_dict({**cfg.to_dict(), "out": str(b), "resume": True}), progress=False)
    ta, tb = checkpoint.load(a)[0], checkpoint.load(b)[0]
    assert int(ta["model"]["passes"]) == 4
    for group in ("model", "ema", "optimizer"):
        for k in ta[group]:
            assert torch.equal(ta[group][k], tb[group][k]), (group, k)


# ------------------------------------------------------------------ latent statistics and loading
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (2 steps) whose model folder has latent statistics of 512 images."""
    out = tmp_path_factory.mktemp("trained")
    res = L.train(ae_cfg(out, steps=2), progress=False)
    write_latent_statistics(res["model"], n=512, progress=False)
    return res


def test_normalised_latents_have_std_sigma_data_and_mean_zero(trained, digits):
    ae = load_autoencoder(trained["out"])  # a finished run: its model folder
    stats = ae.spec.training["latent"]
    assert stats["n"] == 512 and stats["sigma_data"] == 0.5
    torch.testing.assert_close(torch.tensor(stats["scale"]), 0.5 / torch.tensor(stats["std"]))
    mean = ae.encode_posterior(digits.x)[0]  # all 1500 training images, 512 of which were measured
    zn = ae.normalize(mean).transpose(0, 1).flatten(1)  # (c, N h w)
    torch.testing.assert_close(zn.std(1), torch.full((4,), 0.5), rtol=0.1, atol=0)
    assert zn.mean(1).abs().max() < 0.1
    torch.testing.assert_close(ae.denormalize(ae.normalize(mean)), mean, rtol=1e-5, atol=1e-5)
    # measured on every image, the convention gives exactly sigma_data and 0
    exact = measure_latent_statistics(ae, digits, n=len(digits), progress=False)
    shift, scale = (torch.tensor(exact[k], dtype=torch.float32)[None, :, None, None] for k in ("shift", "scale"))
    z = ((mean - shift) * scale).transpose(0, 1).flatten(1)
    torch.testing.assert_close(z.std(1, unbiased=False), torch.full((4,), 0.5), rtol=1e-4, atol=0)
    assert z.mean(1).abs().max() < 1e-4
    assert ae.latent_shape((1, 8, 8)) == (4, 4, 4)


def test_the_autoencoder_object(trained, digits):
    ae = load_autoencoder(trained["model"])
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    d = ae.describe()
    folder = trained["model"]
    assert d["kind"] == "unifusion" and d["path"] == str(Path(folder).resolve())
    assert d["digest"] == hashlib.sha256(Path(folder, "ema.safetensors").read_bytes()).hexdigest()
    assert (d["factor"], d["latent_channels"], d["image_channels"], d["image_size"]) == (2, 4, 1, 8)
    assert json.loads(json.dumps(d)) == d
    x = digits.x[:5]
    mean, std = ae.encode_posterior(x)
    assert mean.shape == std.shape == (5, 4, 4, 4) and (std > 0).all()
    assert ae.decode_raw(mean).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="takes images \\(N, 1, H, W\\)"):
        ae.encode_posterior(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="trained on 8x8 images and takes no other size"):
        ae.encode_posterior(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="decodes latents \\(N, 4, h, w\\)"):
        ae.decode_raw(torch.zeros(2, 3, 4, 4))


def test_check_autoencoder_refuses_another_autoencoder(trained):
    ae = load_autoencoder(trained["model"])
    rec = ae.describe()
    check_autoencoder(ae, rec)
    with pytest.raises(ValueError, match="were encoded with autoencoder /elsewhere \\(digest 0123456789abcdef\\).*"
                                         "re-encode with `unifusion encode` or pass the original"):
        check_autoencoder(ae, {**rec, "path": "/elsewhere", "digest": "0123456789abcdef" * 4})
    with pytest.raises(ValueError, match="latent channels 8"):
        check_autoencoder(ae, {**rec, "latent_channels": 8})
    with pytest.raises(ValueError, match="factor 8"):
        check_autoencoder(ae, {**rec, "factor": 8})
    with pytest.raises(ValueError, match="normalised with the scale"):
        check_autoencoder(ae, {**rec, "scale": [2 * s for s in rec["scale"]]})


def test_loading_refuses_what_is_not_a_finished_autoencoder(trained, tmp_path):
    # a checkpoint mid-run has no latent statistics
    with pytest.raises(ValueError, match="has no latent statistics; run `unifusion autoencoder stats"):
        load_autoencoder(f"{trained['out']}/checkpoints/step-00000002")
    # a diffusion model
    cfg = C.from_dict({"data": "moons", "network": "mlp-2d", "network_args": {"hidden": 8}, "out": str(tmp_path)})
    spec = C.model_spec(cfg, datasets.load("moons"))
    models.save(models.build(spec), tmp_path / "dm")
    with pytest.raises(ValueError, match="dm is a diffusion model, not an autoencoder"):
        load_autoencoder(tmp_path / "dm")
    # --network of the wrong kind
    with pytest.raises(ValueError, match="autoencoder preset"):
        C.from_dict({"family": "autoencoder", "network": "unet-32"})
    with pytest.raises(ValueError, match="train it with --family autoencoder"):
        C.from_dict({"network": "ae-f4"})


def test_stats_for_a_checkpoint_writes_a_model_folder(trained, tmp_path):
    ckpt = f"{trained['out']}/checkpoints/step-00000002"
    write_latent_statistics(ckpt, out=tmp_path / "m", n=64, progress=False)
    ae = load_autoencoder(tmp_path / "m")
    assert ae.spec.training["latent"]["n"] == 64
    # the folder holds the raw and the EMA weights of the checkpoint
    tensors = checkpoint.load(ckpt)[0]
    w = safeio.read_safetensors(tmp_path / "m" / "weights.safetensors")
    for k, v in w.items():
        assert torch.equal(v, tensors["model"][k]), k


# ------------------------------------------------------------------ diffusers
@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                  sample_size=16, shift_factor=0.1, scaling_factor=0.5)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder, safe_serialization=True)
    return vae.eval(), folder


def test_a_diffusers_autoencoderkl_loads_and_matches_diffusers(tiny_vae):
    vae, folder = tiny_vae
    ae = load_autoencoder(folder)
    assert (ae.factor, ae.latent_channels, ae.image_channels, ae.image_size) == (2, 4, 3, None)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = ae.encode_posterior(x)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        torch.testing.assert_close(mean, dist.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(std, dist.std, rtol=0, atol=1e-5)
        torch.testing.assert_close(ae.decode_raw(mean), vae.decode(mean).sample, rtol=0, atol=1e-5)
    assert ae.encode_posterior(torch.zeros(1, 3, 24, 24))[0].shape == (1, 4, 12, 12)  # any size divisible by 2
    with pytest.raises(ValueError, match="multiples of 2"):
        ae.encode_posterior(torch.zeros(1, 3, 15, 15))
    d = ae.describe()
    assert d["kind"] == "diffusers" and d["digest"] == hashlib.sha256(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    assert d["shift"] == [0.1] * 4 and d["scale"] == [0.5] * 4
    torch.testing.assert_close(ae.normalize(mean), (mean - 0.1) * 0.5)
    check_autoencoder(ae, d)


def test_a_diffusers_folder_of_another_class_is_refused(tiny_vae, tmp_path, monkeypatch):
    _, folder = tiny_vae
    other = tmp_path / "unet"
    shutil.copytree(folder, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="holds a diffusers UNet2DModel, not an AutoencoderKL"):
        load_autoencoder(other)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # diffusers not installed
    with pytest.raises(ValueError, match="pip install 'unifusion\\[diffusers\\]'"):
        load_autoencoder(folder)


# ------------------------------------------------------------------ reconstruction scores
def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 1.6 - 0.8
    # an offset of 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, PSNR 20 dB
    torch.testing.assert_close(psnr(x, x + 0.2), torch.full((3,), 20.0, dtype=torch.float64))
    torch.testing.assert_close(ssim(x, x), torch.ones(3, dtype=torch.float64))
    # one 11x11 window: the weighted statistics written out directly
    a, b = torch.rand(1, 1, 11, 11, generator=g), torch.rand(1, 1, 11, 11, generator=g)
    r = torch.arange(11, dtype=torch.float64) - 5
    w = torch.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = (w[:, None] * w[None, :]) / w.sum() ** 2
    A, B = (a.double()[0, 0] + 1) / 2, (b.double()[0, 0] + 1) / 2
    ma, mb = (w * A).sum(), (w * B).sum()
    va, vb, cab = (w * (A - ma) ** 2).sum(), (w * (B - mb) ** 2).sum(), (w * (A - ma) * (B - mb)).sum()
    c1, c2 = 1e-4, 9e-4
    expected = (2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    torch.testing.assert_close(ssim(a, b)[0], expected)
    noisy = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (ssim(x, noisy) < 0.8).all() and (psnr(x, noisy) < psnr(x, x + 0.2)).all()


def test_reconstruction_report_of_a_perfect_autoencoder_is_perfect(digits):
    from unifusion.evaluation.features import digits_features

    class Identity(torch.nn.Module):
        factor, latent_channels = 1, 1

        def encode_posterior(self, x):
            return x, torch.zeros_like(x)

        def decode_raw(self, z):
            return z

    r = reconstruction_report(Identity(), digits.x[:200], extractor=digits_features())
    assert r["psnr"] == math.inf and r["ssim"] == pytest.approx(1.0) and abs(r["rfid"]) < 1e-6 and r["n"] == 200


# ------------------------------------------------------------------ the CLI end to end
def test_cli_train_then_eval(tmp_path, capsys):
    out = tmp_path / "ae"
    rc = cli.main(["autoencoder", "train", "--data", "digits-train", "--steps", "3", "--batch-size", "16",
                   "--network.base_channels", "8", "--network.ch_mult", "[1, 2]", "--sample-every", "2",
                   "--checkpoint-every", "2", "--disc-weight", "0.1", "--disc-start", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "latent statistics of 1500 images" in printed
    spec = json.loads((out / "model" / "spec.json").read_text())
    assert spec["family"] == "autoencoder" and len(spec["training"]["latent"]["scale"]) == 4
    assert (out / "samples" / "latest.png").is_file()
    assert cli.main(["eval", "--checkpoint", str(out / "model"), "--n", "100"]) == 0
    printed = capsys.readouterr().out
    assert "| psnr | ssim | rfid |" in printed and "held-out digits-test" in printed
    r = json.loads((out / "model" / "eval" / "eval.json").read_text())["reconstruction"]
    assert r["n"] == 100 and 0 < r["psnr"] < 60 and -1 < r["ssim"] <= 1 and r["rfid"] >= 0
    # stats again, for the run's checkpoint: a new model folder beside it
    assert cli.main(["autoencoder", "stats", "--checkpoint", str(out / "checkpoints" / "step-00000002"),
                     "--n", "32"]) == 0
    assert json.loads((out / "model-step-00000002" / "spec.json").read_text())["training"]["latent"]["n"] == 32
    # the autoencoder family cannot sample
    assert cli.main(["sample", "--checkpoint", str(out / "model"), "--out", str(tmp_path / "s.npz")]) == 2


def test_two_ranks_equal_one_rank_with_the_discriminator_on(tmp_path):
    """The posterior noise is drawn for the global batch (Model.random) and both GAN terms use every
    parameter from step 0, so 2 gloo ranks (8 examples each) end with 1 rank's weights (batch 16)."""
    import os
    import subprocess

    from .test_training import _cli, _torchrun
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kw = dict(data="digits-train", family="autoencoder", network="ae-f4", process="edm", parametrization="edm",
              noise_density="lognormal", batch_size=16, steps=3, checkpoint_every=3, disc_weight=0.5, disc_start=1,
              perceptual_weight=0.1, **{"network.base_channels": 8, "network.ch_mult": "[1, 2]",
                                        "network.mid_attention": "false"})
    from .test_training import _train_args
    for name, cmd in {"one": _cli("train", *_train_args(tmp_path / "one", **kw)),
                      "two": _torchrun(2, tmp_path / "two", **kw)}.items():
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    one, two = (checkpoint.load(tmp_path / n)[0]["model"] for n in ("one", "two"))
    assert any(k.startswith("disc") for k in one)  # the discriminator is part of what must agree
    for k in one:
        # the discriminator's bias-free convolutions feed a GroupNorm, which is invariant to their
        # per-group scale and shift: those gradient components are round-off sized, and Adam's
        # normalised update magnifies round-off differences there (measured ~2e-3 of the weights' size)
        tol = 5e-3 * float(one[k].abs().max()) if k.startswith("disc.") else 1e-5
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=max(tol, 1e-5), msg=k)
