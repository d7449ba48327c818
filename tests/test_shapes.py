"""The procedural shapes data: determinism from (seed, index), disjoint splits, the pixel range,
labels that agree with the pixels and the captions, the shipped classifier's held-out accuracy,
evaluation's choice of features, and a 2-step training run on shapes-32."""
import json

import numpy as np
import pytest
import torch

from unifusion import data
from unifusion.data import shapes as S
from unifusion.evaluation import evaluate as E
from unifusion.evaluation import features as fx

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ names
def test_names_splits_and_counts():
    cases = {"shapes": (32, "train", 50_000), "shapes-32": (32, "train", 50_000), "shapes-64": (64, "train", 50_000),
             "shapes-32-test": (32, "test", 10_000), "shapes-64-test": (64, "test", 10_000),
             "shapes-32-train:200000": (32, "train", 200_000), "shapes-64-test:7": (64, "test", 7)}
    for name, (res, split, n) in cases.items():
        src = data.load(name)
        assert (src.resolution, src.split, len(src), src.shape) == (res, split, n, (3, res, res)), name
        assert name.split(":")[0] in data.names()
    assert len(data.load("shapes", seed=5)) == 50_000
    with pytest.raises(ValueError, match="unknown dataset 'shapes-48'"):
        data.load("shapes-48")
    with pytest.raises(ValueError, match="does not take option"):
        data.load("shapes-32", n=4)
    with pytest.raises(ValueError, match="resolution must be one of"):
        S.ShapesSource(48)
    with pytest.raises(ValueError, match="n must lie in"):
        data.load("shapes-32:0")


def test_interface_attributes():
    src = data.load("shapes-32-test:16")
    assert (src.kind, src.num_classes, len(src.class_names)) == ("image", 24, 24)
    assert src.class_names[0] == "red circle" and src.class_names[8] == "red square"
    assert data.levels(src) == 256
    item = src[3]
    assert item["x0"].shape == (3, 32, 32) and item["x0"].dtype == torch.float32
    assert item["cond"]["y"].dtype == torch.int64 and item["cond"]["y"].ndim == 0
    data.check_batch(src.batch([0, 1]), need_cond=True)


# ------------------------------------------------------------------------------ determinism, splits, pixels
def test_deterministic_per_seed_and_index():
    a, b = data.load("shapes-32:40"), data.load("shapes-32:40")
    torch.testing.assert_close(a.batch(range(40))["x0"], b.batch(range(40))["x0"], rtol=0, atol=0)
    # a batch equals its items drawn one at a time, in any order and any batch
    batch = a.batch([7, 2, 39])
    for row, i in enumerate([7, 2, 39]):
        assert torch.equal(batch["x0"][row], a[i]["x0"]) and int(batch["cond"]["y"][row]) == int(a[i]["cond"]["y"])
    # the item does not depend on the split's length; another seed gives other images
    assert torch.equal(data.load("shapes-32:1000")[5]["x0"], a[5]["x0"])
    other = data.load("shapes-32:40", seed=1).batch(range(40))["x0"]
    assert (other - a.batch(range(40))["x0"]).abs().flatten(1).amax(1).min() > 0.1
    # negative indices count from the end; out of range is an IndexError
    assert torch.equal(a[-1]["x0"], a[39]["x0"])
    with pytest.raises(IndexError):
        a[40]


def test_splits_are_disjoint_index_ranges():
    train, test = data.load("shapes-32-train:500"), data.load("shapes-32-test:500")
    assert train._global(range(500)).max() < test._global([0]).min() == S.TEST_OFFSET
    x, y = train.arrays()[0], test.arrays()[0]
    d = torch.cdist(x.flatten(1), y.flatten(1))
    assert d.min() > 1.0  # no test image repeats a training image


@pytest.mark.parametrize("res", [32, 64])
def test_pixels_in_range_and_8_bit(res):
    x, y = data.load(f"shapes-{res}-test:64").arrays()
    assert x.shape == (64, 3, res, res) and y.shape == (64,)
    assert x.min() >= -1 and x.max() <= 1
    k = (x + 1) / 2 * 255
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert x.std() > 0.2  # not a blank image


def test_32_and_64_draw_the_same_scene():
    a32, a64 = data.load("shapes-32:50").attributes(range(50)), data.load("shapes-64:50").attributes(range(50))
    for k in a32:
        np.testing.assert_array_equal(a32[k], a64[k])
    x32 = data.load("shapes-32:50").arrays()[0]
    x64 = data.load("shapes-64:50").arrays()[0]
    down = torch.nn.functional.avg_pool2d(x64, 2)  # box-filtered 64 ~ the 32 rendering (coverage AA)
    assert (down - x32).abs().mean() < 0.05


