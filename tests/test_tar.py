"""data/tar.py: WebDataset-format tar shards as a map-style streaming source, and write_shards.

Checked against the reference implementation: shards written by `webdataset`'s writer read the
same through TarShardSource, and our shards iterate the same through `webdataset.WebDataset`
(keys, images, labels, captions, in shard order). Digits round-trip to within half an 8-bit
level and their 17 levels back exactly; StepBatches over shards is the same for any worker
count, splits exactly across ranks and resumes exactly; indexing reads headers, not images."""
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from unifusion import data
from unifusion.data import tar
from unifusion.data.images import _to_uint8

HALF_LEVEL = 1 / 255 + 1e-6  # half an 8-bit level, in the [-1, 1] scale


@pytest.fixture(scope="module")
def digits():
    return data.digits("train")


def _levels(x):
    """Digits pixels x = k / 16 * 2 - 1 -> k (0..16)."""
    return ((x + 1) / 2 * 16).round().to(torch.int64)


def _wds_write(ds, pattern, per_shard, captions=True):
    """The reference writer: webdataset.ShardWriter, keys as write_shards names them."""
    wds = pytest.importorskip("webdataset")
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i in range(len(ds)):
            sample = {"__key__": f"{i:06d}", "png": _to_uint8(ds.x[i]), "cls": int(ds.y[i])}
            if captions:
                sample["txt"] = f"a handwritten {int(ds.y[i])}"
            sink.write(sample)


def _wds_read(paths):
    """The reference reader's samples, in order: (key, image (C, H, W) in [-1, 1], cls bytes, txt)."""
    wds = pytest.importorskip("webdataset")
    out = []
    for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False):
        a = np.asarray(Image.open(io.BytesIO(s["png"])), dtype=np.float32) / 255 * 2 - 1
        out.append((s["__key__"], torch.from_numpy(a)[None], s.get("cls"), s.get("txt")))
    return out


# ----------------------------------------------------------------------- round trip, reference
@pytest.fixture(scope="module")
def ours(tmp_path_factory, digits):
    """The digits' train split as 4 shards by write_shards, its source and its decoded pixels."""
    paths = data.write_shards(digits, tmp_path_factory.mktemp("ours"), per_shard=400)
    src = data.load(str(paths[0].parent))
    return paths, src, src.arrays()[0]


def test_write_shards_round_trip(tmp_path, digits, ours):
    paths, src, x = ours
    assert [p.name for p in paths] == [f"shard-{s:06d}.tar" for s in range(4)]  # 400, 400, 400, 300
    assert isinstance(src, data.TarShardSource) and src.source == str(paths[0].parent)
    assert (len(src), src.shape, src.kind, src.num_classes) == (1500, (1, 8, 8), "image", 10)
    assert src.keys == [f"{i:06d}" for i in range(1500)] and src.class_names == digits.class_names
    assert torch.equal(src.labels, digits.y) and torch.equal(src.arrays(7)[1], digits.y[:7])
    # 8 bits cannot hold k/16 exactly (255 k / 16 is not an integer), so each pixel is within half
    # a level; the 17 levels are 15.9 8-bit levels apart, so rounding back recovers k exactly
    assert (x - digits.x).abs().max() <= HALF_LEVEL
    assert torch.equal(_levels(x), _levels(digits.x))
    item = src[1234]
    assert set(item) == {"x0", "cond"} and torch.equal(item["x0"], x[1234]) and item["cond"]["y"].shape == ()
    assert src.caption(0) is None and src.captions([1, 2]) == [None, None]
    # the same decode path as image folders: bit-identical pixels
    data.write_image_folder(data.ArrayDataset(digits.x[:50], digits.y[:50], 10), tmp_path / "folder")
    mem = data.image_folder(tmp_path / "folder")  # class-major order
    order = sorted(range(50), key=lambda i: (int(digits.y[i]), i))
    assert torch.equal(mem.x, x[order])
    # deterministic bytes (fixed member metadata); a non-empty folder is refused
    again = data.write_shards(data.ArrayDataset(digits.x[:400], digits.y[:400], 10), tmp_path / "again", 400)
    assert again[0].read_bytes() == paths[0].read_bytes()
    with pytest.raises(FileExistsError, match="not empty"):
        data.write_shards(digits, tmp_path / "again")
    with pytest.raises(ValueError, match="expects images"):
        data.write_shards(data.load("moons", n=4), tmp_path / "vectors")


