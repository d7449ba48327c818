"""Text-to-image in miniature: the contrastive text-image encoder family, text conditioning of the
denoisers (SD-style cross-attention UNet, SD3-style MM-DiT), prompts, a transformers text model as
the frozen conditioner, and every bad input as one clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from unifusion import checkpoint, cli, models
from unifusion import config as C
from unifusion import data as datasets
from unifusion.training import loop as L

from .test_training import _cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DATA = "shapes-32-train:256"
ENC = {"family": "text-image", "data": DATA, "width": 16, "layers": 1, "heads": 2, "embed_dim": 16,
       "image_channels": 8, "batch_size": 16, "steps": 4, "checkpoint_every": 2, "sample_every": 0, "log_every": 1,
       "warmup_steps": 1, "lr": 1e-3}
T2I = {"data": DATA, "network": "unet-32", "network_args": {"model_channels": 8}, "batch_size": 8, "steps": 3,
       "checkpoint_every": 3, "sample_every": 0, "sample_nfe": 2, "log_every": 1, "warmup_steps": 1}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "run"
    L.train(C.from_dict({**ENC, "out": str(out)}), progress=False)
    return out / "model"


@pytest.fixture(scope="module")
def t2i(encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "run"
    L.train(C.from_dict({**T2I, "text_encoder": str(encoder), "out": str(out)}), progress=False)
    return out


# ------------------------------------------------------------------------------ the encoder family
def test_the_encoder_is_a_family_with_its_tokenizer(encoder):
    m = models.load(encoder)
    assert m.spec.family == "text-image" and (encoder / "tokenizer.json").is_file()
    assert json.loads((encoder / "tokenizer.json").read_text()) == json.loads(m.spec.training["tokenizer"])
    # the vocabulary is the captions' words; the context holds the longest caption
    src = datasets.load(DATA)
    words = {w for c in src.captions(range(256)) for w in c.replace(",", " , ").split()}
    assert words <= set(json.loads(m.spec.training["tokenizer"])["model"]["vocab"])
    tokens, mask, pooled = m.encode_text(["a large red square", ""])
    assert tokens.shape == (2, m.context_length, 16) and pooled.shape == (2, 16)
    assert mask[1].sum() == 2  # the null caption: BOS EOS
    assert m.spec.training["loss"] == "clip"
    with pytest.raises(NotImplementedError, match="cannot sample"):
        m.sample(n=1)


def test_siglip_starts_at_open_clip_values():
    m = models.build(C.model_spec(C.from_dict({**ENC, "loss": "siglip"}), datasets.load(DATA)))
    assert m.logit_scale.item() == pytest.approx(np.log(10)) and m.logit_bias.item() == -10.0
    assert m.logit_bias.requires_grad
    clip = models.build(C.model_spec(C.from_dict(ENC), datasets.load(DATA)))
    assert clip.logit_scale.item() == pytest.approx(np.log(1 / 0.07)) and not clip.logit_bias.requires_grad


def test_contrastive_loss_is_the_clip_loss_of_the_towers():
    from unifusion import contrastive
    m = models.build(C.model_spec(C.from_dict(ENC), datasets.load(DATA))).double()
    batch = datasets.captioned(datasets.load(DATA)).batch(range(6))
    batch["x0"] = batch["x0"].double()
    img, txt = m.embed_images(batch["x0"]).double(), m.embed_texts(batch["cond"]["caption"])
    want = contrastive.clip_loss_naive(img, txt, m.logit_scale)
    torch.testing.assert_close(m(batch).mean(), want)


def test_encoder_two_ranks_equal_one_rank(tmp_path):
    """The contrastive loss gathers features over ranks: 2 gloo ranks (8 rows each) end with the
    weights of 1 process on the global batch of 16."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [f"--{k}={v}" for k, v in {**ENC, "steps": 3, "checkpoint_every": 3}.items()]
    one = subprocess.run(_cli("train", *flags, f"--out={tmp_path / 'one'}"), capture_output=True, text=True,
                         timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "unifusion", "train", *flags, f"--out={tmp_path / 'two'}"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a, b = (checkpoint.load(tmp_path / n)[0]["model"] for n in ("one", "two"))
    for k in a:
        # the key part of an attention bias has true gradient 0 (softmax ignores a shift shared by all
        # keys), so Adam normalises reduction round-off there: 1e-3 of its size; a wrong split would
        # move it by ~lr = 1e-3 per step
        atol = 1e-3 * float(a[k].abs().max()) if k.endswith("qkv.bias") else 1e-6
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=atol, msg=k)


