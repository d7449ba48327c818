"""`--compile`: the training loss of every network family traces into one graph (no graph
breaks), so torch.compile compiles the whole forward and backward; checked with
torch._dynamo.explain (tracing only, no inductor compile, so it is fast). The step-time gain is
measured in benchmarks/compile_step.py."""
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
