"""`unifusion train [CONFIG.yaml] [--key value ...]`: config in, training loop called."""
from __future__ import annotations

from pathlib import Path

from .. import config as C
from . import EXIT_INTERRUPTED


def overrides(tokens: list[str]) -> dict:
    """['--steps', '10', '--resume'] -> {'steps': '10', 'resume': 'true'}."""
    out, i = {}, 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ValueError(f"unifusion train: expected --key value, got {tok!r}; see unifusion train --help")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                val, i = tokens[i + 1], i + 1
            else:
                val = "true"
        out[key] = val
        i += 1
    return out


def resolve(tokens: list[str], defaults: dict | None = None, command: str | None = None) -> C.TrainConfig:
    """defaults <- YAML <- flags; with --resume, the run's stored config <- the (safe) flags (the
    defaults are not applied again: they would undo a stored --steps). A `command` that trains one
    family (`unifusion autoencoder train`, `unifusion encoder train`) refuses another --family."""
    config_path = tokens.pop(0) if tokens and not tokens[0].startswith("--") else None
    given = {**(C.read_yaml(config_path) if config_path else {}), **overrides(tokens)}
    family = (defaults or {}).get("family")
    if command and str(given.get("family", family)) != family:
        raise ValueError(f"`unifusion {command}` trains --family {family}, not {given['family']}; use `unifusion "
                         "train` for other families")
    cfg = C.from_dict({**(defaults or {}), **given})
    if not cfg.resume:
        return cfg
    from ..training import run_dir
    stored = run_dir.stored_config(Path(cfg.out))
    return cfg if stored is None else C.resumed(stored, given)


def run_train(tokens: list[str]) -> int:
    from ..training.loop import train
    cfg = resolve(list(tokens))
    res = train(cfg)
    if res["rank"] != 0:  # rank 0 reports for the run
        return EXIT_INTERRUPTED if res["interrupted"] else 0
    if res["interrupted"]:
        print(f"interrupted; checkpoint saved to {res['checkpoint']}. Continue with: "
              f"unifusion train --out {cfg.out} --resume")
        return EXIT_INTERRUPTED
    samples = res["samples"] or "none (this family does not generate)"
    cal = res.get("calibration")
    calibrated = ("\n  calibrated:   " + ("no (see above)" if "error" in cal else
                                          f"{cal['key']} grid in {res['model']}/spec.json"
                                          + ("" if cal["fitted"] else " (kept)")) if cal else "")
    print(f"done. outputs in {res['out']}:\n  model:        {res['model']}\n  checkpoint:   {res['checkpoint']}"
          f"\n  samples:      {samples}\n  loss curve:   {res['loss_curve']}\n  log:          {res['log']}{calibrated}")
    return 0