def test_eval_of_the_encoder_reports_retrieval_and_zero_shot(encoder, tmp_path, capsys):
    assert cli.main(["eval", "--checkpoint", str(encoder), "--n", "64", "--out", str(tmp_path / "ev")]) == 0
    r = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(r["retrieval"]["image_to_text"]) == {"r@1", "r@5"}
    assert set(r["zero_shot"]) == {"colour", "shape", "size", "position"}


# ------------------------------------------------------------------------------ text conditioning
def test_a_text_model_records_its_encoder_and_attends_to_it(t2i, encoder):
    m = models.load(t2i)
    cond = m.spec.conditioning
    assert cond["kind"] == "text" and cond["encoder"]["path"] == str(encoder.resolve())
    assert m.spec.network["kwargs"]["context_dim"] == cond["encoder"]["width"] == 16
    assert len(cond["preview_prompts"]) == 8 and (t2i / "samples" / "latest.png").is_file()
    x = m.sample(seeds=range(3), prompts=["a large red square"], nfe=2, cfg=2.0)
    assert x.shape == (3, 3, 32, 32) and torch.isfinite(x).all()
    # the same seed and prompt give the same sample whatever the batch
    y = m.sample(seeds=[1], prompts=["a large red square"], nfe=2, cfg=2.0)
    torch.testing.assert_close(y[0], x[1])


