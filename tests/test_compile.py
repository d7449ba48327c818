"""`--compile`: the training loss of every network family traces into one graph (no graph
breaks), so torch.compile compiles the whole forward and backward; checked with
torch._dynamo.explain (tracing only, no inductor compile, so it is fast). The step-time gain is
measured in benchmarks/compile_step.py (CPU) and benchmarks/gpu.py (CUDA, with CUDA graphs).

The option takes a mode: off | default (true) | reduce-overhead | max-autotune; reduce-overhead
(CUDA graphs) is refused with a one-line error on a CPU, before the run folder is touched."""
from pathlib import Path

import pytest
import torch
import torch._dynamo as dynamo

from unifusion import config as C
from unifusion import data, models

CASES = {  # name -> (data, config)
    "unet-edm-class-conditional": ("digits-train", {}),
    "unet-flow-matching": ("digits-train", {"process": "flow", "parametrization": "velocity",
                                             "noise_density": "logit_normal"}),
    "dit-vp-eps": ("digits-train", {"network": "dit-s2", "process": "vp", "parametrization": "eps",
                                     "network_args": {"input_size": 8, "in_channels": 1, "hidden_size": 32,
                                                      "depth": 1, "num_heads": 2}}),
    "dit-flow-velocity-class-conditional": ("digits-train", {
        "network": "dit-s2", "process": "flow", "parametrization": "velocity", "noise_density": "logit_normal",
        "network_args": {"input_size": 8, "in_channels": 1, "hidden_size": 32, "depth": 1, "num_heads": 2,
                         "qk_norm": "rms"}}),
    "mmdit-image-only": ("digits-train", {"network": "mmdit-s", "network_args": {
        "input_size": 8, "in_channels": 1, "hidden_size": 32, "depth": 2, "num_heads": 2, "context_dim": 0}}),
    "mlp-ddpm": ("moons", {"network": "mlp-2d", "process": "ddpm", "parametrization": "eps",
                           "noise_density": "discrete", "network_args": {"hidden": 32, "depth": 2}}),
    "flow-nice": ("digits-train", {"family": "flow-nice", "network_args": {"hidden": 32}}),
    "flow-realnvp": ("digits-train", {"family": "flow-realnvp", "network_args": {"hidden": 8, "blocks": 1}}),
    "flow-glow": ("digits-train", {"family": "flow-glow", "network_args": {"hidden": 8, "steps": 1}}),
    "flow-glow-variational": ("digits-train", {"family": "flow-glow", "dequantization": "variational",
                                               "network_args": {"hidden": 8, "steps": 1}}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_training_loss_has_no_graph_breaks(name):
    source, overrides = CASES[name]
    src = data.load(source, **({"n": 64} if source == "moons" else {}))
    model = models.build(C.model_spec(C.from_dict({"data": source, **overrides}), src))
    batch = src.batch(list(range(8)))
    model.initialize(batch)  # as the trainer does before compiling
    batch.update(model.random(8, torch.Generator().manual_seed(0)))
    dynamo.reset()
    report = dynamo.explain(model)(batch)
    assert report.graph_break_count == 0, [str(r.reason).splitlines()[0] for r in report.break_reasons]
    assert report.graph_count == 1


@pytest.mark.parametrize("given, mode", [(True, "default"), (False, "off"), ("true", "default"), ("no", "off"),
                                         ("default", "default"), ("reduce-overhead", "reduce-overhead"),
                                         ("max-autotune", "max-autotune")])
def test_the_compile_option_takes_a_mode_and_the_old_booleans(given, mode):
    assert C.from_dict({"compile": given}).compile == mode
    assert C.stored_config({"compile": given}).compile == mode  # configs stored with the boolean key
    assert C.from_dict({"compile": given}).to_dict()["compile"] == mode


def test_an_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="--compile 'fast' is not valid; choose one of"):
        C.from_dict({"compile": "fast"})


def test_reduce_overhead_is_refused_on_the_cpu_with_one_line(tmp_path):
    from unifusion.training import loop as L
    cfg = C.from_dict({"data": "moons", "network": "mlp-2d", "compile": "reduce-overhead", "device": "cpu",
                       "steps": 2, "out": str(tmp_path / "run")})
    with pytest.raises(ValueError, match="needs a CUDA device; this run is on cpu: use --compile default") as e:
        L.train(cfg, progress=False)
    assert "\n" not in str(e.value) and not Path(tmp_path / "run").exists()


@pytest.mark.parametrize("given, mode", [("off", None), (False, None), ("default", "default"), (True, "default"),
                                         ("reduce-overhead", "reduce-overhead")])
def test_the_mode_reaches_torch_compile(monkeypatch, given, mode):
    from unifusion.training import distributed
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None, **k: seen.append(mode) or m)
    dist = distributed.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    net = torch.nn.Linear(2, 2)
    assert dist.wrap(net, compile=given) is net
    assert seen == ([mode] if mode else [])
