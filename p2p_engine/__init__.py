"""Prompt-to-Prompt editing engine for Stable Diffusion 1.x/2.x."""
from .checkpoint import save_random_checkpoint
from .controllers import LocalBlend, Refine, Replace, Reweight, Store
from .inversion import Inversion
from .loading import CheckpointError, load
from .pipeline import Pipeline

__all__ = ["load", "save_random_checkpoint", "CheckpointError", "Pipeline",
           "Store", "Replace", "Refine", "Reweight", "LocalBlend", "Inversion"]
