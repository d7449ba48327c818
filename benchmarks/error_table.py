"""Bad input to the `unifusion` CLI: each case's command, exit code and message, as a markdown table.

    .venv/bin/python benchmarks/error_table.py [--json PATH] [--only NAME ...] [--keep DIR]

Every case prepares its files in a fresh folder (the tiny trained run `run`, made once, is copied
in where a model is needed), runs `python -m unifusion ...` there as a subprocess (120 s limit) and
checks: the exit code; for a user error (exit 2) that stderr is exactly one line starting with
`unifusion: error:`; no traceback; that the message matches the case's pattern (naming the problem
and the fix); and any extra check of the files left behind. tests/test_run_safety.py runs the same
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


def _pickle(d: Path, run: Path) -> None:
    import torch
    torch.save({"net.weight": torch.zeros(2, 2)}, d / "model.pt")


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


def _every_key(d: Path, out: str, err: str) -> str | None:
    """`train --help` lists every config key as `--key  type  (default ...)`."""
    from dataclasses import fields

    from unifusion.config import TrainConfig, flag
    missing = [flag(f.name) for f in fields(TrainConfig)
               if not re.search(rf"^\s+{re.escape(flag(f.name))}\s+{f.type}\s+\(default ", out, re.M)]
    return f"keys without type and default: {missing}" if missing else None


def _every_sampler(d: Path, out: str, err: str) -> str | None:
    from unifusion.samplers import names
    listed = re.search(r"^samplers: (.*)$", out, re.M)
    missing = sorted(set(names()) - set(listed.group(1).split(", ") if listed else []))
    return f"samplers not listed: {missing}" if missing else None


S = ("sample", "--checkpoint", "run")  # sampling the copied tiny run
N2 = ("--n", "2", "--out", "s.npz")

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
    try:
        p = subprocess.run([sys.executable, "-m", "unifusion", *argv], cwd=cwd, env=_env(), capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return None, text(e.stdout), text(e.stderr)
    return p.returncode, p.stdout, p.stderr


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


def run_case(case: Case, root: Path, run: Path, inprocess: bool = False) -> dict:
    """Set the case up in root/<name>, run it there, and judge it."""
    folder = root / case.name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if case.setup is not None:
        case.setup(folder, run)
    t0 = time.perf_counter()
    code, out, err = unifusion(list(case.argv), folder, inprocess)
    seconds = time.perf_counter() - t0
    found = problems(case, code, out, err, folder)
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
