"""Each family owns its options (models/options.py): flags and YAML keys keep their names, a key of
another family names that family, help is grouped by family, and run folders written by the
older flat config (every family's keys in one mapping) still resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from unifusion import checkpoint, cli
from unifusion import config as C
from unifusion.training import loop as L

# the flat config of unifusion <= 0.2.0 held these for every run, whatever its family
OLD_FLAT = {"dequantization": "uniform", "ode_tol": 0.001, "ode_steps": 0, "kl_weight": 1e-06, "rec_loss": "l1",
            "perceptual_weight": 0.0, "disc_weight": 0.0, "disc_start": 0, "objective": "denoise", "teacher": "",
            "student_steps": 0, "distance": "auto", "cm_steps": 18, "teacher_solver": "heun",
            "network": "unet-digits"}


def test_each_key_belongs_to_its_family():
    ae = C.from_dict({"family": "autoencoder", "kl_weight": 1e-5, "rec_loss": "l2"})
    assert (ae.options.kl_weight, ae.options.rec_loss) == (1e-5, "l2")
    assert "objective" not in ae.to_dict() and ae.to_dict()["kl_weight"] == 1e-5
    d = C.TrainConfig().to_dict()
    assert d["objective"] == "denoise" and "kl_weight" not in d and "ode_tol" not in d
    for key, family, owner in (("kl_weight", "diffusion", "autoencoder"), ("ode_tol", "flow-nice", "cnf"),
                               ("objective", "autoencoder", "diffusion"),
                               ("dequantization", "diffusion", "cnf / flow-glow / flow-nice / flow-realnvp")):
        with pytest.raises(ValueError, match=rf"--{key.replace('_', '-')} is an option of --family {owner}, "
                                             rf"not of --family {family}"):
            C.from_dict({"family": family, key: OLD_FLAT[key]})
    with pytest.raises(ValueError, match="--rec-loss 'l3' is not valid; choose one of"):
        C.from_dict({"family": "autoencoder", "rec_loss": "l3"})
    with pytest.raises(ValueError, match="--disc-start must be >= 0"):
        C.from_dict({"family": "autoencoder", "disc_start": -1})
    with pytest.raises(ValueError, match="--ode-tol must be a finite number > 0"):
        C.from_dict({"family": "cnf", "ode_tol": 0})
    with pytest.raises(ValueError, match="--kl-weight expects float"):
        C.from_dict({"family": "autoencoder", "kl_weight": "big"})


def test_yaml_keys_and_flags_keep_their_names(tmp_path):
    (tmp_path / "ae.yaml").write_text("family: autoencoder\nkl_weight: 2.0e-6\ndisc-weight: 0.1\n")
    cfg = C.load(str(tmp_path / "ae.yaml"), {"disc_start": "5"})
    assert (cfg.options.kl_weight, cfg.options.disc_weight, cfg.options.disc_start) == (2e-6, 0.1, 5)
    cfg = C.load(None, {"family": "cnf", "ode-steps": "4"})
    assert cfg.options.ode_steps == 4


def test_help_is_grouped_by_family(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for family, key in (("autoencoder", "--kl-weight"), ("cnf", "--ode-tol"), ("flow-glow", "--dequantization")):
        block = text.split(f"family {family}:")[1].split("family ")[0]
        assert key in block
    assert "options of the student family (it extends diffusion)" in text
    assert cli.main(["train", "--family", "autoencoder", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--kl-weight" in text and "--objective" not in text and "--ode-tol" not in text
    assert "--batch-size" in text  # the shared keys too
    assert cli.main(["train", "--family=bogus", "--help"]) == 2
    assert "'bogus' is not registered" in capsys.readouterr().err


def _old_style(out: Path, family_keys: dict):
    """Rewrite a run's stored configs (config.json and every checkpoint's state.json) as the old
    flat config stored them."""
    for path in [out / "config.json"]:
        d = json.loads(path.read_text())
        for k in list(d):
            if k in OLD_FLAT:
                del d[k]
        d.update({**OLD_FLAT, **family_keys})
        path.write_text(json.dumps(d))
    for ck in (out / "checkpoints").glob("step-*"):
        state = json.loads((ck / checkpoint.STATE_FILE).read_text())
        state["config"] = {**{k: v for k, v in state["config"].items() if k not in OLD_FLAT}, **OLD_FLAT,
                           **family_keys}
        (ck / checkpoint.STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize("family,extra", [
    ("diffusion", {"data": "moons", "network": "mlp-2d", "network_args": {"hidden": 16, "depth": 1}}),
    ("flow-nice", {"data": "moons", "network_args": {"hidden": 16, "depth": 2}}),
])
def test_old_flat_run_folders_resume(tmp_path, family, extra):
    base = {"family": family, "steps": 6, "batch_size": 16, "checkpoint_every": 3, "sample_every": 0, "log_every": 1,
            "warmup_steps": 1, **extra}
    whole = L.train(C.from_dict({**base, "out": str(tmp_path / "whole")}), progress=False)
    part = tmp_path / "part"  # the same run as if it had been stopped after step 3
    shutil.copytree(whole["out"], part)
    shutil.rmtree(part / "model")
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    _old_style(part, {"network": extra.get("network", "unet-digits"), "family": family})
    assert cli.main(["train", "--out", str(part), "--resume"]) == 0
    a, b = (checkpoint.load(r)[0]["model"] for r in (whole["out"], part))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
