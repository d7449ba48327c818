"""data/: toys, digits, image folders (in memory and streamed), .npz arrays, the step order,
writers. Sources yield dicts {"x0", "cond"?: {"y"}, "noise"?}; images are in [-1, 1]."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion import data
from unifusion.data import toys

Q = 1 / 127.5 + 1e-6  # one 8-bit level in the [-1, 1] scale


# ---------------------------------------------------------------------------------- toys
@pytest.mark.parametrize("name", toys.names())
def test_toy_deterministic_shape_range(name):
    a, b, c = toys.make(name, 500, seed=3), toys.make(name, 500, seed=3), toys.make(name, 500, seed=4)
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1
    ds = data.load(name, n=64, seed=1)
    assert len(ds) == 64 and ds.shape == (2,) and torch.equal(ds.x, toys.make(name, 64, 1))
    assert ds.kind == "vector"


def test_toy_scaling_is_the_stated_one():
    # gmm: means 0.7 (cos, sin)(2 pi k / 8), std 0.05, label k
    x, y = toys.make("gmm", 4000, seed=0, labels=True)
    angle = 2 * math.pi * y.double() / 8
    resid = x.double() - 0.7 * torch.stack([angle.cos(), angle.sin()], 1)
    assert set(y.tolist()) == set(range(8))
    assert resid.abs().mean() < 0.05 and abs(float(resid.std()) - 0.05) < 0.005
    # rings: radii near {0.2, 0.4, 0.6, 0.8}; checkerboard fills [-1, 1] up to its edges
    r = toys.make("rings", 4000, seed=0).norm(dim=1)
    assert ((r / 0.2 - (r / 0.2).round()).abs() * 0.2).max() < 0.15
    cb = toys.make("checkerboard", 4000, seed=0)
    assert cb.min() < -0.99 and cb.max() > 0.99
    # dark squares only: floor(2 x1) + floor(2 x2) even
    assert ((torch.floor(2 * cb[:, 0]) + torch.floor(2 * cb[:, 1])) % 2 == 0).all()


def test_gmm_dataset_is_labelled():
    ds = data.load("gmm", n=100, seed=0)
    assert ds.num_classes == 8 and ds.y.dtype == torch.int64
    item = ds[5]
    assert set(item) == {"x0", "cond"} and item["x0"].shape == (2,) and torch.equal(item["x0"], ds.x[5])
    y = item["cond"]["y"]
    assert y.shape == () and y.dtype == torch.int64 and int(y) == int(ds.y[5])
    moons = data.load("moons", n=10)
    assert moons.num_classes == 0 and moons.y is None and set(moons[0]) == {"x0"}
    batch = next(iter(torch.utils.data.DataLoader(moons, batch_size=4)))
    assert set(batch) == {"x0"} and batch["x0"].shape == (4, 2)


# -------------------------------------------------------------------------------- digits
def test_digits():
    from sklearn.datasets import load_digits

    ds = data.digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.shape == (1, 8, 8) and ds.x.dtype == torch.float32
    assert ds.kind == "image"
    assert ds.x.min() == -1 and ds.x.max() == 1
    assert ds.num_classes == 10 and ds.class_names == [str(k) for k in range(10)]
    assert sorted(set(ds.y.tolist())) == list(range(10))
    raw = load_digits()
    torch.testing.assert_close(ds.x[:, 0], torch.from_numpy(raw.images).float() / 16 * 2 - 1)
    train, test = data.load("digits", split="train"), data.digits("test")
    assert len(train) == 1500 and len(test) == 297
    assert torch.equal(data.load("digits-train").x, train.x) and torch.equal(data.load("digits-test").y, test.y)
    assert {"digits", "digits-train", "digits-test"} <= set(data.names())
    assert torch.equal(torch.cat([train.x, test.x]), ds.x) and torch.equal(torch.cat([train.y, test.y]), ds.y)
    with pytest.raises(ValueError, match="split"):
        data.digits("valid")


# -------------------------------------------------------------------------- image folder
def test_image_folder_round_trip(tmp_path):
    ds = data.digits("test")
    sub = data.ArrayDataset(ds.x[:20], ds.y[:20], 10, ds.class_names)
    data.write_image_folder(sub, tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [str(k) for k in range(10)]
    # every class gets a folder, even "2", which has no examples among these 20, so labels survive
    assert not any((tmp_path / "d" / "2").iterdir())
    with pytest.warns(UserWarning, match="no images"):
        back = data.image_folder(tmp_path / "d")
    assert back.num_classes == 10 and back.class_names == ds.class_names and back.shape == (1, 8, 8)
    # files are read back grouped by class; match each example by its label and pixels
    order = sorted(range(20), key=lambda i: (int(sub.y[i]), i))
    assert torch.equal(back.y, sub.y[order])
    assert (back.x - sub.x[order]).abs().max() <= Q / 2
    with pytest.raises(FileExistsError):
        data.write_image_folder(sub, tmp_path / "d")


def test_write_image_folder_keeps_label_order(tmp_path):
    # names that would sort differently from their labels get index prefixes
    x = torch.zeros(3, 1, 4, 4)
    ds = data.ArrayDataset(x, torch.tensor([0, 1, 2]), 3, ["cat", "ant", "bee"])
    data.write_image_folder(ds, tmp_path)
    back = data.image_folder(tmp_path)
    assert back.y.tolist() == [0, 1, 2] and back.class_names == ["0_cat", "1_ant", "2_bee"]
    # unlabelled datasets go into the root; loading gives an unlabelled dataset
    data.write_image_folder(data.ArrayDataset(x), tmp_path / "u")
    u = data.image_folder(tmp_path / "u")
    assert u.y is None and u.num_classes == 0 and len(u) == 3


def test_resize_and_center_crop(tmp_path):
    # a 40x20 (w x h) image whose left and right quarters are black, the middle white
    a = np.zeros((20, 40), np.uint8)
    a[:, 10:30] = 255
    Image.fromarray(a).save(tmp_path / "wide.png")
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(tmp_path / "square.png")
    ds = data.image_folder(tmp_path, image_size=10)
    assert ds.x.shape == (2, 1, 10, 10)
    # shorter side 20 -> 10: 20x10, the centered 10x10 crop is the white middle
    wide = ds.x[1, 0]
    assert (wide[:, 2:8] > 0.99).all()
    assert (ds.x[0] > 0.99).all()
    # upscaling works too
    assert data.image_folder(tmp_path, image_size=48).x.shape == (2, 1, 48, 48)


def test_mixed_sizes_need_image_size(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="image-size") as e:
        data.image_folder(tmp_path)
    assert "a.png" in str(e.value) and "b.png" in str(e.value)


def test_channel_inference_and_conversion(tmp_path):
    gray, rgb, rgba = tmp_path / "gray", tmp_path / "rgb", tmp_path / "rgba"
    for d in (gray, rgb, rgba):
        d.mkdir()
    Image.fromarray(np.full((4, 4), 100, np.uint8)).save(gray / "g.png")
    Image.fromarray(np.full((4, 4), 200, np.uint8), "L").save(gray / "g2.JPG", quality=100)
    assert data.image_folder(gray).shape == (1, 4, 4)

    px = np.zeros((4, 4, 3), np.uint8)
    px[..., 0] = 255  # pure red
    Image.fromarray(px).save(rgb / "r.png")
    Image.fromarray(np.full((4, 4), 100, np.uint8)).save(rgb / "g.png")
    ds = data.image_folder(rgb)  # one RGB file -> 3 channels; the gray one is repeated
    assert ds.shape == (3, 4, 4) and ds.y is None
    g, r = ds.x[0], ds.x[1]  # sorted: g.png, r.png
    torch.testing.assert_close(g, torch.full((3, 4, 4), 100 / 255 * 2 - 1))
    torch.testing.assert_close(r[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    # channels=1: ITU-R 601 luminance of red is 0.299
    one = data.image_folder(rgb, channels=1)
    assert one.shape == (1, 4, 4)
    assert abs(float(one.x[1, 0, 0, 0]) - (0.299 * 2 - 1)) < 1e-6

    # RGBA: alpha 0 -> white, alpha 255 -> the color, alpha 128 -> halfway to white
    pa = np.zeros((4, 4, 4), np.uint8)
    pa[0, :, 3] = 0
    pa[1, :, 3] = 255
    pa[2:, :, 3] = 128
    Image.fromarray(pa, "RGBA").save(rgba / "t.png")
    ds = data.image_folder(rgba)
    assert ds.shape == (3, 4, 4)
    assert torch.allclose(ds.x[0, :, 0], torch.tensor(1.0)) and torch.allclose(ds.x[0, :, 1], torch.tensor(-1.0))
    torch.testing.assert_close(ds.x[0, :, 2], torch.full((3, 4), (1 - 128 / 255) * 2 - 1))
    # grayscale with alpha stays one channel
    la = np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1)
    Image.fromarray(la, "LA").save(gray / "la.png")
    ds = data.image_folder(gray)
    assert ds.shape == (1, 4, 4) and (ds.x[2] == 1).all()  # sorted: g.png, g2.JPG, la.png
    assert data.image_folder(gray, channels=3).shape == (3, 4, 4)


def test_formats_and_16bit(tmp_path):
    a = (np.arange(16, dtype=np.uint8).reshape(4, 4) * 16)
    for ext in ("png", "bmp", "gif", "webp"):
        kw = {"lossless": True} if ext == "webp" else {}
        Image.fromarray(a).save(tmp_path / f"a.{ext.upper() if ext == 'bmp' else ext}", **kw)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = data.image_folder(tmp_path)
    assert len(ds) == 4
    for x in ds.x:  # lossless formats give back the exact pixels
        torch.testing.assert_close(x[0], torch.from_numpy(a).float() / 255 * 2 - 1)
    # 16-bit grayscale PNG keeps its full range
    d16 = tmp_path / "16"
    d16.mkdir()
    Image.fromarray(np.array([[0, 65535], [32768, 65535]], np.uint16)).save(d16 / "a.png")
    x = data.image_folder(tmp_path / "16").x[0, 0]
    assert x.shape == (2, 2) and float(x[0, 0]) == -1 and float(x[0, 1]) == 1 and abs(float(x[1, 0])) < 1e-4


def test_corrupt_file(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "ok.png")
    bad = tmp_path / "x.png"
    bad.write_bytes(b"this is not a png at all")
    with pytest.raises(ValueError, match="skip_corrupt") as e:
        data.image_folder(tmp_path)
    assert str(bad) in str(e.value) and "--skip-corrupt" in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = data.image_folder(tmp_path, skip_corrupt=True)
    assert len(ds) == 1 and ds.skipped == [str(bad)]


def test_empty_folders(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        data.image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.image_folder(tmp_path)
    # an empty class folder keeps its label index (with a warning) when others have images
    (tmp_path / "b").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "b" / "x.png")
    with pytest.warns(UserWarning, match="no images"):
        ds = data.image_folder(tmp_path)
    assert ds.num_classes == 2 and ds.y.tolist() == [1]


def _png_folder(root, n_per_class=11, classes=("a", "b"), size=6, seed=0):
    """Random RGB PNGs, one subfolder per class (flat when classes is empty)."""
    rng = np.random.default_rng(seed)
    for c in classes or ("",):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    return root


def test_folder_source_streams_what_image_folder_reads(tmp_path):
    root = _png_folder(tmp_path / "f")
    src, mem = data.load(str(root)), data.image_folder(root)
    assert isinstance(src, data.ImageFolderSource) and not hasattr(src, "x")
    assert (len(src), src.shape, src.kind, src.num_classes, src.class_names) == (22, (3, 6, 6), "image", 2, ["a", "b"])
    assert src.source == str(root) and torch.equal(src.labels, mem.y)
    item = src[13]
    assert set(item) == {"x0", "cond"} and item["x0"].dtype == torch.float32
    assert torch.equal(item["x0"], mem.x[13]) and item["cond"]["y"].shape == () and int(item["cond"]["y"]) == 1
    x, y = src.arrays()
    assert torch.equal(x, mem.x) and torch.equal(y, mem.y)
    x5, y5 = src.arrays(5)
    assert torch.equal(x5, mem.x[:5]) and torch.equal(y5, mem.y[:5])
    with pytest.raises(IndexError):
        src[22]
    # resizing and channel conversion happen per item, as in image_folder
    small = data.load(str(root), image_size=4, channels=1)
    assert small.shape == (1, 4, 4) and torch.equal(small[3]["x0"], data.image_folder(root, 4, 1).x[3])
    with pytest.raises(ValueError, match="does not take"):
        data.load(str(root), size=4)


def test_folder_source_infers_channels_from_the_first_files(tmp_path):
    # gray files first, one RGB file last: probing 2 files says gray, probing all says RGB
    for i in range(3):
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    px = np.zeros((4, 4, 3), np.uint8)
    px[..., 0] = 255
    Image.fromarray(px).save(tmp_path / "3.png")
    few, all_ = data.ImageFolderSource(tmp_path, probe=2), data.ImageFolderSource(tmp_path, probe=4)
    assert few.shape == (1, 4, 4) and all_.shape == (3, 4, 4) and few.num_classes == 0 and few.class_names is None
    assert abs(float(few[3]["x0"][0, 0, 0]) - (0.299 * 2 - 1)) < 1e-6  # red -> luminance
    assert torch.equal(all_[1]["x0"], torch.full((3, 4, 4), 40 / 255 * 2 - 1))  # gray -> repeated
    assert set(few[0]) == {"x0"}  # unlabelled: no cond


def test_folder_source_size_mismatch_found_when_read(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "3.png")
    src = data.ImageFolderSource(tmp_path, probe=2)  # the odd file is not probed
    assert src.shape == (1, 8, 8) and src[2]["x0"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="--image-size N") as e:
        src[3]
    assert "0.png is 8x8" in str(e.value) and "3.png is 8x9" in str(e.value)
    with pytest.raises(ValueError, match="--image-size N"):  # probed: found at once
        data.ImageFolderSource(tmp_path)
    assert data.ImageFolderSource(tmp_path, image_size=8)[3]["x0"].shape == (1, 8, 8)


def test_folder_source_skip_corrupt_replaces_deterministically(tmp_path):
    for i in (0, 2, 3):
        Image.fromarray(np.full((4, 4), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").write_bytes(b"not a png")
    (tmp_path / "4.png").write_bytes(b"nor this")
    src = data.ImageFolderSource(tmp_path, probe=1)
    with pytest.raises(ValueError, match="--skip-corrupt") as e:
        src[1]
    assert str(tmp_path / "1.png") in str(e.value)
    with pytest.raises(ValueError, match="skip_corrupt"):  # a probed unreadable file fails at once
        data.ImageFolderSource(tmp_path)
    src = data.ImageFolderSource(tmp_path, skip_corrupt=True, probe=1)
    assert len(src) == 5
    with pytest.warns(UserWarning, match="1.png is replaced") as w:
        items = [src[i]["x0"] for i in range(5)]
        again = [src[i]["x0"] for i in range(5)]
    assert len(w) == 1  # warned once per process
    assert torch.equal(items[1], items[2]) and torch.equal(items[4], items[0])  # next readable, cyclically
    assert all(torch.equal(a, b) for a, b in zip(items, again))
    assert src.skipped == [str(tmp_path / "1.png"), str(tmp_path / "4.png")]


# ----------------------------------------------------------------------------------- npz
def test_npz_uint8_nhwc(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=a, y=np.arange(5) % 2)
    ds = data.load(str(tmp_path / "a.npz"))
    assert ds.x.shape == (5, 3, 6, 7) and ds.num_classes == 2
    torch.testing.assert_close(ds.x, torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255 * 2 - 1)
    # (N, H, W) gets a channel axis
    np.savez(tmp_path / "b.npz", x=a[..., 0])
    assert data.npz_arrays(tmp_path / "b.npz").shape == (1, 6, 7)


def test_npz_float_nchw_and_vectors(tmp_path):
    a = np.random.default_rng(0).uniform(-1, 1, (4, 3, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=a)
    ds = data.npz_arrays(tmp_path / "f.npz")
    assert ds.shape == (3, 5, 5) and ds.y is None
    torch.testing.assert_close(ds.x, torch.from_numpy(a))
    # [0, 1] data maps to [-1, 1]; vectors (N, D) are kept
    np.savez(tmp_path / "v.npz", samples=np.array([[0.0, 0.5], [1.0, 0.25]]))
    v = data.npz_arrays(tmp_path / "v.npz", key="samples")
    torch.testing.assert_close(v.x, torch.tensor([[-1.0, 0.0], [1.0, -0.5]]))
    # ...unless the range is stated
    assert float(data.npz_arrays(tmp_path / "v.npz", key="samples", float_range=(-1, 1)).x[0, 1]) == 0.5


def test_npz_errors(tmp_path):
    a = np.zeros((4, 1, 3, 3), np.float32)
    a[2, 0, 1, 1] = np.nan
    a[3, 0, 0, 0] = np.inf
    np.savez(tmp_path / "nan.npz", x=a)
    with pytest.raises(ValueError, match=r"2 NaN/inf.*\(2, 0, 1, 1\)"):
        data.load(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "big.npz", x=np.full((2, 1, 3, 3), 2.5))  # image-shaped floats out of range
    with pytest.raises(ValueError, match="2.5.*float_range='none'"):
        data.npz_arrays(tmp_path / "big.npz")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):  # a stated range is checked too
        data.npz_arrays(tmp_path / "big.npz", float_range=(-1, 1))
    with pytest.raises(ValueError, match="holds"):
        data.npz_arrays(tmp_path / "big.npz", key="images")
    with pytest.raises(ValueError, match="float_range"):
        data.npz_arrays(tmp_path / "big.npz", float_range=(0, 2))


def test_npz_vectors_latents_and_noise(tmp_path):
    v = np.array([[3.0, -7.5], [0.5, 2.0]])
    np.savez(tmp_path / "v.npz", x=v)  # (N, D) outside [-1, 1]: a vector data set, as is
    ds = data.npz_arrays(tmp_path / "v.npz")
    assert ds.kind == "vector" and torch.equal(ds.x, torch.tensor(v, dtype=torch.float32))
    lat = np.random.default_rng(0).normal(0, 3, (4, 4, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "l.npz", x=lat)
    with pytest.raises(ValueError, match="float_range='none'"):
        data.load(str(tmp_path / "l.npz"))
    ds = data.load(str(tmp_path / "l.npz"), float_range="none")
    assert ds.kind == "latent" and torch.equal(ds.x, torch.from_numpy(lat))
    # a "noise" array is carried by the items, with x's layout change (NHWC -> NCHW), unmapped
    x = np.random.default_rng(1).integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    noise = np.random.default_rng(2).normal(size=(3, 5, 6, 3)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x, noise=noise, y=np.array([0, 1, 0]))
    ds = data.load(str(tmp_path / "c.npz"))
    assert ds.shape == (3, 5, 6) and ds.kind == "image"
    item = ds[1]
    assert set(item) == {"x0", "cond", "noise"}
    torch.testing.assert_close(item["noise"], torch.from_numpy(noise[1]).permute(2, 0, 1))
    np.savez(tmp_path / "bad.npz", x=x, noise=noise[:2])
    with pytest.raises(ValueError, match="noise.*shape"):
        data.load(str(tmp_path / "bad.npz"))


def test_batch_equals_collated_items_and_arrays():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 2, 2, generator=g) * 2 - 1
    ds = data.ArrayDataset(x, torch.arange(10) % 3, noise=torch.randn(10, 1, 2, 2, generator=g))
    idx = [7, 0, 7, 3]
    fast, slow = ds.batch(idx), data.collate([ds[i] for i in idx])
    assert set(fast) == set(slow) == {"x0", "cond", "noise"}
    for key in ("x0", "noise"):
        assert torch.equal(fast[key], slow[key]) and fast[key].shape == (4, 1, 2, 2)
    assert torch.equal(fast["cond"]["y"], slow["cond"]["y"]) and fast["cond"]["y"].tolist() == [1, 0, 1, 0]
    ax, ay = ds.arrays(4)
    assert torch.equal(ax, x[:4]) and ay.tolist() == [0, 1, 2, 0]
    assert data.ArrayDataset(x).arrays()[1] is None and set(data.ArrayDataset(x).batch([1])) == {"x0"}


def test_dataset_check():
    # every kind must be finite; only images must lie in [-1, 1]
    for kind in data.KINDS:
        with pytest.raises(ValueError, match="NaN"):
            data.ArrayDataset(torch.tensor([[0.0, float("nan")]]), kind=kind)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        data.ArrayDataset(torch.full((1, 1, 2, 2), 1.01))  # 4-D: kind "image" by default
    data.ArrayDataset(torch.full((1, 1, 2, 2), 1 + 1e-7))  # within tolerance
    assert data.ArrayDataset(torch.tensor([[0.0, 1.01]])).kind == "vector"
    assert data.ArrayDataset(torch.full((1, 4, 2, 2), 5.0), kind="latent").kind == "latent"
    with pytest.raises(ValueError, match="kind"):
        data.ArrayDataset(torch.zeros(1, 2), kind="audio")


# ------------------------------------------------------------------------------- load, grid
def test_unknown_spec(tmp_path):
    with pytest.raises(ValueError, match="moons") as e:
        data.load("mnist")
    assert "digits" in str(e.value) and "exist" in str(e.value)
    with pytest.raises(ValueError, match="does not take"):
        data.load("moons", size=3)


def test_save_grid(tmp_path):
    x = data.digits("test").x[:10]
    out = data.save_grid(x, tmp_path / "g" / "grid.png")
    with Image.open(out) as img:
        size, mode, a = img.size, img.mode, np.asarray(img)
    # 10 images -> 4 per row, 3 rows; 8 px scaled by 4 to 32, padding 2
    assert size == (4 * 34 + 2, 3 * 34 + 2) and mode == "L"
    # nearest upscaling: the first image's top-left 4x4 block is one pixel of the digit
    block = a[2:6, 2:6]
    assert (block == block[0, 0]).all() and block[0, 0] == round((float(x[0, 0, 0, 0]) + 1) * 127.5)
    rgb = data.save_grid(torch.zeros(3, 3, 40, 50), tmp_path / "rgb.png", nrow=3)
    with Image.open(rgb) as img:  # 40 px is already >= 32: no upscaling
        assert img.size == (3 * 52 + 2, 42 + 2) and img.mode == "RGB"


# --------------------------------------------------------------------------- training order
def _trainer_order(n, seed, B, world, rank, steps):
    """The index lists the trainer has always used (DistributedSampler, sliced per step)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    per_epoch = len(sampler) // (B // world)
    out = []
    for k in steps:
        epoch, pos = divmod(k, per_epoch)
        sampler.set_epoch(epoch)
        out.append(list(sampler)[pos * (B // world):(pos + 1) * (B // world)])
    return out


@pytest.mark.parametrize("n,B,world", [(23, 4, 1), (23, 4, 2), (30, 6, 3)])
def test_step_order_is_the_trainers(n, B, world):
    steps = range(3 * (n // B) + 2)  # crosses epoch boundaries
    for rank in range(world):
        order = data.StepOrder(n, 7, B, world, rank)
        assert [order.indices(k) for k in steps] == _trainer_order(n, 7, B, world, rank, steps)
    # K ranks together see the one-rank batch: rank r holds its r::K interleave
    one = data.StepOrder(n, 7, B)
    ranks = [data.StepOrder(n, 7, B, world, r) for r in range(world)]
    for k in steps:
        assert all(one.indices(k)[r::world] == ranks[r].indices(k) for r in range(world))
    assert data.StepOrder(n, 8, B).indices(0) != one.indices(0)  # the seed matters


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(_equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k])
                                    for k in a)


def test_step_batches_same_with_workers_and_on_resume(tmp_path):
    src = data.load(str(_png_folder(tmp_path / "f")))  # 22 labelled images
    steps = 12  # per epoch 22 // 4 = 5: crosses two epoch boundaries
    with data.StepBatches(src, seed=3, batch_size=4, world_size=2, rank=1, num_workers=0) as it:
        ref = [next(it) for _ in range(steps)]
    expected = _trainer_order(22, 3, 4, 2, 1, range(steps))
    for batch, idx in zip(ref, expected):
        assert batch["x0"].shape == (2, 3, 6, 6)
        assert torch.equal(batch["x0"], torch.stack([src[i]["x0"] for i in idx]))
        assert batch["cond"]["y"].tolist() == src.labels[idx].tolist()
    with data.StepBatches(src, 3, 4, 2, 1, num_workers=2, prefetch_factor=1) as it:
        assert all(_equal(next(it), b) for b in ref)
        assert it.step == steps
    with data.StepBatches(src, 3, 4, 2, 1, start_step=7, num_workers=2, end_step=steps) as it:
        rest = list(it)
    assert len(rest) == steps - 7 and all(_equal(a, b) for a, b in zip(rest, ref[7:]))
    # in-memory sources use their batch() fast path in process; same batches as per item
    mem = data.image_folder(tmp_path / "f")
    fast = data.StepBatches(mem, 3, 4, 2, 1, end_step=steps)
    assert all(_equal(a, b) for a, b in zip(fast, ref))


def test_step_batches_errors():
    ds = data.ArrayDataset(torch.zeros(5, 2))
    with pytest.raises(ValueError, match="5 examples, fewer than one global batch of 8"):
        data.StepBatches(ds, 0, 8)
    with pytest.raises(ValueError, match="multiple of the 3 rank"):
        data.StepBatches(ds, 0, 4, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        data.StepBatches(ds, 0, 4, world_size=2, rank=2)


def test_check_batch():
    x = torch.zeros(2, 3)
    data.check_batch({"x0": x}, need_cond=False)
    data.check_batch({"x0": x, "cond": {"y": torch.zeros(2, dtype=torch.int64)}, "noise": x}, need_cond=True)
    with pytest.raises(ValueError, match=r"lacks \['cond.y'\]: it has keys \['x0'\], expected \['x0', 'cond.y'"):
        data.check_batch({"x0": x}, need_cond=True)
    with pytest.raises(ValueError, match=r"lacks \['x0'\]: it has keys \['image'\]"):
        data.check_batch({"image": x}, need_cond=False)
    with pytest.raises(ValueError, match="got a tuple"):
        data.check_batch((x, None), need_cond=False)
    with pytest.raises(ValueError, match="noise"):
        data.check_batch({"x0": x, "noise": torch.zeros(2, 4)}, need_cond=False)
    with pytest.raises(ValueError, match="floating"):
        data.check_batch({"x0": torch.zeros(2, 3, dtype=torch.int64)}, need_cond=False)


# ------------------------------------------------------------------------ shared helpers
def test_check_images_messages():
    from unifusion.networks import classifiers

    x = torch.zeros(2, 3, 4, 4)
    assert data.check_images(x) is x and data.check_images(x, (1, 3)) is x
    with pytest.raises(ValueError, match=r"save_grid expects images \(N, C, H, W\) with C in 1, 3, 4.*\(2, 3\)"):
        data.check_images(torch.zeros(2, 3), what="save_grid")
    want = r"DigitsClassifier expects images \(N, 1, H, W\) in \[-1, 1\], got shape \(2, 3, 4, 4\)"
    with pytest.raises(ValueError, match=want):
        classifiers.DigitsClassifier().features(x)


def test_writes_are_atomic(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    out = tmp_path / "grid.png"
    data.save_grid(torch.zeros(2, 1, 8, 8), out)
    before = out.read_bytes()
    real_save = PILImage.Image.save

    def crash(self, fp, *args, **kwargs):  # write part of the file, then fail like a full disk
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(10)
        raise OSError("No space left on device")

    monkeypatch.setattr(PILImage.Image, "save", crash)
    with pytest.raises(OSError, match="No space"):
        data.save_grid(torch.ones(2, 1, 8, 8), out)
    with pytest.raises(OSError, match="No space"):
        data.write_image_folder(data.ArrayDataset(torch.zeros(2, 1, 4, 4)), tmp_path / "folder")
    # the old grid is intact, no truncated PNG exists, no temporary file is left behind
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["grid.png"]
