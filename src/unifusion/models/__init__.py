"""The model layer: every model family is a `Model` (base.py) described by a saved `ModelSpec`
(spec.py), one file per family (diffusion.py; flows.py: flow-nice, flow-realnvp, flow-glow;
cnf.py; autoencoder.py, with load_autoencoder for ours and diffusers' AutoencoderKL; fewstep.py: the
"student" family, distilled and consistency models); io.py reads and writes model folders.

    model = uf.models.load("runs/digits")          # a run, a checkpoint or a model folder
    x = model.sample(seeds=range(64), sampler="dpmpp_2m", nfe=20)
"""
from __future__ import annotations

from .autoencoder import AutoencoderModel
from .base import Model
from .cnf import CNFModel
from .diffusion import DiffusionModel
from .fewstep import StudentModel
from .flows import COUPLING_FAMILIES, CouplingFlowModel
from .spec import ModelSpec

FAMILIES: dict[str, type[Model]] = {"diffusion": DiffusionModel, "cnf": CNFModel, **COUPLING_FAMILIES,
                                    "autoencoder": AutoencoderModel, "student": StudentModel}


def build(spec: ModelSpec) -> Model:
    """A freshly initialised model of the spec's family."""
    spec.validate()
    return FAMILIES[spec.family](spec)


from .io import load, read, save  # noqa: E402  (io needs build)

__all__ = ["Model", "ModelSpec", "DiffusionModel", "CNFModel", "CouplingFlowModel", "AutoencoderModel", "StudentModel",
           "FAMILIES", "build", "load", "read", "save"]