# ------------------------------------------------------------------------------ labels
def test_attribute_arrays_are_fixed_width_and_consistent():
    n = 400
    a = data.load("shapes-32-test:400").attributes(range(n))
    assert set(a) >= {"y", "count", "relation", "shape", "colour", "size", "position", "cx", "cy", "scale"}
    slots = np.arange(S.MAX_OBJECTS)[None]
    present = slots < a["count"][:, None]
    for k in ("shape", "colour", "size", "position", "cx", "cy", "scale"):
        assert a[k].shape == (n, 3)
        assert (a[k][~present] == -1).all() and (a[k][present] >= 0).all(), k
    assert set(np.unique(a["count"])) == {1, 2, 3}
    assert set(np.unique(a["shape"][:, 0])) == {0, 1, 2} and set(np.unique(a["colour"][:, 0])) == set(range(8))
    np.testing.assert_array_equal(a["y"], a["shape"][:, 0] * 8 + a["colour"][:, 0])
    # the main object is the largest, by >= 15% in scale, and "large" means scale >= 0.13
    others = np.where(present[:, 1:], a["scale"][:, 1:], 0).max(1)
    assert (a["scale"][:, 0] > 1.15 * others).all()
    assert ((a["scale"] >= 0.13) == (a["size"] == 1))[present].all()
    # position bins are the 3 x 3 cells of the centres
    cell = np.minimum((a["cy"] * 3).astype(int), 2) * 3 + np.minimum((a["cx"] * 3).astype(int), 2)
    assert (a["position"][present] == cell[present]).all()
    assert ((a["relation"] == -1) == (a["count"] == 1)).all()


