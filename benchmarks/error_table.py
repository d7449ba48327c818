"""Bad input to the `unifusion` CLI: each case's command, exit code and message, as a markdown table.

    .venv/bin/python benchmarks/error_table.py [--json PATH] [--only NAME ...] [--keep DIR]

Every case prepares its files in a fresh folder (the tiny trained run `run`, made once, is copied
in where a model is needed), runs `python -m unifusion ...` there as a subprocess (120 s limit) and
checks: the exit code; for a user error (exit 2) that stderr is exactly one line starting with
`unifusion: error:` and that the case folder is exactly as the setup left it (a refusal writes,
moves and deletes nothing); no traceback; that the message matches the case's pattern (naming the
problem and the fix); and any extra check of the files left behind. Models other cases need (an
autoencoder, its latents, a latent model, a post-hoc EMA run, a coupling flow, tar shards) are
made once beside the tiny run (`shared`). tests/test_run_safety.py runs the same
CASES (in-process, for speed). A case with `known` set is a known failure (its reason says what is
wrong): the script reports it, and exits 1 only for unexpected outcomes (a new failure, or a known
failure that now passes: then remove its `known`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

# the tiny run every case that needs a model copies (3 steps on moons, a 2-layer MLP)
TINY = {"data": "moons", "network": "mlp-2d", "steps": 3, "batch_size": 16, "sample_every": 0,
        "network.hidden": 32, "network.depth": 2, "network.emb_dim": 16}
TINY_FLAGS = [tok for k, v in TINY.items() for tok in (f"--{k.replace('_', '-')}", str(v))]
STEP = "step-00000003"  # the tiny run's only checkpoint
CKPT = f"run/checkpoints/{STEP}"
TIMEOUT = 120


class Case(NamedTuple):
    name: str
    setup: Callable[[Path, Path], None] | None  # (case folder, the shared tiny run) -> None; prepares files
    argv: tuple[str, ...]  # after `unifusion`, run in the case folder
    code: int  # the expected exit code
    pattern: str  # a regex the message must match (re.search)
    stream: str = "stderr"  # where the message is: stderr, or stdout for exit-0 cases
    check: Callable[[Path, str, str], str | None] | None = None  # (folder, stdout, stderr) -> a problem or None
    known: str | None = None  # a known failure: what is wrong (tests mark it xfail strict)
    doc: str = ""  # what the setup prepared, for the table
    writes: bool = False  # exit 2 after the run began writing (not checked for an unchanged folder)


# ------------------------------------------------------------------------------- setup helpers
def _yaml(d: Path, name: str = "tiny.yaml", **extra) -> None:
    """A config file with the tiny run's settings (so no case can start a long run by accident)."""
    values = {**{k: v for k, v in TINY.items() if "." not in k},
              "network_args": {k.split(".", 1)[1]: v for k, v in TINY.items() if "." in k}, **extra}
    lines = []
    for k, v in values.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            lines += [f"  {a}: {json.dumps(b)}" for a, b in v.items()]
        else:
            lines.append(f"{k}: {json.dumps(v)}")
    (d / name).write_text("\n".join(lines) + "\n")


def _tiny(d: Path, run: Path) -> None:
    _yaml(d)


def _run(d: Path, run: Path) -> None:
    """A copy of the shared tiny run as d/run (without its lock file)."""
    shutil.copytree(run, d / "run", ignore=shutil.ignore_patterns(".lock"))


def _run_and_tiny(d: Path, run: Path) -> None:
    _run(d, run)
    _yaml(d)


def _state_edit(edit: Callable[[dict], None]):
    def setup(d: Path, run: Path) -> None:
        _run(d, run)
        p = d / CKPT / "state.json"
        state = json.loads(p.read_text())
        edit(state)
        p.write_text(json.dumps(state, indent=1))
    return setup


def _no_key(key: str):
    return _state_edit(lambda s: s.pop(key))


def _escaping_group(d: Path, run: Path) -> None:
    _state_edit(lambda s: s["_checkpoint"].update(groups=["model", "../../x"]))(d, run)
    # a valid weights file where "../../x" points, so a loader that followed it would succeed
    shutil.copy(d / CKPT / "model.safetensors", d / "run" / "x.safetensors")


def _other_network(d: Path, run: Path) -> None:
    _run(d, run)
    p = d / "run" / "model" / "spec.json"
    spec = json.loads(p.read_text())
    spec["network"]["kwargs"]["hidden"] = 64
    p.write_text(json.dumps(spec, indent=1))


def _stale_marker(d: Path, run: Path) -> None:
    _run_and_tiny(d, run)
    (d / "run" / "samples" / "stale.png").write_bytes(b"old run")


def _file(d: Path, run: Path) -> None:
    _yaml(d)
    (d / "file").write_text("a regular file\n")


def _npz(kind: str):
    def setup(d: Path, run: Path) -> None:
        import numpy as np
        _yaml(d)
        if kind == "empty":
            np.savez(d / "empty.npz")
        elif kind == "garbage":
            (d / "garbage.npz").write_bytes(np.random.default_rng(0).bytes(300))
        else:  # the first half of a good file: a zip without its central directory
            good = io.BytesIO()
            np.savez(good, x=np.random.default_rng(0).random((100, 2), dtype=np.float32))
            (d / "trunc.npz").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    return setup


def _run_and_data(d: Path, run: Path) -> None:
    import numpy as np
    _run(d, run)
    np.savez(d / "data.npz", x=np.zeros((4, 2), np.float32))


