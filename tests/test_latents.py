"""Latent shards (`unifusion encode`, data/latents.py), training and sampling in latent space.

Most tests use `PoolAE`, a stand-in autoencoder with the interface of models.autoencoder (an
average-pool encoder mixing channels by a fixed matrix, a nearest-upsample decoder), so the
latents of an image are known in closed form; `load_autoencoder` is monkeypatched to hand it out
by path. The last test runs the whole path with a real (tiny, 2-step) KL autoencoder.
"""
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unifusion import cli, models
from unifusion import config as C
from unifusion import data as datasets
from unifusion.data.latents import LatentSource, encode_latents
from unifusion.models import autoencoder as A


class PoolAE(nn.Module):
    """z = W avgpool_f(x) (c latent channels from C image channels), std = 0.01; decode = nearest
    upsample of pinv(W) z. Normalisation: z_n = (z - shift) * scale per channel."""

    def __init__(self, path, image_channels=1, latent_channels=4, factor=2, image_size=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("W", torch.randn(latent_channels, image_channels, generator=g))
        self.path, self.factor, self.latent_channels = str(path), factor, latent_channels
        self.image_channels, self.image_size = image_channels, image_size
        self.shift = torch.linspace(-0.2, 0.3, latent_channels)
        self.scale = torch.linspace(1.5, 2.5, latent_channels)
        self.calls = 0

    @property
    def device(self):
        return self.W.device

    def encode_posterior(self, x):
        self.calls += 1
        if x.shape[1] != self.image_channels or (self.image_size and x.shape[-1] != self.image_size):
            raise ValueError(f"stand-in autoencoder takes ({self.image_channels}, {self.image_size}, ...) images")
        pooled = F.avg_pool2d(x, self.factor)
        mean = torch.einsum("kc,nchw->nkhw", self.W, pooled)
        return mean, torch.full_like(mean, 0.01)

    def decode_raw(self, z):
        if z.shape[1] != self.latent_channels:
            raise ValueError("stand-in autoencoder: wrong latent channel count")
        pooled = torch.einsum("ck,nkhw->nchw", torch.linalg.pinv(self.W), z.float())
        return F.interpolate(pooled, scale_factor=self.factor, mode="nearest")

    def normalize(self, z):
        return (z - self.shift.view(1, -1, 1, 1)) * self.scale.view(1, -1, 1, 1)

    def denormalize(self, zn):
        return zn / self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)

    def latent_shape(self, image_shape):
        _, h, w = image_shape
        return (self.latent_channels, h // self.factor, w // self.factor)

    def describe(self):
        digest = hashlib.sha256(self.W.numpy().tobytes()).hexdigest()
        return {"kind": "unifusion", "path": self.path, "digest": digest, "factor": self.factor,
                "latent_channels": self.latent_channels, "image_channels": self.image_channels,
                "image_size": self.image_size, "shift": self.shift.tolist(), "scale": self.scale.tolist()}


@pytest.fixture
def aes(monkeypatch, tmp_path):
    """path -> stand-in autoencoder; load_autoencoder(path) hands out the one registered there."""
    registry = {}

    def load(path, device="cpu"):
        key = str(path)
        if key not in registry:
            raise ValueError(f"no autoencoder at {path}")
        return registry[key].to(device)
    monkeypatch.setattr(A, "load_autoencoder", load)
    return registry


class Captioned(datasets.ArrayDataset):
    def captions(self, indices):
        return [f"digit {int(self.y[i])} ünïcode #{i}" if i % 7 else "" for i in indices]


def _digits(n=100):
    x, y = datasets.digits("train").arrays(n)
    return Captioned(x, y, 10, [str(k) for k in range(10)], source="digits-train", kind="image")


def _encode(main_args, capsys=None):
    code = cli.main(["encode", *map(str, main_args)])
    return code, (capsys.readouterr() if capsys else None)


# ------------------------------------------------------------------------------ write / read
def test_round_trip_values_labels_captions_and_memory_mapped_reads(tmp_path):
    ae, src = PoolAE(tmp_path / "ae"), _digits(100)
    index, written = encode_latents(ae, src, tmp_path / "lat", data="digits-train", per_shard=32, batch_size=12,
                                    progress=False)
    assert written == 4 and [s["count"] for s in index["shards"]] == [32, 32, 32, 4]
    lat = datasets.load(str(tmp_path / "lat"))
    assert isinstance(lat, LatentSource) and lat.kind == "latent" and len(lat) == 100
    assert lat.shape == (4, 4, 4) and lat.image_shape == (1, 8, 8) and lat.reference == ("digits-train", {})
    # the stored mean is (W avgpool(x) - shift) * scale, the std 0.01 * scale
    x, y = src.arrays()
    expected = ae.normalize(ae.encode_posterior(x)[0])
    for i in (0, 31, 32, 77, 99):
        torch.testing.assert_close(lat[i]["x0"], expected[i])
        assert int(lat[i]["cond"]["y"]) == int(y[i])
    _, std = lat.posterior(50)
    torch.testing.assert_close(std, 0.01 * ae.scale.view(-1, 1, 1).expand(4, 4, 4))
    xs, ys = lat.arrays(70)
    torch.testing.assert_close(xs, expected[:70])
    assert torch.equal(ys, y[:70])
    assert lat.captions([0, 1, 7, 99]) == src.captions([0, 1, 7, 99])
    # decoding the stored latents gives the pooled images back
    torch.testing.assert_close(ae.decode_raw(ae.denormalize(xs[:5])),
                               F.interpolate(F.avg_pool2d(x[:5], 2), scale_factor=2.0), atol=1e-5, rtol=1e-5)
    # memory-mapped: a fresh source holds no array data and opens only the shard it reads from
    fresh = LatentSource(tmp_path / "lat")

    def tensors(obj, seen=()):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)
    assert sum(t.numel() for t in tensors(vars(fresh))) == 0
    assert fresh._open == {}
    fresh[77]
    assert list(fresh._open) == [2]  # shard 2 holds items 64..95
    # the shards hold exactly the items 0..99 once each, with their source indices
    from safetensors.torch import load_file
    order = torch.cat([load_file(str(tmp_path / "lat" / s["file"]))["index"] for s in index["shards"]])
    assert torch.equal(order, torch.arange(100))


