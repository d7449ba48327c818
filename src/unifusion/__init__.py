"""unifusion: every diffusion and flow model from one formulation, x_t = s(t) (x_0 + sigma(t) n)."""
from . import guidance, likelihood, parametrizations, processes, samplers
from .samplers import sample
from . import models  # noqa: E402  (the model layer builds on the modules above)

__version__ = "0.2.0"
__all__ = ["sample", "samplers", "processes", "parametrizations", "guidance", "likelihood", "models"]