def _pickle(d: Path, run: Path) -> None:
    import torch
    torch.save({"net.weight": torch.zeros(2, 2)}, d / "model.pt")


# ------------------------------------------------------------------------------- shared models
# made once per table (beside the tiny run, in this process) by `shared`, then copied by the cases
AE_FLAGS = ("--data", "digits-train", "--network.base_channels", "8", "--network.ch_mult", "[1, 2]",
            "--network.mid_attention", "false", "--steps", "2", "--batch-size", "16", "--checkpoint-every", "2",
            "--sample-every", "0")
LATENT_FLAGS = ("--network.model_channels", "8", "--steps", "2", "--batch-size", "16", "--sample-every", "0")


def _tar_shards(root: Path) -> None:
    """64 digits as two WebDataset tar shards without captions (no .txt members)."""
    from unifusion import data
    digits = data.load("digits-train")
    data.write_shards(data.ArrayDataset(digits.x[:64], digits.y[:64], 10), root / "tars", per_shard=32)


SHARED: dict[str, tuple] = {  # name -> (what it needs, the `unifusion` commands or a function that make it)
    "ae": ((), [("autoencoder", "train", *AE_FLAGS, "--out", "ae")]),
    "latents": (("ae",), [("encode", "--autoencoder", "ae", "--data", "digits-train", "--n", "64",
                           "--per-shard", "32", "--out", "latents")]),
    "ldm": (("latents",), [("train", "--data", "latents", *LATENT_FLAGS, "--out", "ldm")]),
    "posthoc": ((), [("train", *TINY_FLAGS, "--steps", "4", "--posthoc-every", "2", "--out", "posthoc")]),
    "flow": ((), [("train", "--family", "flow-nice", "--data", "digits-train", "--network.hidden", "16",
                   "--network.depth", "1", "--network.couplings", "2", "--steps", "2", "--batch-size", "16",
                   "--sample-every", "0", "--out", "flow")]),
    "tars": ((), _tar_shards),
}


def shared(run: Path, name: str) -> Path:
    """The shared model or data `name` (SHARED), made on first use in <run's folder>/_shared."""
    root = run.parent / "_shared"
    done = root / f"{name}.done"
    if not done.exists():
        needs, make = SHARED[name]
        for need in needs:
            shared(run, need)
        root.mkdir(exist_ok=True)
        if (root / name).exists():
            shutil.rmtree(root / name)
        if callable(make):
            make(root)
        else:
            for argv in make:
                code, out, err = unifusion(list(argv), root, inprocess=True)
                if code != 0:
                    raise RuntimeError(f"making {name} failed (exit {code}):\n{out[-2000:]}\n{err[-2000:]}")
        done.write_text("")
    return root / name


def _copy(*names: str, tiny: bool = False, then: Callable[[Path], None] | None = None):
    """Copy these shared models into the case folder (and the tiny run as `run`), then edit them."""
    def setup(d: Path, run: Path) -> None:
        if tiny:
            _run(d, run)
        for name in names:
            shutil.copytree(shared(run, name), d / name, ignore=shutil.ignore_patterns(".lock"))
        if then is not None:
            then(d)
    return setup


def _edit_json(path: str, edit: Callable[[dict], None]):
    def then(d: Path) -> None:
        p = d / path
        value = json.loads(p.read_text())
        edit(value)
        p.write_text(json.dumps(value, indent=1))
    return then


def _nan_weights(folder: str):
    """Every floating weight of a model folder set to NaN (a teacher or autoencoder that diverged)."""
    def then(d: Path) -> None:
        from unifusion.safeio import read_safetensors, save_safetensors
        for name in ("weights.safetensors", "ema.safetensors"):
            p = d / folder / name
            if p.is_file():
                t = read_safetensors(p)
                save_safetensors({k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                                  for k, v in t.items()}, p)
    return then