def test_same_samples_as_the_reference_writer_and_reader(tmp_path, digits, ours):
    pytest.importorskip("webdataset")
    paths, a, x = ours
    (tmp_path / "wds").mkdir()
    _wds_write(digits, str(tmp_path / "wds" / "train-%06d.tar"), 400)
    b = data.load(str(tmp_path / "wds/train-{000000..000003}.tar"))
    assert isinstance(b, data.TarShardSource) and len(b.shards) == 4
    assert b.keys == a.keys and torch.equal(b.labels, digits.y) and b.num_classes == 10 and b.class_names is None
    assert torch.equal(b.arrays()[0], x)  # webdataset's PNG encoder and ours: identical pixels
    assert b.captions([0, 7]) == [f"a handwritten {int(digits.y[i])}" for i in (0, 7)]
    # the reference reader sees the same samples in the same order in both shard sets
    for shards, src in ((paths, a), (b.shards, b)):
        ref = _wds_read(shards)
        assert [k for k, *_ in ref] == src.keys
        assert torch.equal(torch.stack([im for _, im, *_ in ref]), x)
        assert [int(c) for _, _, c, _ in ref] == digits.y.tolist()
        assert [t for *_, t in ref][:2] == ([None, None] if src is a else [s.encode() for s in b.captions([0, 1])])


def test_json_labels_rgb_unlabelled_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    px[1] = (100, 150, 200)  # the JPEG one: flat, so nearly lossless

    def shard(path, meta):
        with tarfile.open(path, "w") as tf:
            for i, m in enumerate(meta):
                members = {"jpg" if i == 1 else "png": _encode(px[i], "JPEG" if i == 1 else "PNG")}
                members.update(m)
                for ext, blob in members.items():
                    _add(tf, f"d/{i}.{ext}", blob)

    shard(tmp_path / "j.tar", [{"json": json.dumps({"label": i % 3, "w": 1}).encode()} for i in range(6)])
    src = tar.TarShardSource(tmp_path / "j.tar")
    assert src.keys == [f"d/{i}" for i in range(6)] and src.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert src.shape == (3, 4, 5) and src.num_classes == 3 and src.class_names is None
    assert torch.equal(src[0]["x0"], torch.from_numpy(px[0]).permute(2, 0, 1) / 255 * 2 - 1)
    assert (src[1]["x0"] - torch.from_numpy(px[1]).permute(2, 0, 1) / 127.5 + 1).abs().max() < 0.05  # JPEG
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b", "c", "d"]))
    named = tar.TarShardSource(tmp_path / "j.tar", channels=1, image_size=2)
    assert named.class_names == ["a", "b", "c", "d"] and named.num_classes == 4 and named.shape == (1, 2, 2)
    (tmp_path / "u").mkdir()
    shard(tmp_path / "u" / "u.tar", [{"txt": b"x"}] * 6)
    unl = data.load(str(tmp_path / "u"))
    assert unl.num_classes == 0 and unl.labels is None and set(unl[3]) == {"x0"}
    shard(tmp_path / "m.tar", [{"cls": b"1"}] * 3 + [{}] * 3)
    with pytest.raises(ValueError, match="label every sample"):
        tar.TarShardSource(tmp_path / "m.tar")
    shard(tmp_path / "bad.tar", [{"cls": b"one"}] * 6)
    with pytest.raises(ValueError, match=r"d/0\.cls holds 'one'"):
        tar.TarShardSource(tmp_path / "bad.tar")


def _encode(a, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def _add(tf, name, blob):
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tf.addfile(info, io.BytesIO(blob))


# -------------------------------------------------------------------------- the training order
def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(_equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k])
                                    for k in a)