def test_interrupted_encode_resumes_to_identical_shards(tmp_path, aes, capsys):
    aes[str(tmp_path / "ae")] = PoolAE(tmp_path / "ae")
    np.savez(tmp_path / "d.npz", x=datasets.digits("train").x[:100].numpy(), y=datasets.digits("train").y[:100].numpy())
    args = ["--autoencoder", tmp_path / "ae", "--data", tmp_path / "d.npz", "--per-shard", 32, "--batch-size", 16]
    assert _encode([*args, "--out", tmp_path / "a"])[0] == 0
    # killed in the third shard's second batch (the sixth autoencoder call)
    ae = aes[str(tmp_path / "ae")]
    real, calls = PoolAE.encode_posterior, {"n": 0}

    def dying(self, x):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, x)
    PoolAE.encode_posterior = dying
    try:
        assert _encode([*args, "--out", tmp_path / "b"])[0] == 130
    finally:
        PoolAE.encode_posterior = real
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["latents-000000.safetensors", "latents-000001.safetensors"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["index.json", "latents-000000.safetensors",
                                                                   "latents-000001.safetensors"]
    with pytest.raises(ValueError, match="holds 64 of 100 latents"):
        LatentSource(tmp_path / "b")
    ae.calls = 0
    code, out = _encode([*args, "--out", tmp_path / "b"], capsys)
    assert code == 0 and ae.calls == 3  # only the two missing shards: 32 + 4 images in 16s
    for f in sorted((tmp_path / "a").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    assert json.loads((tmp_path / "a" / "index.json").read_text()) == json.loads(
        (tmp_path / "b" / "index.json").read_text())
    # a complete folder: said so, nothing written, exit 0
    code, out = _encode([*args, "--out", tmp_path / "b"], capsys)
    assert code == 0 and "already holds all 100 latents" in out.out and ae.calls == 3
    # the index records the npz as an absolute path (eval scores against it from anywhere)
    assert index["source"] == str((tmp_path / "d.npz").resolve()) and index["autoencoder"]["path"] == str(
        tmp_path / "ae")


def test_truncated_and_missing_shards_are_named_and_rewritten(tmp_path, aes):
    aes["ae"] = PoolAE("ae")
    np.savez(tmp_path / "d.npz", x=datasets.digits("train").x[:64].numpy())
    args = ["--autoencoder", "ae", "--data", tmp_path / "d.npz", "--per-shard", 32, "--out", tmp_path / "c"]
    assert _encode(args)[0] == 0
    good = (tmp_path / "c" / "latents-000001.safetensors").read_bytes()
    shutil.copytree(tmp_path / "c", tmp_path / "t")
    p = tmp_path / "t" / "latents-000001.safetensors"
    p.write_bytes(good[:300])
    with pytest.raises(ValueError, match=rf"shard {p} is truncated \(expected {len(good)} bytes, found 300\); "
                                         r"rerun `unifusion encode` with the same arguments to rewrite it"):
        LatentSource(tmp_path / "t")
    p.write_bytes(b"\xff" * len(good))  # the right size, an unreadable header
    with pytest.raises(ValueError, match="is damaged"):
        LatentSource(tmp_path / "t")
    (tmp_path / "t" / "latents-000000.safetensors").unlink()
    with pytest.raises(ValueError, match=r"latents-000000.safetensors is listed in the index but missing; rerun "
                                         "`unifusion encode`"):
        datasets.load(str(tmp_path / "t"))
    # rerunning encode rewrites the missing and the truncated shard
    p.write_bytes(good[:300])
    assert _encode([*args[:-1], tmp_path / "t"])[0] == 0
    assert p.read_bytes() == good and len(LatentSource(tmp_path / "t")) == 64


# ------------------------------------------------------------------------------ bad input
def _image_folder(root, sizes):
    from PIL import Image
    root.mkdir()
    for i, s in enumerate(sizes):
        Image.fromarray(np.full((s, s), 40 + i, dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


def test_mixed_and_wrong_image_sizes_for_a_fixed_size_autoencoder(tmp_path, aes, capsys):
    aes["ae"] = PoolAE("ae", image_size=8)
    # the odd file after the probe: the first shard is written, the one holding it never is
    folder = _image_folder(tmp_path / "mixed", [8] * 20 + [12] + [8] * 3)
    code, out = _encode(["--autoencoder", "ae", "--data", folder, "--out", tmp_path / "m", "--per-shard", 16], capsys)
    assert code == 2 and "images differ in size" in out.err and "020.png is 12x12" in out.err
    assert "this autoencoder takes 8x8 images: pass --image-size 8" in out.err
    assert [s["file"] for s in json.loads((tmp_path / "m" / "index.json").read_text())["shards"]] == [
        "latents-000000.safetensors"] and not (tmp_path / "m" / "latents-000001.safetensors").exists()
    # within the probe: refused before anything is written
    folder = _image_folder(tmp_path / "mixed2", [8, 12, 8])
    code, out = _encode(["--autoencoder", "ae", "--data", folder, "--out", tmp_path / "m2"], capsys)
    assert code == 2 and "pass --image-size 8" in out.err and not (tmp_path / "m2").exists()
    # all of another size
    folder = _image_folder(tmp_path / "big", [12, 12])
    code, out = _encode(["--autoencoder", "ae", "--data", folder, "--out", tmp_path / "b"], capsys)
    assert code == 2 and "the autoencoder takes 8x8 images but" in out.err and "12x12" in out.err
    assert "--image-size 8" in out.err
    # --image-size resizes: then it encodes
    assert _encode(["--autoencoder", "ae", "--data", folder, "--out", tmp_path / "b", "--image-size", 8])[0] == 0
    assert LatentSource(tmp_path / "b").reference == (str(folder.resolve()), {"image_size": 8})


def test_latents_meet_another_autoencoder(tmp_path, aes, capsys):
    aes["ae1"], aes["ae2"] = PoolAE("ae1", seed=1), PoolAE("ae2", seed=2)
    np.savez(tmp_path / "d.npz", x=datasets.digits("train").x[:40].numpy())
    base = ["--data", tmp_path / "d.npz", "--out", tmp_path / "l", "--per-shard", 16]
    assert _encode(["--autoencoder", "ae1", *base, "--n", 16])[0] == 0
    # resuming (here: extending) with another autoencoder
    code, out = _encode(["--autoencoder", "ae2", *base], capsys)
    assert code == 2 and "holds latents encoded with autoencoder ae1" in out.err and "not ae2" in out.err
    # with other data
    np.savez(tmp_path / "e.npz", x=datasets.digits("train").x[:40].numpy())
    code, out = _encode(["--autoencoder", "ae1", *base[:1], tmp_path / "e.npz", *base[2:]], capsys)
    assert code == 2 and "holds latents of other data or options (source" in out.err
    assert _encode(["--autoencoder", "ae1", *base])[0] == 0 and len(LatentSource(tmp_path / "l")) == 40
    # a model trained on them decodes with ae1 only: the file changed -> digest; other channels -> refused
    model = models.build(C.model_spec(C.from_dict({"data": str(tmp_path / "l"), "network_args": {
        "model_channels": 8}}), LatentSource(tmp_path / "l")))
    assert model.spec.data["autoencoder"]["path"] == "ae1" and model.spec.network["kwargs"]["in_channels"] == 4
    z = torch.zeros(2, 4, 4, 4)
    assert model.decode(z).shape == (2, 1, 8, 8)
    fresh = models.build(model.spec)
    aes["ae1"] = PoolAE("ae1", seed=3)
    with pytest.raises(ValueError, match="these latents were encoded with autoencoder ae1"):
        fresh.decode(z)
    aes["ae1"] = PoolAE("ae1", seed=1, latent_channels=3)
    with pytest.raises(ValueError, match="has 3 latent channels but this model was trained on 4-channel latents"):
        models.build(model.spec).decode(z)
    # the autoencoder is kept outside the module: not in the weights
    assert set(model.state_dict()) == set(models.build(model.spec).state_dict()) and "_autoencoder" in model.__dict__


def test_latent_spec_fields_are_checked():
    from unifusion import networks
    from unifusion.models import ModelSpec
    ae = {"kind": "unifusion", "path": "/x", "digest": "ab", "factor": 2, "latent_channels": 4}
    data = {"kind": "latent", "shape": [4, 4, 4], "range": None, "levels": None, "autoencoder": ae,
            "image_shape": [1, 8, 8], "image_range": [-1, 1], "source": "digits-train"}
    net = networks.describe("unet-digits", in_channels=4, model_channels=8)
    ModelSpec(network=net, data=data).validate()
    with pytest.raises(ValueError, match="do not come from"):
        ModelSpec(network=net, data={**data, "image_shape": [1, 16, 16]}).validate()
    with pytest.raises(ValueError, match="needs 'autoencoder'"):
        ModelSpec(network=net, data={**data, "autoencoder": {"path": "/x"}}).validate()


# ------------------------------------------------------------------------------ train, sample, eval
def test_train_sample_and_eval_on_latents_decode_to_images(tmp_path, aes, capsys):
    aes["ae"] = PoolAE("ae")
    assert _encode(["--autoencoder", "ae", "--data", "digits-train", "--out", tmp_path / "lat", "--n", 256,
                    "--per-shard", 100])[0] == 0
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(tmp_path / "lat"), "--out", str(run), "--steps", "3", "--batch-size",
                     "16", "--network.model_channels", "8", "--sample-every", "0", "--sample-nfe", "2",
                     "--checkpoint-every", "3"]) == 0
    spec = models.load(run).spec
    assert spec.data["kind"] == "latent" and spec.shape == (4, 4, 4) and spec.data["image_shape"] == [1, 8, 8]
    assert spec.data["source"] == "digits-train" and spec.data["autoencoder"]["digest"] == aes["ae"].describe()["digest"]
    assert (run / "samples" / "latest.png").is_file()
    assert cli.main(["sample", "--checkpoint", str(run), "--n", "6", "--nfe", "3", "--out", str(tmp_path / "s.npz"),
                     "--png", str(tmp_path / "s.png")]) == 0
    with np.load(tmp_path / "s.npz") as f:
        x = f["x"]
    assert x.shape == (6, 1, 8, 8) and x.min() >= -1 and x.max() <= 1 and (tmp_path / "s.png").is_file()
    # nearest-upsampled decodes: every 2x2 block is constant
    assert np.allclose(x[:, :, ::2, ::2], x[:, :, 1::2, 1::2])
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run), "--nfe", "2", "--n", "8", "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["reference"] == "digits-train" and result["features"] == "digits-cnn"
    assert result["rows"][0]["n"] == 8
    assert cli.main(["eval", "--checkpoint", str(run), "--nfe", "2", "--n", "8", "--nll", "4"]) == 2
    assert "latent model" in capsys.readouterr().err


def test_the_whole_path_with_a_real_autoencoder(tmp_path):
    """A tiny KL autoencoder (2 steps) -> its latent statistics -> encode -> train -> sample images."""
    from unifusion.training import loop as L
    assert cli.main(["autoencoder", "train", "--data", "digits-train", "--network.base_channels", "8",
                     "--network.ch_mult", "[1, 2]", "--network.mid_attention", "false", "--steps", "2",
                     "--batch-size", "16", "--checkpoint-every", "2", "--sample-every", "0",
                     "--out", str(tmp_path / "ae")]) == 0
    ae = A.load_autoencoder(tmp_path / "ae")
    assert ae.factor == 2 and ae.latent_channels == 4
    assert cli.main(["encode", "--autoencoder", str(tmp_path / "ae"), "--data", "digits-train", "--n", "64",
                     "--per-shard", "32", "--out", str(tmp_path / "lat")]) == 0
    lat = LatentSource(tmp_path / "lat")
    x, _ = datasets.digits("train").arrays(64)
    torch.testing.assert_close(lat.arrays()[0], ae.normalize(ae.encode_posterior(x)[0]))
    std = torch.stack([lat.posterior(i)[1] for i in range(64)])
    torch.testing.assert_close(std, ae.encode_posterior(x)[1] * ae.scale.float().view(1, -1, 1, 1))
    run = L.train(C.from_dict({"data": str(tmp_path / "lat"), "network_args": {"model_channels": 8}, "steps": 3,
                               "batch_size": 16, "checkpoint_every": 3, "sample_every": 0, "sample_nfe": 2,
                               "out": str(tmp_path / "ldm")}), progress=False)
    model = models.load(run["model"])
    images = model.sample(seeds=range(3), nfe=2)
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1
    z = model.sample(seeds=range(3), nfe=2, decode=False)
    assert z.shape == (3, 4, 4, 4)
    torch.testing.assert_close(images, ae.decode_raw(ae.denormalize(z)).clamp(-1, 1))


@pytest.mark.parametrize("preset,shape,extra", [("unet-digits", (4, 8, 8), {}), ("unet-digits", (4, 4, 4), {}),
                                                ("unet-32", (4, 8, 8), {"attn_resolutions": [8]}),
                                                ("dit-s2", (4, 4, 4), {"hidden_size": 32, "depth": 1, "num_heads": 2})])
def test_denoiser_presets_follow_the_latent_channels(preset, shape, extra):
    from unifusion import networks
    fitted = networks.fitted_args(preset, shape)
    assert fitted["in_channels"] == 4 and fitted.get("input_size", shape[-1]) == shape[-1]
    net = networks.build(preset, **{**fitted, "model_channels": 8, **extra} if "unet" in preset else {**fitted, **extra})
    x = torch.randn(2, *shape)
    assert net(x, torch.zeros(2)).shape == x.shape


def test_couplings_of_a_latent_teacher_stay_in_latent_space(tmp_path, aes, capsys):
    """`unifusion couple` on a latent model stores latents (not decoded images) against latent
    noise, and a reflow student on them records the same autoencoder and decodes to images."""
    aes["ae"] = PoolAE("ae")
    assert _encode(["--autoencoder", "ae", "--data", "digits-train", "--out", tmp_path / "lat", "--n", 64])[0] == 0
    flags = ["--network.model_channels", "8", "--sample-every", "0", "--sample-nfe", "2", "--batch-size", "16",
             "--process", "flow", "--parametrization", "velocity"]
    assert cli.main(["train", "--data", str(tmp_path / "lat"), "--out", str(tmp_path / "t"), "--steps", "2",
                     "--checkpoint-every", "2", *flags]) == 0
    assert cli.main(["couple", "--checkpoint", str(tmp_path / "t"), "--sampler", "euler", "--nfe", "2", "--n", "16",
                     "--out", str(tmp_path / "pairs")]) == 0
    teacher = models.load(tmp_path / "t")
    pairs = datasets.load(str(tmp_path / "pairs"))
    x, noise = pairs[3]["x0"], pairs[3]["noise"]
    assert x.shape == noise.shape == (4, 4, 4)  # latent shape, not the image's (1, 8, 8)
    torch.testing.assert_close(x, teacher.sample(seeds=[3], sampler="euler", nfe=2, decode=False)[0])
    assert cli.main(["train", "--data", str(tmp_path / "pairs"), "--reflow", "true", "--init-from", str(tmp_path / "t"),
                     "--out", str(tmp_path / "s"), "--steps", "2", "--checkpoint-every", "2", *flags]) == 0
    spec = models.load(tmp_path / "s").spec
    assert spec.data["kind"] == "latent" and spec.data["source"] == "digits-train"
    assert spec.data["autoencoder"]["digest"] == aes["ae"].describe()["digest"]
    assert spec.training["made_from"]["couplings"]["folder"] == str(tmp_path / "pairs")
    assert models.load(tmp_path / "s").sample(seeds=range(2), sampler="euler", nfe=2).shape == (2, 1, 8, 8)


def test_encode_overwrite_replaces_latents_of_another_autoencoder_and_spares_other_folders(tmp_path, aes, capsys):
    aes["a"], aes["b"] = PoolAE("a", seed=0), PoolAE("b", seed=1)
    out = tmp_path / "lat"
    assert _encode(["--autoencoder", "a", "--data", "digits-train", "--out", out, "--n", 32])[0] == 0
    assert _encode(["--autoencoder", "b", "--data", "digits-train", "--out", out, "--n", 32])[0] == 2
    assert _encode(["--autoencoder", "nowhere", "--data", "digits-train", "--out", out, "--n", 32,
                    "--overwrite"])[0] == 2  # a failing autoencoder deletes nothing
    assert LatentSource(out).autoencoder["digest"] == aes["a"].describe()["digest"]
    assert _encode(["--autoencoder", "b", "--data", "digits-train", "--out", out, "--n", 32, "--overwrite"])[0] == 0
    assert LatentSource(out).autoencoder["digest"] == aes["b"].describe()["digest"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    capsys.readouterr()
    assert _encode(["--autoencoder", "b", "--data", "digits-train", "--out", other, "--n", 32, "--overwrite"])[0] == 2
    assert "does not hold latents" in capsys.readouterr().err and (other / "keep.txt").is_file()


def test_reading_rows_does_not_grow_the_heap(tmp_path):
    """Row reads go through numpy memory maps (shards.MappedShard): safetensors' get_slice kept
    ~60 bytes per call: +3 MiB per 100,000 reads, without bound over a long run."""
    from unifusion.data.shards import ShardReader, write_shards

    def anon_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024
    write_shards(tmp_path, fmt="t", what="rows", command="test", prefix="rows", start_key="first", count=2000,
                 per_shard=500, header={}, make=lambda idx, tick: {"x": torch.randn(len(idx), 4, 4, 4)},
                 check_resume=lambda old: None, progress=False)
    reader = ShardReader(tmp_path, "t", "rows", "test", "first", {"x": (4, 4, 4)})
    g = torch.Generator().manual_seed(0)
    order = torch.randint(0, 2000, (120_000,), generator=g).tolist()
    for i in order[:20_000]:
        reader.row("x", i)
    before = anon_mib()
    for i in order[20_000:]:
        reader.row("x", i)
    assert anon_mib() - before < 2.0
