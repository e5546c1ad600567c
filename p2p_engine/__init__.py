"""Prompt-to-Prompt editing engine for Stable Diffusion 1.x/2.x and SDXL."""
from .attention import triton_interpreter

# Before anything imports triton.language (transformers does, when a model is built): see triton_interpreter.
triton_interpreter()

from .batch import EditRequest  # noqa: E402
from .checkpoint import save_random_checkpoint  # noqa: E402
from .controllers import LocalBlend, MasaCtrl, PlugAndPlay, Refine, Replace, Reweight, Store  # noqa: E402
from .inversion import Inversion  # noqa: E402
from .loading import CheckpointError, load  # noqa: E402
from .pipeline import Pipeline  # noqa: E402

__all__ = ["load", "save_random_checkpoint", "CheckpointError", "Pipeline",
           "Store", "Replace", "Refine", "Reweight", "LocalBlend", "MasaCtrl", "PlugAndPlay", "Inversion",
           "EditRequest"]