def test_step_batches_workers_ranks_and_resume(tmp_path, digits):
    n, B, steps = 60, 8, 16  # 7 steps per epoch: crosses two epoch boundaries
    data.write_shards(data.ArrayDataset(digits.x[:n], digits.y[:n], 10), tmp_path, per_shard=16)
    src = data.load(str(tmp_path / "shard-{000000..000003}.tar"))
    assert len(src) == n and len(src.shards) == 4
    with data.StepBatches(src, seed=5, batch_size=B, num_workers=0) as it:
        one = [next(it) for _ in range(steps)]
    order = data.StepOrder(n, 5, B)
    for k, batch in enumerate(one):
        idx = order.indices(k)
        assert torch.equal(batch["x0"], torch.stack([src[i]["x0"] for i in idx]))
        assert batch["cond"]["y"].tolist() == src.labels[idx].tolist() == digits.y[idx].tolist()
    # two ranks: rank r's batch is the r::2 interleave of the one-rank batch
    ranks = []
    for r in (0, 1):
        with data.StepBatches(src, 5, B, world_size=2, rank=r, end_step=steps) as it:
            ranks.append(list(it))
    for k in range(steps):
        for r in (0, 1):
            assert torch.equal(ranks[r][k]["x0"], one[k]["x0"][r::2])
            assert torch.equal(ranks[r][k]["cond"]["y"], one[k]["cond"]["y"][r::2])
    # DataLoader workers (forked, sharing the open shard descriptors) give the same batches
    with data.StepBatches(src, 5, B, num_workers=2, prefetch_factor=1, end_step=steps) as it:
        assert all(_equal(a, b) for a, b in zip(it, one, strict=True))
    # a restart at step 9 with workers continues exactly
    with data.StepBatches(src, 5, B, start_step=9, num_workers=2, end_step=steps) as it:
        rest = list(it)
    assert len(rest) == steps - 9 and all(_equal(a, b) for a, b in zip(rest, one[9:]))
    # spawned workers get a pickled copy: it reopens the shards and reads the same
    copy = pickle.loads(pickle.dumps(src))
    assert copy._fds == {} and _equal(copy[17], src[17])


# -------------------------------------------------------------------------------- bad input
def _intact_members(path):
    members, damage = tar._scan(path)
    assert damage is None
    return {f"{k}.{e}": (off, size) for k, e, off, size in members}


@pytest.mark.parametrize("where", ["inside an image", "inside a label", "between samples"])
def test_truncated_shard(tmp_path, digits, where):
    paths = data.write_shards(data.ArrayDataset(digits.x[:30], digits.y[:30], 10), tmp_path, per_shard=10)
    m = _intact_members(paths[1])  # keys 000010 .. 000019; members png then cls
    cut = {"inside an image": m["000014.png"][0] + 10, "inside a label": m["000014.cls"][0],
           # after sample 14's last member (its data padded to a block): nothing says it is complete
           "between samples": m["000015.png"][0] - 512}[where]
    with open(paths[1], "r+b") as f:
        f.truncate(cut)
    with pytest.raises(ValueError, match="skip-corrupt") as e:
        data.load(str(tmp_path))
    assert str(paths[1]) in str(e.value) and "truncated" in str(e.value)
    with pytest.warns(UserWarning, match="shard-000001.tar is truncated") as w:
        src = data.load(str(tmp_path), skip_corrupt=True)
    assert len(w) == 1 and "4 intact" in str(w[0].message) and "1 incomplete" in str(w[0].message)
    kept = list(range(10)) + list(range(10, 14)) + list(range(20, 30))
    assert src.keys == [f"{i:06d}" for i in kept] and src.skipped == [f"{paths[1]}:000014"]
    x, y = src.arrays()
    assert torch.equal(y, digits.y[kept]) and torch.equal(_levels(x), _levels(digits.x[kept]))


def test_missing_image_member_mixed_sizes_and_corrupt_images(tmp_path):
    with tarfile.open(tmp_path / "n.tar", "w") as tf:
        _add(tf, "0.png", _encode(np.zeros((8, 8), np.uint8)))
        _add(tf, "1.cls", b"1")  # no image
        _add(tf, "1.txt", b"a caption")
    with pytest.raises(ValueError, match=r"n\.tar: sample 1 has no image member \(its members: 1.cls, 1.txt\).*"
                                         r"--skip-corrupt"):
        tar.TarShardSource(tmp_path / "n.tar")
    with pytest.warns(UserWarning, match="sample 1 has no image"):
        src = tar.TarShardSource(tmp_path / "n.tar", skip_corrupt=True)
    assert src.keys == ["0"] and src.skipped == [f"{tmp_path / 'n.tar'}:1"]
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for i, (h, w) in enumerate([(8, 8), (8, 8), (9, 8)]):
            _add(tf, f"{i}.png", _encode(np.full((h, w), 30 * i, np.uint8)))
        _add(tf, "3.png", b"not a png")
    src = tar.TarShardSource(tmp_path / "s.tar", skip_corrupt=True, probe=2)
    with pytest.raises(ValueError, match="--image-size N") as e:  # not probed: found when read
        src[2]
    assert "s.tar:0.png is 8x8" in str(e.value) and "s.tar:2.png is 8x9" in str(e.value)
    with pytest.raises(ValueError, match="--image-size N"):  # probed: found at once
        tar.TarShardSource(tmp_path / "s.tar", skip_corrupt=True)
    with pytest.warns(UserWarning, match="unreadable image .*s.tar:3.png is replaced"):
        assert torch.equal(src[3]["x0"], src[0]["x0"])  # the next readable index, cyclically
    resized = tar.TarShardSource(tmp_path / "s.tar", image_size=8, skip_corrupt=True, probe=1)
    assert resized[2]["x0"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"cannot read image .*s\.tar:3\.png.*--skip-corrupt"):
        tar.TarShardSource(tmp_path / "s.tar", image_size=8, probe=1)[3]