def test_captions_are_encoded_once_and_dropped_to_the_null_caption(t2i):
    m = models.load(t2i)
    enc = m.cond.encoder()
    calls = []
    real = enc.encode
    enc.encode = lambda caps: calls.append(list(caps)) or real(caps)
    caps = ["a small red circle", "a large blue square", "a small red circle"]
    x = torch.randn(3, 3, 32, 32)
    m.denoise(x, torch.ones(3), caption=caps)
    m.denoise(x, torch.ones(3) * 2, caption=caps)
    assert calls == [sorted(set(caps))]  # one encoder call, each distinct caption once
    dropped = m.cond.drop({"caption": caps}, torch.tensor([True, False, False]))
    assert dropped["caption"] == ["", "a large blue square", "a small red circle"]
    # a prepared (encoded) condition gives the same denoiser output as the captions
    prepared = m.cond.prepare({"caption": caps})
    torch.testing.assert_close(m.denoise(x, torch.ones(3), **prepared), m.denoise(x, torch.ones(3), caption=caps))
    # guidance batches encoded conditions: the same as two calls
    from unifusion.guidance import classifier_free
    null = m.cond.prepare(m.cond.null(3))
    g1 = classifier_free(m.denoise, 3.0, null, batched=True)(x, torch.ones(3), **prepared)
    g2 = classifier_free(m.denoise, 3.0, null, batched=False)(x, torch.ones(3), **prepared)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_text_runs_two_ranks_equal_one_rank(encoder, tmp_path):
    """Captions travel through the loop's batches as lists: 2 gloo ranks == 1 process, with caption
    dropout on (its mask comes from the (seed, step) draws)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kw = {**T2I, "text_encoder": str(encoder), "cond_drop": 0.3, "steps": 2, "checkpoint_every": 2}
    flags = [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in kw.items()]
    one = subprocess.run(_cli("train", *flags, f"--out={tmp_path / 'one'}"), capture_output=True, text=True,
                         timeout=300, env=env)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "unifusion", "train", *flags, f"--out={tmp_path / 'two'}"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a, b = (checkpoint.load(tmp_path / n)[0]["model"] for n in ("one", "two"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_text_run_resumes_exactly(encoder, tmp_path):
    """Stopped after its step-2 checkpoint and resumed (a new process, an empty caption cache): the
    weights of the run that was never stopped."""
    import shutil
    kw = {**T2I, "text_encoder": str(encoder), "cond_drop": 0.3, "steps": 4, "checkpoint_every": 2}
    whole = L.train(C.from_dict({**kw, "out": str(tmp_path / "whole")}), progress=False)
    part = tmp_path / "part"
    shutil.copytree(whole["out"], part)
    shutil.rmtree(part / "model")
    shutil.rmtree(part / "checkpoints" / "step-00000004")
    r = subprocess.run(_cli("train", "--out", str(part), "--resume"), capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (checkpoint.load(p)[0]["model"] for p in (whole["out"], part))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_mmdit_trains_on_text(encoder, tmp_path):
    cfg = C.from_dict({**T2I, "text_encoder": str(encoder), "network": "mmdit-s", "process": "flow",
                       "parametrization": "velocity", "noise_density": "logit_normal", "shift": 3.0,
                       "network_args": {"hidden_size": 16, "depth": 2, "num_heads": 2, "input_size": 32,
                                        "in_channels": 3, "patch_size": 4}, "out": str(tmp_path / "mm")})
    L.train(cfg, progress=False)
    m = models.load(tmp_path / "mm")
    assert m.spec.network["class"] == "MMDiT" and m.spec.grid == {"name": "sd3", "kwargs": {"shift": 3.0}}
    assert m.sample(seeds=range(2), prompts=["a small blue circle", ""], nfe=3, cfg=2.0).shape == (2, 3, 32, 32)


# ------------------------------------------------------------------------------ a transformers encoder
def _tiny_clip(folder, with_tokenizer=True):
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz,":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1)
    transformers.CLIPTextModel(cfg).save_pretrained(str(folder))
    for f in ("vocab.json", "merges.txt"):
        (folder / f).unlink()
    if with_tokenizer:
        tok.save_pretrained(str(folder))
    return folder


def test_a_transformers_clip_text_model_conditions_a_model(tmp_path):
    enc_dir = _tiny_clip(tmp_path / "clip")
    from unifusion.models.text_encoders import load_text_encoder
    enc = load_text_encoder(enc_dir)
    tokens, mask, pooled = enc.encode(["a red square", ""])
    assert tokens.shape == (2, 64, 16) and pooled.shape == (2, 16) and mask[0].sum() > mask[1].sum()
    L.train(C.from_dict({**T2I, "text_encoder": str(enc_dir), "out": str(tmp_path / "run")}), progress=False)
    m = models.load(tmp_path / "run")
    assert m.spec.conditioning["encoder"]["kind"] == "transformers"
    assert m.sample(seeds=[0], prompts=["a red square"], nfe=2).shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------ bad input
def _sample(*args):
    return subprocess.run(_cli("sample", *args), capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bad_text_input_is_one_line_and_writes_nothing(t2i, encoder, tmp_path):
    # --prompt on a model without text conditioning
    digits = tmp_path / "digits"
    L.train(C.from_dict({"data": "digits-train", "network_args": {"model_channels": 8}, "steps": 1, "batch_size": 8,
                         "sample_every": 0, "out": str(digits)}), progress=False)
    for args, match in (
            (["--checkpoint", str(digits), "--prompt", "a red square"], "prompts need a text-conditional model"),
            (["--checkpoint", str(t2i), "--n", "2"], "this model is text-conditional: sample it with prompts")):
        out = tmp_path / "s.npz"
        r = _sample(*args, "--out", str(out), "--nfe", "2")
        assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists()
    # a model meets another encoder (its weights changed): refused by digest
    m = models.load(t2i)
    m.cond.record = {**m.cond.record, "digest": "0" * 64}
    with pytest.raises(ValueError, match="weights changed"):
        m.sample(seeds=[0], prompts=["a red square"], nfe=2)
    # an encoder of the wrong family, a folder that is no encoder, data without captions, a network
    # that cannot attend to text, a transformers folder without its tokenizer
    ae_like = tmp_path / "flow"
    L.train(C.from_dict({"family": "flow-nice", "data": "moons", "steps": 1, "batch_size": 8, "sample_every": 0,
                         "out": str(ae_like)}), progress=False)
    no_tok = _tiny_clip(tmp_path / "clip-no-tokenizer", with_tokenizer=False)
    for kw, match in (({"text_encoder": str(ae_like)}, "is a flow-nice model, not a text encoder"),
                      ({"text_encoder": str(tmp_path / "nothing")}, "does not exist"),
                      ({"text_encoder": str(encoder), "data": "digits-train"}, "has no captions"),
                      ({"text_encoder": str(encoder), "network": "dit-s2"}, "cannot attend to text"),
                      ({"text_encoder": str(no_tok)}, "has no usable tokenizer")):
        out = tmp_path / "refused"
        with pytest.raises(ValueError, match=match):
            L.train(C.from_dict({**T2I, **kw, "out": str(out)}), progress=False)


def test_long_prompts_are_truncated_with_a_warning_and_unknown_words_named(t2i):
    m = models.load(t2i)
    long = " ".join(["a large red square left of a small blue circle"] * 5)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m.sample(seeds=[0], prompts=[long], nfe=2)
        m.sample(seeds=[0], prompts=["a zebra"], nfe=2)
    text = " ".join(str(x.message) for x in w)
    assert "truncated" in text and "zebra" in text
