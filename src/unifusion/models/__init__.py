"""The model layer: every model family is a `Model` (base.py) described by a saved `ModelSpec`
(spec.py), one file per family (diffusion.py; flows.py: flow-nice, flow-realnvp, flow-glow;
cnf.py; autoencoder.py, with load_autoencoder for ours and diffusers' AutoencoderKL; fewstep.py: the
"student" family, distilled and consistency models); io.py reads and writes model folders;
registry.py maps family names to classes (the package's below, one line each; others by
`register` or the `unifusion.families` entry point).

    model = uf.models.load("runs/digits")          # a run, a checkpoint or a model folder
    x = model.sample(seeds=range(64), sampler="dpmpp_2m", nfe=20)
    uf.models.register("my-family", MyModel)       # a family from outside the package
"""
from __future__ import annotations

from .autoencoder import AutoencoderModel
from .base import Model
from .cnf import CNFModel
from .diffusion import DiffusionModel
from .fewstep import StudentModel
from .flows import COUPLING_FAMILIES, CouplingFlowModel
from .registry import FAMILIES, register
from .spec import ModelSpec
from .textimage import TextImageModel

register("diffusion", DiffusionModel)
register("cnf", CNFModel)
for _name, _cls in COUPLING_FAMILIES.items():
    register(_name, _cls)
register("autoencoder", AutoencoderModel)
register("student", StudentModel)
register("text-image", TextImageModel)


def build(spec: ModelSpec) -> Model:
    """A freshly initialised model of the spec's family."""
    spec.validate()
    return registry.get(spec.family)(spec)


from .io import load, read, save  # noqa: E402  (io needs build)

from . import registry  # noqa: E402

__all__ = ["Model", "ModelSpec", "DiffusionModel", "CNFModel", "CouplingFlowModel", "AutoencoderModel", "StudentModel",
           "TextImageModel",
           "FAMILIES", "register", "registry", "build", "load", "read", "save"]