def test_braces_missing_shards_and_load_dispatch(tmp_path, digits):
    e = tar.expand_braces
    assert e("s-{000008..000011}.tar") == [f"s-{i:06d}.tar" for i in range(8, 12)]
    assert e("{9..11}") == ["9", "10", "11"] and e("{3..1}") == ["3", "2", "1"] and e("{0..10..5}") == ["0", "5", "10"]
    assert e("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"] and e("x{a,{b,c}}") == ["xa", "xb", "xc"]
    assert e("{x}y{") == ["{x}y{"] and e("plain.tar") == ["plain.tar"]
    paths = data.write_shards(data.ArrayDataset(digits.x[:20], digits.y[:20], 10), tmp_path / "s", per_shard=8)
    assert len(paths) == 3
    pattern = str(tmp_path / "s" / "shard-{000000..000002}.tar")
    assert data.load(pattern).keys == data.load(str(tmp_path / "s")).keys == [f"{i:06d}" for i in range(20)]
    assert data.load(str(paths[2])).keys == [f"{i:06d}" for i in range(16, 20)]
    with pytest.raises(ValueError, match=r"2 of the 5 shards .* do not exist: .*shard-000003\.tar \(and 1 more\)"):
        data.load(str(tmp_path / "s" / "shard-{000000..000004}.tar"))
    with pytest.raises(ValueError, match="nope.tar does not exist"):
        data.load(str(tmp_path / "nope.tar"))
    assert data.load(pattern, image_size=4, channels=3, probe=1).shape == (3, 4, 4)
    with pytest.raises(ValueError, match="does not take"):
        data.load(pattern, size=4)
    # a folder with images stays an image folder, even beside shards
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "s" / "x.png")
    assert isinstance(data.load(str(tmp_path / "s")), data.ImageFolderSource)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .tar shards in folder"):
        tar.TarShardSource(tmp_path / "empty")
    (tmp_path / "c.tar").write_bytes(b"\x1f\x8b" + bytes(600))
    with pytest.raises(ValueError, match="gzip-compressed"):
        data.load(str(tmp_path / "c.tar"))


# ------------------------------------------------------------------------------ streaming
def test_indexing_reads_headers_and_labels_not_images(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    n, probe = 40, 3
    x = torch.from_numpy(rng.integers(0, 256, (n, 3, 64, 64))).float() / 127.5 - 1
    data.write_shards(data.ArrayDataset(x, torch.arange(n) % 4, 4), tmp_path, per_shard=15)
    reads, decodes = [], []  # (offset, bytes) of every read of shard bytes; decoded image names

    class Counting(io.FileIO):
        def read(self, size=-1):
            pos, b = self.tell(), super().read(size)
            reads.append((pos, len(b)))
            return b

    real_pread, real_decode = tar._pread_exact, tar.decode_bytes
    monkeypatch.setattr(tar, "open", lambda p, mode, buffering: Counting(p, "rb"), raising=False)
    monkeypatch.setattr(tar, "_pread_exact",
                        lambda fd, size, off: reads.append((off, size)) or real_pread(fd, size, off))
    monkeypatch.setattr(tar, "decode_bytes", lambda b, name, s: decodes.append(name) or real_decode(b, name, s))
    src = tar.TarShardSource(tmp_path, probe=probe)
    assert len(src) == n and src.shape == (3, 64, 64) and len(decodes) == probe
    # what indexing may read: per member a 512-byte header and the byte before the next one
    # (tarfile's end-of-data check), each 1-byte .cls label, the end-of-archive block of each of
    # the 3 shards (twice: tarfile, then our check), and the probed images; one more image
    # (> 12 kB) would exceed it
    image_bytes = [int(s) for _, s in src._img]
    allowed = n * 2 * (512 + 1) + n * 1 + 3 * 2 * 512 + sum(image_bytes[:probe])
    assert min(image_bytes) > 12_000 and sum(b for _, b in reads) <= allowed < sum(image_bytes) / 3
    assert src[5]["x0"].shape == (3, 64, 64) and len(decodes) == probe + 1
