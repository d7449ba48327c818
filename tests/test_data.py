"""data/: toys, digits, image folders, .npz arrays, writers; every dataset is in [-1, 1]."""
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
    x, y = ds[5]
    assert x.shape == (2,) and int(y) == int(ds.y[5])
    moons = data.load("moons", n=10)
    assert moons.num_classes == 0 and moons.y is None and int(moons[0][1]) == -1
    batch_x, batch_y = next(iter(torch.utils.data.DataLoader(moons, batch_size=4)))
    assert batch_x.shape == (4, 2) and batch_y.tolist() == [-1] * 4


# -------------------------------------------------------------------------------- digits
def test_digits():
    from sklearn.datasets import load_digits

    ds = data.digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.shape == (1, 8, 8) and ds.x.dtype == torch.float32
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
        back = data.load(str(tmp_path / "d"))
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
    assert str(bad) in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = data.load(str(tmp_path), skip_corrupt=True)
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
    np.savez(tmp_path / "big.npz", x=np.full((2, 3), 2.5))
    with pytest.raises(ValueError, match="2.5"):
        data.npz_arrays(tmp_path / "big.npz")
    with pytest.raises(ValueError, match="holds"):
        data.npz_arrays(tmp_path / "big.npz", key="images")


def test_dataset_check():
    with pytest.raises(ValueError, match="NaN"):
        data.ArrayDataset(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        data.ArrayDataset(torch.tensor([[0.0, 1.01]]))
    data.ArrayDataset(torch.tensor([[0.0, 1 + 1e-7]]))  # within tolerance


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