def test_captions_name_the_main_object_and_the_relation():
    src = data.load("shapes-32-test:300")
    a, caps = src.attributes(range(300)), src.captions(range(300))
    for i, cap in enumerate(caps):
        main = f"a {S.SIZES[a['size'][i, 0]]} {src.class_names[a['y'][i]]}"
        assert cap.startswith(main), (cap, main)
        assert src.class_names[a["y"][i]] == f"{S.COLOUR_NAMES[a['colour'][i, 0]]} {S.SHAPES[a['shape'][i, 0]]}"
        if a["count"][i] == 1:
            assert cap == main
            continue
        dx, dy = a["cx"][i, 0] - a["cx"][i, 1], a["cy"][i, 0] - a["cy"][i, 1]  # y points down
        rel = ("left of" if dx < 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
        second = f"{S.SIZES[a['size'][i, 1]]} {S.COLOUR_NAMES[a['colour'][i, 1]]} {S.SHAPES[a['shape'][i, 1]]}"
        assert cap.startswith(f"{main} {rel} a {second}"), cap
        assert cap.count(", and a ") == (a["count"][i] == 3)


def test_pixels_agree_with_the_labels():
    """The pixel at the main object's centre (drawn last, on top) is nearest the main colour."""
    src = data.load("shapes-64-test:200")
    a, x = src.attributes(range(200)), (src.arrays()[0] + 1) / 2
    palette = torch.tensor(list(S.COLOURS.values()))
    for i in range(200):
        r, c = int(a["cy"][i, 0] * 64), int(a["cx"][i, 0] * 64)
        centre = x[i, :, r, c]
        assert int(((palette - centre) ** 2).sum(1).argmin()) == a["colour"][i, 0], i


# ------------------------------------------------------------------------------ classifier
def _documented():
    _, info = fx.load_shapes_classifier()
    return info["test_accuracy"]


@pytest.mark.parametrize("res", [32, 64])
def test_shipped_classifier_matches_its_documented_accuracy(res):
    doc = _documented()[str(res)]
    src = data.load(f"shapes-{res}-test:256")
    x, y = src.arrays()
    a = src.attributes(range(256))
    pred = fx.shapes_predict(x)
    assert float((pred["shape"].numpy() == a["shape"][:, 0]).mean()) >= doc["shape"] - 0.06
    assert float((pred["colour"].numpy() == a["colour"][:, 0]).mean()) >= doc["colour"] - 0.04
    assert float((pred["size"].numpy() == a["size"][:, 0]).mean()) >= doc["size"] - 0.06
    assert float((pred["count"].numpy() == a["count"]).mean()) >= doc["count"] - 0.08
    acc = fx.shapes_accuracy(x, y)
    assert acc >= doc["shape+colour"] - 0.06
    assert fx.shapes_accuracy(x, (y + 1) % 24) < 0.2  # wrong labels are caught
    f = fx.shapes_features()(x[:8])
    assert f.shape == (8, fx.ShapesFeatures.dim) and torch.isfinite(f).all()


def test_shipped_classifier_file_is_small_and_documented():
    assert fx.SHAPES_WEIGHTS.stat().st_size < 2 * 2**20
    _, meta = fx._load_safetensors(fx.SHAPES_WEIGHTS)
    info = json.loads(meta["unifusion"])
    assert {"command", "date", "test_accuracy"} <= set(info) and set(info["test_accuracy"]) == {"32", "64"}


def test_evaluation_uses_the_shapes_network_and_the_test_split():
    assert isinstance(E.feature_extractor((3, 32, 32), None, "shapes-32"), fx.ShapesFeatures)
    assert isinstance(E.feature_extractor((3, 64, 64), None, "shapes-64-train:1000"), fx.ShapesFeatures)
    with pytest.raises(ValueError, match="no built-in feature network"):
        E.feature_extractor((3, 32, 32), None, "some/folder")
    assert E.held_out_spec("shapes-64-train:1000", {"seed": 2}) == (f"shapes-64-test:{E.SHAPES_HELD_OUT}", {"seed": 2})
    assert E.held_out_spec("shapes") == (f"shapes-32-test:{E.SHAPES_HELD_OUT}", {})
    assert E.held_out_spec("shapes-32-test") is None


def test_score_reports_shapes_accuracy(tmp_path):
    ref = E.reference("shapes-32-train:300", {}, fx.shapes_features(), tmp_path)
    assert ref.shapes and not ref.digits and len(ref.held_out) == E.SHAPES_HELD_OUT
    x, y = data.load("shapes-32-test:200").arrays()
    row = E.score(x, y, ref, {"sampler": "real", "nfe": 0, "grid": "-", "cfg_scale": 1.0, "seconds": 0.0})
    assert row.accuracy == pytest.approx(fx.shapes_accuracy(x, y)) and row.accuracy > 0.5


# ------------------------------------------------------------------------------ training
def test_two_training_steps_on_shapes_32(tmp_path):
    from unifusion.cli import main
    out = tmp_path / "run"
    assert main(["train", "--data", "shapes-32", "--network", "unet-32", "--steps", "2", "--batch-size", "4",
                 "--sample-every", "0", "--sample-nfe", "2", "--checkpoint-every", "2", "--warmup-steps", "1",
                 "--out", str(out)]) == 0
    spec = json.loads((out / "model" / "spec.json").read_text())
    assert spec["data"]["source"] == "shapes-32" and spec["data"]["shape"] == [3, 32, 32]
    assert spec["data"]["levels"] == 256


# ------------------------------------------------------------------------------ the t2i variant
def test_standard_variant_output_is_pinned():
    """The standard set must not change (the shipped classifier, FID references and trained models
    depend on it): a fingerprint of its first 64 test images at 32 and 64 and their captions,
    taken before the t2i variant was added."""
    import hashlib
    h = hashlib.sha256()
    for res in (32, 64):
        src = data.load(f"shapes-{res}-test:64")
        x = src.images(range(64)).numpy()
        h.update(np.round((x + 1) * 127.5).astype(np.uint8).tobytes())
        h.update("|".join(src.captions(range(64))).encode())
    assert h.hexdigest() == "20e434126ed9d49e6e0ccc3e28bef1bf542615f6855c5f8e5f2ed04296fceb44"
    assert data.load("shapes-32-test:5").variant == "standard"


def test_t2i_names():
    cases = {"shapes-t2i": (32, "train", 50_000), "shapes-t2i-64": (64, "train", 50_000),
             "shapes-t2i-32-test": (32, "test", 10_000), "shapes-t2i-64-train:300": (64, "train", 300)}
    for name, (res, split, n) in cases.items():
        src = data.load(name)
        assert (src.variant, src.resolution, src.split, len(src)) == ("t2i", res, split, n), name
        assert name.split(":")[0] in data.names()
        assert src.source.startswith(f"shapes-t2i-{res}-{split}(n={n}")
        p = S.parse(name)
        assert S.parse(S.name(p["variant"], p["resolution"], p["split"], p["n"])) == p
    assert S.parse("shapes-32")["variant"] == "standard" and S.parse("shapes-t2i-48") is None
    with pytest.raises(ValueError, match="unknown shapes variant"):
        S.ShapesSource(variant="easy")
    src = data.load("shapes-t2i-32-test:8")
    assert (src.kind, src.num_classes, src.shape) == ("image", 24, (3, 32, 32))
    data.check_batch(src.batch([0, 1]), need_cond=True)


@pytest.mark.parametrize("split", ["train", "test"])
def test_t2i_deterministic_and_resolution_free(split):
    a, b = data.load(f"shapes-t2i-32-{split}:60"), data.load(f"shapes-t2i-32-{split}:5000")
    x = a.batch(range(60))["x0"]
    assert torch.equal(x, b.batch(range(60))["x0"])  # independent of the split's length and instance
    batch = a.batch([9, 3, 59])
    for row, i in enumerate([9, 3, 59]):
        assert torch.equal(batch["x0"][row], a[i]["x0"])
    a64 = data.load(f"shapes-t2i-64-{split}:60")
    for k, v in a.attributes(range(60)).items():
        np.testing.assert_array_equal(v, a64.attributes(range(60))[k])
    assert (torch.nn.functional.avg_pool2d(a64.arrays()[0], 2) - x).abs().mean() < 0.03
    other = data.load(f"shapes-t2i-32-{split}:60", seed=1).batch(range(60))["x0"]
    assert (other - x).abs().flatten(1).amax(1).min() > 0.1
    std = data.load(f"shapes-32-{split}:60").batch(range(60))["x0"]
    assert (std - x).abs().flatten(1).amax(1).min() > 0.1  # not the standard images


def test_t2i_train_split_has_no_held_out_combination():
    n = 20_000
    a = data.load(f"shapes-t2i-32-train:{n}").attributes(range(n))
    kinds = S.held_out_kinds(a)
    assert set(kinds) == set(S.HELD_OUT) and not S.is_held_out(a).any()
    assert set(S.HELD_OUT.values()) == {"colour-shape", "relation"}
    # the rest is still there: every other colour-shape pair and every other (shape, relation, shape)
    present = a["count"][:, None] > np.arange(3)[None]
    pairs = {(int(c), int(s)) for c, s in zip(a["colour"][present], a["shape"][present])}
    assert pairs == {(c, s) for c in range(8) for s in range(3)} - set(S.HELD_OUT_PAIRS)
    two = a["count"] == 2
    triples = set(zip(a["shape"][two, 0].tolist(), a["relation"][two].tolist(), a["shape"][two, 1].tolist()))
    assert len(triples) == 3 * 4 * 3 - len(S.HELD_OUT_RELATIONS)
    assert (1, 3, 0) in triples  # the converse caption of the held-out relation is not held out
    # a pure function of (seed, global index): re-drawn items equal their single-item draws
    src = data.load(f"shapes-t2i-32-train:{n}")
    first = S.scenes_t2i(0, np.arange(200))  # draw stream 0: what the test split would hold
    redrawn = np.nonzero(S.is_held_out({"shape": first["shape"], "colour": first["colour"],
                                        "relation": S._relation(first)}))[0]
    assert len(redrawn) > 10
    x = src.batch(range(200))["x0"]
    for i in redrawn[:5]:
        assert torch.equal(src[int(i)]["x0"], x[i])


def test_t2i_test_split_has_held_out_combinations_at_their_natural_rate():
    n = 20_000
    a = data.load(f"shapes-t2i-32-test:{n}").attributes(range(n))
    kinds = S.held_out_kinds(a)
    # one or two objects with equal probability; uniform shapes, colours and relations
    p_pair = 0.5 / 24 + 0.5 * (1 - (23 / 24) ** 2)
    p_rel = 0.5 * (1 / 3) * (1 / 3) * (1 / 4)
    for name, kind in S.HELD_OUT.items():
        p = p_pair if kind == "colour-shape" else p_rel
        assert abs(kinds[name].mean() - p) < 4 * np.sqrt(p * (1 - p) / n), (name, kinds[name].mean(), p)
    assert S.is_held_out(a).mean() == pytest.approx(np.mean(list(kinds.values()), 0).astype(bool).mean())


def test_t2i_scenes_follow_the_variant_rules():
    n = 4000
    src = data.load(f"shapes-t2i-32-test:{n}")
    s, a = src.scenes(range(n)), src.attributes(range(n))
    assert set(np.unique(a["count"])) == {1, 2} and abs((a["count"] == 2).mean() - 0.5) < 0.04
    assert (a["shape"][:, 2] == -1).all() and set(np.unique(a["relation"])) == {-1, 0, 1, 2, 3}
    np.testing.assert_array_equal(a["y"], a["shape"][:, 0] * 8 + a["colour"][:, 0])
    two = a["count"] == 2
    # sizes: the main object >= 1.16x the other; a large other only beside a large main
    assert (a["scale"][two, 0] >= 1.16 * a["scale"][two, 1]).all()
    assert not ((a["size"][:, 1] == 1) & (a["size"][:, 0] == 0)).any()
    for k, table in ((0, S.T2I_MAIN_SCALE), (1, S.T2I_OTHER_SCALE)):
        present = a["count"] > k
        for size, (lo, hi) in table.items():
            sel = present & (a["size"][:, k] == size)
            assert sel.any() and (a["scale"][sel, k] >= lo).all() and (a["scale"][sel, k] <= hi).all()
    # the smallest object still spans >= ~8 px at 32x32 (its bounding box's larger side >= 6.5 px)
    boxes = [S._box(s["shape"][:, k], s["scale"][:, k], s["angle"][:, k]) for k in range(2)]
    span = np.maximum(boxes[1][1] - boxes[1][0], boxes[1][3] - boxes[1][2])[two] * 32
    assert span.min() >= 7.0 and np.median(span) >= 8.0
    # inside the image, apart, and the relation unambiguous (dominant axis by >= 1.3x)
    for k in range(2):
        present = a["count"] > k
        x_lo, x_hi, y_lo, y_hi = (v[present] for v in boxes[k])
        cx, cy = s["cx"][present, k], s["cy"][present, k]
        assert min((cx + x_lo).min(), (cy + y_lo).min(), 1 - (cx + x_hi).max(), 1 - (cy + y_hi).max()) \
            >= S.T2I_MARGIN - 1e-9
    (ax0, ax1, ay0, ay1), (bx0, bx1, by0, by1) = boxes
    gap = np.maximum.reduce([s["cx"][:, 1] + bx0 - s["cx"][:, 0] - ax1, s["cx"][:, 0] + ax0 - s["cx"][:, 1] - bx1,
                             s["cy"][:, 1] + by0 - s["cy"][:, 0] - ay1, s["cy"][:, 0] + ay0 - s["cy"][:, 1] - by1])
    assert (gap[two] >= S.T2I_GAP - 1e-9).all()
    dx, dy = np.abs(a["cx"][:, 0] - a["cx"][:, 1]), np.abs(a["cy"][:, 0] - a["cy"][:, 1])
    assert (np.maximum(dx, dy)[two] >= S.T2I_DOMINANCE * np.minimum(dx, dy)[two] - 1e-9).all()


def test_t2i_background_is_plain_and_captions_match():
    n = 300
    src = data.load(f"shapes-t2i-32-test:{n}")
    s, a, caps = src.scenes(range(n)), src.attributes(range(n)), src.captions(range(n))
    x = (src.arrays()[0].numpy() + 1) / 2
    # pixels at least 1.5 px outside both objects' bounding boxes: a gray with a weak gradient only
    p = (np.arange(32) + 0.5) / 32
    far = np.ones((n, 32, 32), bool)
    for k in range(2):
        x_lo, x_hi, y_lo, y_hi = S._box(s["shape"][:, k], s["scale"][:, k], s["angle"][:, k])
        m = 1.5 / 32
        inside = ((p[None, None, :] > (s["cx"][:, k] + x_lo - m)[:, None, None])
                  & (p[None, None, :] < (s["cx"][:, k] + x_hi + m)[:, None, None])
                  & (p[None, :, None] > (s["cy"][:, k] + y_lo - m)[:, None, None])
                  & (p[None, :, None] < (s["cy"][:, k] + y_hi + m)[:, None, None]))
        far &= ~(inside & (a["count"] > k)[:, None, None])
    for i in range(n):
        bg = x[i][:, far[i]]
        assert (bg.max(1) - bg.min(1)).max() <= S.T2I_BACKGROUND["grad"][1] * np.sqrt(2) + 2 / 255, i
    for i, cap in enumerate(caps):
        words = [f"a {S.SIZES[a['size'][i, k]]} {S.COLOUR_NAMES[a['colour'][i, k]]} {S.SHAPES[a['shape'][i, k]]}"
                 for k in range(a["count"][i])]
        want = words[0] if a["count"][i] == 1 else f"{words[0]} {S.RELATIONS[a['relation'][i]]} {words[1]}"
        assert cap == want