def _nan_in_shard(d: Path) -> None:
    """One NaN in item 35 (shard 1, row 3) of the copied latents, written in place."""
    import numpy as np
    p = d / "latents" / "latents-000001.safetensors"
    with open(p, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        h = json.loads(f.read(n))["mean"]
        row = int(np.prod(h["shape"][1:])) * 4
        f.seek(8 + n + h["data_offsets"][0] + 3 * row)
        f.write(np.array([np.nan], np.float32).tobytes())


def _truncate(path: str):
    def then(d: Path) -> None:
        p = d / path
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return then


def _both_then(*fns):
    def then(d: Path) -> None:
        for f in fns:
            f(d)
    return then


def _couplings_then_retrained(d: Path, run: Path) -> None:
    """Couplings of the tiny run at `run`, then another model (the post-hoc run's) trained into `run`."""
    _run(d, run)
    code, out, err = unifusion(["couple", "--checkpoint", "run", "--n", "8", "--nfe", "2", "--out", "c"], d,
                               inprocess=True)
    assert code == 0, err
    shutil.rmtree(d / "run")
    shutil.copytree(shared(run, "posthoc"), d / "run", ignore=shutil.ignore_patterns(".lock"))


def _couplings(d: Path, run: Path) -> None:
    _run(d, run)
    code, out, err = unifusion(["couple", "--checkpoint", "run", "--n", "8", "--nfe", "2", "--out", "c"], d,
                               inprocess=True)
    assert code == 0, err


def _corrupt_index(d: Path, run: Path) -> None:
    _run(d, run)
    (d / "c").mkdir()
    (d / "c" / "index.json").write_text("{not json")


def _ema_at_4(d: Path, run: Path) -> None:
    _copy("posthoc")(d, run)
    code, out, err = unifusion(["ema", "--checkpoint", "posthoc", "--std", "0.1", "--at", "4"], d, inprocess=True)
    assert code == 0, err


def _refused_train(d: Path, run: Path) -> None:
    """A train refused (--reflow on data without noise) into r, before the corrected command."""
    _yaml(d)
    code, out, err = unifusion(["train", "tiny.yaml", "--reflow", "--out", "r"], d, inprocess=True)
    assert code == 2, err


def _other_files(d: Path, run: Path) -> None:
    _copy("ae")(d, run)
    (d / "notes").mkdir()
    (d / "notes" / "todo.txt").write_text("mine\n")


# ------------------------------------------------------------------------------- checks
def _absent(*paths: str):
    def check(d: Path, out: str, err: str) -> str | None:
        there = [p for p in paths if (d / p).exists()]
        return f"left {there} behind" if there else None
    return check


def _present(*paths: str):
    def check(d: Path, out: str, err: str) -> str | None:
        gone = [p for p in paths if not (d / p).exists()]
        return f"{gone} went missing" if gone else None
    return check


def _both(*checks):
    def check(d: Path, out: str, err: str) -> str | None:
        return next((p for c in checks if (p := c(d, out, err))), None)
    return check


def _stderr_has(text: str):
    def check(d: Path, out: str, err: str) -> str | None:
        return None if text in err else f"stderr lacks {text!r}"
    return check


def _json_has(path: str, key: str, value):
    def check(d: Path, out: str, err: str) -> str | None:
        try:
            got = json.loads((d / path).read_text())
            for k in key.split("."):
                got = got[k]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{path}: cannot read {key} ({e})"
        return None if got == value else f"{path}: {key} is {got!r}, expected {value!r}"
    return check


def _every_key(d: Path, out: str, err: str) -> str | None:
    """`train --help` lists every config key as `--key  type  (default ...)`: the shared keys and
    every family's own options."""
    from dataclasses import fields

    from unifusion.config import TrainConfig, flag
    from unifusion.models import registry
    keys = [f for f in fields(TrainConfig) if f.name != "options"]
    keys += [f for n in registry.names() if registry.get(n).options for f in fields(registry.get(n).options)]
    missing = [flag(f.name) for f in keys
               if not re.search(rf"^\s+{re.escape(flag(f.name))}\s+{f.type}\s+\(default ", out, re.M)]
    return f"keys without type and default: {missing}" if missing else None


def _every_sampler(d: Path, out: str, err: str) -> str | None:
    from unifusion.samplers import names
    listed = re.search(r"^samplers: (.*)$", out, re.M)
    missing = sorted(set(names()) - set(listed.group(1).split(", ") if listed else []))
    return f"samplers not listed: {missing}" if missing else None


S = ("sample", "--checkpoint", "run")  # sampling the copied tiny run
N2 = ("--n", "2", "--out", "s.npz")
ENC = ("encode", "--autoencoder", "ae", "--data", "digits-train", "--n", "64", "--per-shard", "32")
CP = ("couple", "--checkpoint", "run", "--n", "8", "--nfe", "2", "--out", "c")
EV = ("eval", "--checkpoint", "run", "--n", "4")
DIGITS = ("--network.model_channels", "8", "--steps", "2", "--batch-size", "16", "--sample-every", "0")

CASES: list[Case] = [
    # ---- train: where it writes
    Case("train-out-under-a-file", _file, ("train", "tiny.yaml", "--out", "file/run"), 2,
         r"cannot write the run folder file/run .*writable --out", doc="`file` is a regular file"),
    # ---- train: config
    Case("config-invalid-yaml",
         lambda d, r: (d / "bad.yaml").write_text("steps: [1, 2\nlr: 0.1\n"), ("train", "bad.yaml", "--out", "r"),
         2, r"bad\.yaml.* not valid YAML at line \d+", doc="`bad.yaml` holds `steps: [1, 2` (unclosed)"),
    Case("config-yaml-steps-true", lambda d, r: _yaml(d, "bool.yaml", steps=True),
         ("train", "bool.yaml", "--out", "r"), 2, r"--steps expects int, got the boolean True",
         doc="`bool.yaml` holds `steps: true`"),
    Case("config-unknown-key", _tiny, ("train", "tiny.yaml", "--batch-sise", "8", "--out", "r"), 2,
         r"unknown config key --batch-sise; did you mean --batch-size\?"),
    Case("config-unknown-preview-sampler", _tiny, ("train", "tiny.yaml", "--sample-sampler", "nope", "--out", "r"),
         2, r"--sample-sampler 'nope' is not valid; choose one of \[.*'dpmpp_2m'"),
    Case("config-keep-checkpoints-0", _tiny, ("train", "tiny.yaml", "--keep-checkpoints", "0", "--out", "r"), 2,
         r"--keep-checkpoints must be >= 1, got 0"),
    Case("config-sample-every-negative", _tiny, ("train", "tiny.yaml", "--sample-every", "-1", "--out", "r"), 2,
         r"--sample-every must be >= 0, got -1"),
    Case("config-sigma-data-0", _tiny, ("train", "tiny.yaml", "--sigma-data", "0", "--out", "r"), 2,
         r"--sigma-data must be a finite number > 0, got 0"),
    Case("config-unknown-network-argument", _tiny, ("train", "tiny.yaml", "--network.widht", "3", "--out", "r"), 2,
         r"no argument\(s\) \['widht'\]; its arguments are \[.*'hidden'", check=_absent("r/checkpoints", "r/log.jsonl"),
         doc="found before step 0: nothing is trained or saved"),
    Case("config-network-args-as-text", _tiny,
         ("train", "tiny.yaml", "--network-args", "hidden=32", "--out", "r"), 2, r"--network\.NAME VALUE",
         doc="the flag `train --help` lists, given as text that is not a mapping"),
    Case("config-network-argument-of-the-wrong-type", _tiny, ("train", "tiny.yaml", "--network.hidden", "wide",
                                                               "--out", "r"), 2, r"network MLP cannot be built.*hidden"),
    # ---- train: the run folder
    Case("run-exists-without-resume", _run_and_tiny, ("train", "tiny.yaml", "--out", "run"), 2,
         r"run already holds a run .*--resume.*--overwrite", check=_present(f"{CKPT}/state.json", "run/model"),
         doc="`run` holds a finished run"),
    Case("run-exists-overwrite", _stale_marker, ("train", "tiny.yaml", "--out", "run", "--overwrite"), 0,
         r"^done\. outputs in run", stream="stdout",
         check=_both(_absent("run/samples/stale.png"), _present(f"{CKPT}/state.json", "run/model/spec.json")),
         doc="`run` holds a finished run (and a stale file, which must go)"),
    Case("resume-beyond-steps", _run, ("train", "--out", "run", "--resume", "--steps", "2"), 2,
         r"already at step 3, beyond --steps 2; to train further, resume with a larger --steps"),
    Case("resume-changed-lr", _run, ("train", "--out", "run", "--resume", "--lr", "0.5"), 2,
         r"--resume continues the stored run, whose --lr cannot change .*another --out"),
    Case("resume-changed-process", _run, ("train", "--out", "run", "--resume", "--process", "vp"), 2,
         r"whose --process cannot change \(stored: 'edm'\)"),
    Case("resume-state-without-config", _no_key("config"), ("train", "--out", "run", "--resume"), 2,
         r"cannot resume from .*state\.json has no 'config'.*--overwrite",
         doc='`"config"` deleted from the checkpoint\'s state.json'),
    # ---- checkpoints and model folders
    Case("sample-state-without-spec", _no_key("spec"), ("sample", "--checkpoint", CKPT, *N2), 2,
         r"no model spec", check=_absent("s.npz"), doc='`"spec"` deleted from the checkpoint\'s state.json'),
    Case("checkpoint-group-outside", _escaping_group, ("sample", "--checkpoint", CKPT, *N2), 2,
         r"invalid group name\(s\) \['\.\./\.\./x'\]", check=_absent("s.npz"),
         doc='state.json `_checkpoint.groups` holds `"../../x"` (and `run/x.safetensors` exists)'),
    Case("sample-weights-file-of-a-checkpoint", _run, ("sample", "--checkpoint", f"{CKPT}/model.safetensors", *N2),
         2, r"is one weights file; give the folder that holds it"),
    Case("sample-spec-of-another-network", _other_network, ("sample", "--checkpoint", "run/model", *N2), 2,
         r"weights in run/model do not fit the network .*of another shape.*same run",
         doc="`run/model/spec.json` edited: network hidden 32 -> 64"),
    Case("sample-pickle-checkpoint", _pickle, ("sample", "--checkpoint", "model.pt", *N2), 2,
         r"refusing to load model\.pt: .*pickle.*convert it once", doc="`model.pt` from torch.save of a dict"),
    Case("sample-missing-checkpoint", None, ("sample", "--checkpoint", "nope", *N2), 2,
         r"no checkpoint at nope: the path does not exist"),
    # ---- training data
    Case("data-empty-npz", _npz("empty"), ("train", "tiny.yaml", "--data", "empty.npz", "--out", "r"), 2,
         r"empty\.npz: no array 'x'", doc="`empty.npz` holds no arrays"),
    Case("data-garbage-npz", _npz("garbage"), ("train", "tiny.yaml", "--data", "garbage.npz", "--out", "r"), 2,
         r"garbage\.npz.*(not|cannot)",
         doc="`garbage.npz` is 300 random bytes"),
    Case("data-truncated-npz", _npz("truncated"), ("train", "tiny.yaml", "--data", "trunc.npz", "--out", "r"), 2,
         r"trunc\.npz",
         doc="`trunc.npz` is the first half of a good .npz"),
    # ---- sample arguments
    Case("sample-n-0", _run, (*S, "--n", "0", "--out", "s.npz"), 2, r"--n must be >= 1, got 0",
         check=_absent("s.npz")),
    Case("sample-seeds-reversed", _run, (*S, "--seeds", "5-2", "--out", "s.npz"), 2,
         r"--seeds: the range '5-2' is empty; write the lower seed first, e\.g\. 2-5", check=_absent("s.npz")),
    Case("sample-out-not-npz", _run, (*S, "--n", "2", "--out", "x.png"), 2, r"--out must end in \.npz, got 'x\.png'",
         check=_absent("x.png")),
    Case("sample-cfg-unconditional", _run, (*S, *N2, "--cfg", "2"), 2, r"--cfg 2(\.0)? needs a conditional model",
         check=_absent("s.npz"), doc="`run` is unconditional (moons)"),
    Case("sample-label-unconditional", _run, (*S, *N2, "--label", "1"), 2,
         r"--label needs a class-conditional model; this one is unconditional", check=_absent("s.npz"),
         doc="`run` is unconditional (moons)"),
    # ---- eval
    Case("eval-n-2", _run, ("eval", "--checkpoint", "run", "--n", "2"), 2, r"--n must be >= 4", check=_absent("run/eval")),
    Case("sample-grid-names-a-noise-grid", _run, (*S, *N2, "--grid", "karras"), 2,
         r"--grid karras: sample's --grid was the PNG output \(now --png\); for the noise grid pass --noise-grid "
         r"karras", doc="issue 19.15: it used to write a PNG named `karras`"),
    Case("sample-grid-deprecated-alias", _run, (*S, *N2, "--grid", "s.png"), 0, r"^wrote 2 samples to s\.npz",
         stream="stdout", check=_stderr_has("--grid is deprecated for `sample`; use --png"),
         doc="the old spelling of --png still works, with a one-line notice"),
    Case("sample-png-not-png", _run, (*S, *N2, "--png", "s.jpg"), 2, r"--png must end in \.png, got 's\.jpg'"),
    Case("sample-out-is-other-data", _run_and_data, (*S, "--n", "2", "--out", "data.npz"), 2,
         r"--out data\.npz exists and was not written by `unifusion sample` .*--overwrite",
         doc="`data.npz` is a user's data set (an array x, no seeds)"),
    # ---- train: a refusal leaves the folder as it was (issue 19.6, 19.7, 19.15)
    Case("train-refused-init-from-another-shape", _run, ("train", "--data", "digits", *DIGITS, "--init-from", "run",
                                                         "--out", "r"), 2,
         r"--init-from run is a model of data shape \(2,\), but --data digits holds \(1, 8, 8\)", check=_absent("r")),
    Case("train-refused-teacher-of-another-shape", _run,
         ("train", "--data", "digits", *DIGITS, "--objective", "cd", "--teacher", "run", "--out", "r"), 2,
         r"--teacher run is a model of data shape \(2,\)", check=_absent("r")),
    Case("train-refused-reflow-without-noise", _tiny, ("train", "tiny.yaml", "--reflow", "--out", "r"), 2,
         r"--reflow trains on noise-data couplings, but --data moons has no noise", check=_absent("r")),
    Case("train-refused-unknown-network", _tiny, ("train", "tiny.yaml", "--network", "bogus", "--out", "r"), 2,
         r"--network 'bogus' is not a preset", check=_absent("r")),
    Case("train-corrected-after-a-refusal", _refused_train, ("train", "tiny.yaml", "--out", "r"), 0,
         r"^done\. outputs in r", stream="stdout", doc="the same --out was refused a moment before (--reflow)"),
    Case("train-overwrite-refused-keeps-the-old-run", _run_and_tiny,
         ("train", "tiny.yaml", "--reflow", "--out", "run", "--overwrite"), 2, r"--reflow trains on noise-data",
         doc="--overwrite deletes the old run only once the new one is checked"),
    Case("train-teacher-of-another-autoencoder", _copy("latents", "ldm", then=_edit_json(
        "ldm/model/spec.json", lambda s: s["data"]["autoencoder"].update(digest="f" * 64))),
         ("train", "--data", "latents", *LATENT_FLAGS, "--objective", "cd", "--teacher", "ldm/model", "--out", "r"),
         2, r"--teacher ldm/model works in the latent space of autoencoder .* but these latents come from",
         doc="the teacher's spec records another autoencoder digest (a latent model of another autoencoder)"),
    Case("train-reflow-coupling-flow", _tiny, ("train", "tiny.yaml", "--family", "flow-nice", "--network", "auto",
                                               "--reflow", "--out", "r"), 2,
         r"--reflow trains a rectified flow .* --family flow-nice is a coupling flow .*drop --reflow"),
    Case("train-coupling-flow-network-preset", _tiny, ("train", "tiny.yaml", "--family", "flow-nice", "--network",
                                                       "unet-digits", "--out", "r"), 2,
         r"--network picks a denoiser preset; --family flow-nice has its own invertible network"),
    Case("train-nan-in-latent-shard", _copy("latents", then=_nan_in_shard),
         ("train", "--data", "latents", *LATENT_FLAGS, "--steps", "4", "--out", "r"), 2,
         r"latents-000001\.safetensors holds non-finite values \(NaN or inf\) in 'mean' of item 35", writes=True,
         doc="a NaN written into item 35 of the latents (issue 19.14: training used to skip its steps)"),
    # ---- encode (issue 19.1, 19.2, 19.4, 19.14)
    Case("encode-tar-shards", _copy("ae", "tars"), ("encode", "--autoencoder", "ae", "--data", "tars", "--out",
                                                    "lat"), 0, r"^wrote 64 latents \(4x4x4", stream="stdout",
         check=_present("lat/latents-000000.safetensors"), doc="tar shards without captions (no .txt)"),
    Case("encode-truncated-tar", _copy("ae", "tars", then=_truncate("tars/shard-000001.tar")),
         ("encode", "--autoencoder", "ae", "--data", "tars", "--out", "lat"), 2,
         r"tar shard tars/shard-000001\.tar is truncated .*--skip-corrupt", check=_absent("lat")),
    Case("encode-truncated-tar-skip-corrupt", _copy("ae", "tars", then=_truncate("tars/shard-000001.tar")),
         ("encode", "--autoencoder", "ae", "--data", "tars", "--skip-corrupt", "--out", "lat"), 0,
         r"^wrote \d+ latents", stream="stdout", doc="the flag the message names"),
    Case("encode-resume-after-new-statistics", _copy("ae", "latents", then=_edit_json(
        "ae/model/spec.json", lambda s: s["training"]["latent"]["shift"].__setitem__(0, 0.5))),
         (*ENC, "--out", "latents"), 2,
         r"latents holds latents normalised with the shift .* \(`unifusion autoencoder stats` measured them again\)",
         doc="the autoencoder's latent statistics changed since `latents` was encoded"),
    Case("encode-nan-autoencoder", _copy("ae", then=_nan_weights("ae/model")), (*ENC, "--out", "lat"), 2,
         r"the autoencoder gave non-finite latents \(NaN or inf\) for item\(s\) \[0, 1,", check=_absent("lat"),
         doc="the autoencoder's weights are NaN"),
    Case("encode-out-is-a-file", _copy("ae", then=lambda d: (d / "f").write_text("x")), (*ENC, "--out", "f"), 2,
         r"--out f is a file, not a latents folder"),
    # ---- couple (issue 19.3, 19.5, 19.12)
    Case("couple-nfe-0", _run, (*CP, "--nfe", "0"), 2, r"--nfe must be >= 1, got 0", check=_absent("c")),
    Case("couple-autoencoder-teacher", _copy("ae"), ("couple", "--checkpoint", "ae", "--n", "8", "--out", "c"), 2,
         r"--checkpoint ae is a model of the autoencoder family, which has no sampler", check=_absent("c")),
    Case("couple-cfg-nan", _run, (*CP, "--cfg", "nan"), 2, r"--cfg must be a finite number, got nan",
         check=_absent("c")),
    Case("couple-nan-teacher", _copy(tiny=True, then=_nan_weights("run/model")),
         ("couple", "--checkpoint", "run/model", "--n", "8", "--nfe", "2", "--out", "c"), 2,
         r"the teacher's samples for seed\(s\) \[0, 1, 2, 3, 4, 5, 6, 7\] are not finite \(NaN or inf; the "
         r"denoiser first returned NaN or inf at sigma=80\)", check=_absent("c"),
         doc="the teacher's weights are NaN"),
    Case("couple-teacher-retrained-at-its-path", _couplings_then_retrained, CP, 2,
         r"c holds couplings of a teacher with other weights \(digest .*--overwrite",
         doc="`c` was drawn from `run`; then another model was trained into `run`"),
    Case("couple-same-teacher-another-path", _couplings,
         ("couple", "--checkpoint", "../couple-same-teacher-another-path/run", "--n", "8", "--nfe", "2", "--out",
          "c"), 0, r"^wrote 8 couplings", stream="stdout", doc="`c` was drawn from `run`, given here by another path"),
    Case("couple-corrupt-index", _corrupt_index, CP, 2,
         r"c/index\.json is not a readable couplings index .*rebuild the folder with `unifusion couple \.\.\. "
         r"--overwrite`", doc="`c/index.json` is not JSON"),
    Case("couple-corrupt-index-overwrite", _corrupt_index, (*CP, "--overwrite"), 0, r"^wrote 8 couplings",
         stream="stdout", check=_present("c/couplings-000000.safetensors"), doc="the fix the message names"),
    # ---- calibrate (issue 19.9, 19.10, 19.15)
    Case("calibrate-out-is-a-spec", _run, ("calibrate", "--checkpoint", "run", "--nfe", "3", "--out",
                                           "run/model/spec.json"), 2,
         r"--out run/model/spec\.json exists and is not a calibration; .*--overwrite"),
    Case("calibrate-autoencoder", _copy("ae"), ("calibrate", "--checkpoint", "ae", "--nfe", "3"), 2,
         r"--checkpoint ae is a model of the autoencoder family, which has no sampler"),
    Case("calibrate-nfe-1000", _run, ("calibrate", "--checkpoint", "run", "--nfe", "1000", "--n-ref", "2"), 2,
         r"--nfe must be in 1\.\.100, got 1000"),
    Case("calibrate-fitted-derivative-free", _run, ("calibrate", "--checkpoint", "run", "--sampler", "fitted", "--nfe",
                                                    "3", "--method", "powell"), 2,
         r"sampler 'fitted' fits its coefficients by gradient; use method='auto' or 'gradient'",
         check=_absent("run/calibration")),
    # ---- default sampling, train --calibrate, level search, CD target (issue 24)
    Case("train-unknown-default-sampler", _tiny, ("train", "tiny.yaml", "--sampler", "nope", "--out", "r"), 2,
         r"--sampler 'nope' is not valid; choose one of", check=_absent("r")),
    Case("train-calibrate-stochastic-sampler", _tiny,
         ("train", "tiny.yaml", "--sampler", "ddpm", "--calibrate", "--out", "r"), 2,
         r"--calibrate fits the grid of a deterministic fixed-step sampler; --sampler ddpm is stochastic",
         check=_absent("r")),
    Case("train-calibrate-nfe-1000", _tiny, ("train", "tiny.yaml", "--nfe", "1000", "--calibrate", "--out", "r"), 2,
         r"--calibrate: a calibrated grid is for 1\.\.100 denoiser calls, not 1000", check=_absent("r")),
    Case("train-target-ema-1", _tiny, ("train", "tiny.yaml", "--objective", "ict", "--process", "edm",
                                       "--parametrization", "consistency", "--target-ema", "1", "--out", "r"), 2,
         r"--target-ema must be a decay in \[0, 1\)", check=_absent("r")),
    Case("eval-search-range-alone", _run, (*EV, "--search-range", "0.1,10"), 2,
         r"--search-range is for --search-levels", check=_absent("run/eval")),
    Case("eval-search-levels-multistep-sampler", _run, (*EV, "--search-levels", "--sampler", "dpmpp_2m", "--nfe", "2"),
         2, r"one call per level|euler|consistency", check=_absent("run/eval")),
    Case("eval-search-levels-with-sweep", _run, (*EV, "--search-levels", "--sweep"), 2,
         r"--search-levels scores one sampler and NFE .*drop --sweep", check=_absent("run/eval")),
    Case("eval-search-range-backwards", _run, (*EV, "--search-levels", "--sampler", "euler", "--nfe", "2",
                                               "--search-range", "5,1"), 2,
         r"--search-range must be LOW,HIGH with 0 < LOW < HIGH < inf", check=_absent("run/eval")),
    # ---- ema (issue 19.11)
    Case("ema-at-between-snapshots", _copy("posthoc"), ("ema", "--checkpoint", "posthoc", "--std", "0.1", "--at",
                                                        "3"), 2,
         r"--at 3: the run has no snapshot at that step; give one of the snapshot steps 2, 4",
         doc="snapshots at steps 2 and 4"),
    Case("ema-at-beyond-snapshots", _copy("posthoc"), ("ema", "--checkpoint", "posthoc", "--std", "0.1", "--at",
                                                       "9999"), 2, r"--at 9999: the run has no snapshot"),
    Case("ema-made-at-another-step", _ema_at_4, ("ema", "--checkpoint", "posthoc", "--std", "0.1", "--at", "2"), 2,
         r"posthoc-ema/std-0\.100 holds the EMA with std 0\.1 reconstructed at step 4, not std 0\.1 at step 2; "
         r"pass --overwrite", doc="std-0.100 was made at step 4"),
    Case("ema-made-at-another-step-overwrite", _ema_at_4,
         ("ema", "--checkpoint", "posthoc", "--std", "0.1", "--at", "2", "--overwrite"), 0, r"snapshots",
         stream="stdout", check=_json_has("posthoc/posthoc-ema/std-0.100/spec.json", "training.posthoc_ema.step", 2)),
    Case("ema-without-snapshots", _run, ("ema", "--checkpoint", "run", "--std", "0.1"), 2,
         r"run has no post-hoc EMA snapshots .*--posthoc-every"),
    # ---- autoencoder stats (issue 19.8)
    Case("ae-stats-out-another-model", _copy("ae", tiny=True),
         ("autoencoder", "stats", "--checkpoint", "ae/checkpoints/step-00000002", "--n", "16", "--out", "run/model"),
         2, r"--out run/model already holds a model folder with other weights; .*--overwrite",
         doc="run/model is the tiny run's finished model"),
    Case("ae-stats-out-other-files", _other_files,
         ("autoencoder", "stats", "--checkpoint", "ae/checkpoints/step-00000002", "--n", "16", "--out", "notes"), 2,
         r"--out notes already holds files that are not a model folder"),
    Case("ae-stats-of-a-diffusion-model", _run, ("autoencoder", "stats", "--checkpoint", "run/model", "--n", "16"),
         2, r"run/model is a diffusion model, not an autoencoder"),
    # ---- eval (issue 19.13)
    Case("eval-nll-negative", _run, (*EV, "--nll", "-3"), 2, r"--nll must be >= 0", check=_absent("run/eval")),
    Case("eval-nll-more-than-there-are", _run, (*EV, "--nll", "100000"), 2,
         r"--nll 100000 is more than the 2000 held-out examples there are to score; pass --nll 2000 or fewer",
         check=_absent("run/eval")),
    Case("eval-probes-0", _run, (*EV, "--nll", "4", "--probes", "0"), 2, r"--probes must be >= 1, got 0"),
    Case("eval-nll-of-an-autoencoder", _copy("ae"), ("eval", "--checkpoint", "ae", "--n", "4", "--nll", "4"), 2,
         r"--nll: an autoencoder has no likelihood"),
    Case("eval-nll-coupling-flow-is-exact", _copy("flow"), ("eval", "--checkpoint", "flow", "--n", "4", "--nll",
                                                            "4"), 0,
         r"(?m)^NLL: .* bits/dim on 4 held-out examples \(uniform dequantization, 17 levels, exact log-likelihood "
         r"\(change of variables\)\)$", stream="stdout", doc="a 2-step flow-nice on digits"),
    # ---- help and version
    Case("version", None, ("--version",), 0, r"^unifusion \d+\.\d+\.\d+", stream="stdout"),
    Case("train-help", None, ("train", "--help"), 0,
         r"(?s)^usage: unifusion train(?=.*^data:$)(?=.*^model:$)(?=.*^optimisation:$)(?=.*^run:$)"
         r"(?=.*--batch-size\s+int\s+\(default 128\))(?=.*--network-args\s+dict)(?=.*--process-args\s+dict)",
         stream="stdout", check=_every_key, doc="lists every config key with its type and default, grouped"),
    Case("sample-help", None, ("sample", "--help"), 0, r"(?m)^samplers: .*dpmpp_2m", stream="stdout",
         check=_every_sampler, doc="lists every sampler"),
]


# ------------------------------------------------------------------------------- running
def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def _inprocess(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """`unifusion.cli.main(argv)` in this process, as the console script would run it: SystemExit
    gives the code, an uncaught exception exit 1 and its traceback on stderr."""
    from unifusion import cli
    out, err, old = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def unifusion(argv: list[str], cwd: Path, inprocess: bool = False, timeout: float = TIMEOUT) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr) of `unifusion argv` in cwd."""
    if inprocess:
        return _inprocess(list(argv), cwd)
    def text(b):  # decoded by hand: text=True would turn a progress bar's \r into \n (see screen_lines)
        return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
    try:
        p = subprocess.run([sys.executable, "-m", "unifusion", *argv], cwd=cwd, env=_env(), capture_output=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return None, text(e.stdout), text(e.stderr)
    return p.returncode, text(p.stdout), text(p.stderr)


def make_run(out: Path, inprocess: bool = False) -> Path:
    """The shared tiny run (moons, 3 steps) at `out`."""
    code, stdout, stderr = unifusion(["train", *TINY_FLAGS, "--out", out.name], out.parent, inprocess)
    if code != 0:
        raise RuntimeError(f"the tiny run failed (exit {code}):\n{stdout}\n{stderr}")
    return out


def screen_lines(text: str) -> list[str]:
    """The non-empty lines a terminal shows: a progress bar redraws itself with carriage returns,
    so only the text after the last one on each line stays on the screen."""
    return [s for s in (line.split("\r")[-1] for line in text.split("\n")) if s.strip()]


def problems(case: Case, code: int | None, out: str, err: str, folder: Path) -> list[str]:
    """What is wrong with one outcome (empty: the case behaves as it should)."""
    found = []
    if code is None:
        return [f"timed out after {TIMEOUT} s"]
    if code != case.code:
        found.append(f"exit {code}, expected {case.code}")
    if "Traceback" in err:
        found.append("printed a traceback")
    if case.code == 2:
        lines = screen_lines(err)
        if len(lines) != 1 or not lines[0].startswith("unifusion: error: "):
            found.append(f"stderr is not one `unifusion: error:` line ({len(lines)} lines)")
    text = err if case.stream == "stderr" else out
    if not re.search(case.pattern, text, re.M):
        found.append(f"the {case.stream} does not match /{case.pattern}/")
    if case.check is not None and (extra := case.check(folder, out, err)):
        found.append(extra)
    return found


def message(code: int | None, out: str, err: str) -> str:
    """The one line a user reads."""
    if code is None:
        return "(timed out)"
    if code == 0:
        lines = out.strip().splitlines()
        first = lines[0] if lines else ""
        return first + (f" ... ({len(lines)} lines)" if len(lines) > 1 else "")
    lines = screen_lines(err)
    if "Traceback" in err:
        return f"(traceback) {lines[-1] if lines else ''}"
    return lines[-1] if lines else "(nothing on stderr)"


def folder_state(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> "dir" or the sha1 of the file's bytes."""
    import hashlib
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def changes(before: dict[str, str], after: dict[str, str]) -> str | None:
    """What a refused command changed in its folder (None: nothing)."""
    added = sorted(set(after) - set(before))
    gone = sorted(set(before) - set(after))
    edited = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = [f"{what} {paths[:4]}" for what, paths in (("wrote", added), ("deleted", gone), ("changed", edited))
             if paths]
    return f"the refusal changed its folder: {'; '.join(parts)}" if parts else None


def run_case(case: Case, root: Path, run: Path, inprocess: bool = False) -> dict:
    """Set the case up in root/<name>, run it there, and judge it."""
    folder = root / case.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if case.setup is not None:
        case.setup(folder, run)
    before = folder_state(folder) if case.code == 2 and not case.writes else None
    t0 = time.perf_counter()
    code, out, err = unifusion(list(case.argv), folder, inprocess)
    seconds = time.perf_counter() - t0
    found = problems(case, code, out, err, folder)
    if before is not None and (changed := changes(before, folder_state(folder))):
        found.append(changed)
    return {"case": case.name, "command": "unifusion " + shlex.join(case.argv), "setup": case.doc,
            "expected": case.code, "exit": code, "message": message(code, out, err), "stdout": out,
            "stderr": err, "problems": found, "ok": not found, "known": case.known,
            "seconds": round(seconds, 2)}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(results: list[dict]) -> str:
    rows = ["| case | command | exit | message |", "|---|---|---|---|"]
    for r in results:
        name = f"{r['case']}" + (f" ({r['setup']})" if r["setup"] else "")
        exit_ = f"{r['exit']}" + ("" if r["exit"] == r["expected"] else f" (expected {r['expected']})")
        rows.append(f"| {_cell(name)} | `{_cell(r['command'])}` | {exit_} | {_cell(r['message'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="also write every result (with full stdout/stderr) here")
    p.add_argument("--only", nargs="+", default=None, help="run only these cases")
    p.add_argument("--keep", default=None, help="set the cases up in this folder and keep it (default: a temp folder)")
    args = p.parse_args(argv)
    cases = [c for c in CASES if args.only is None or c.name in args.only]
    if args.only and len(cases) != len(args.only):
        p.error(f"unknown case(s) {sorted(set(args.only) - {c.name for c in cases})}")
    with contextlib.ExitStack() as stack:
        root = Path(args.keep) if args.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        run = make_run(root / "_tiny_run")
        results = [run_case(c, root / "cases", run) for c in cases]
    print(table(results))
    unexpected = []
    for c, r in zip(cases, results):
        if r["problems"] and not c.known:
            unexpected.append(f"FAILED {c.name}: {'; '.join(r['problems'])}")
        elif r["problems"]:
            print(f"\nknown failure {c.name}: {'; '.join(r['problems'])}\n  ({c.known})", file=sys.stderr)
        elif c.known:
            unexpected.append(f"FIXED {c.name}: it passes now; remove its `known`")
    for line in unexpected:
        print(f"\n{line}", file=sys.stderr)
    ok = sum(r["ok"] for r in results)
    print(f"\n{ok}/{len(results)} cases behave as they should ({sum(bool(c.known) for c in cases)} known failures)",
          file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
