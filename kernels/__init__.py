"""Fused kernels (this folder is installed as `p2p_engine.kernels`): attention driven by control plans
(`p2p_engine.plan`), and GroupNorm with its SiLU on channels-last activations.

One op per file, each with its Triton kernel, launcher and the pure-torch
reference of the same signature (the reference is also the CPU production
path of `backend="torch"`). No backward: see the kernel docstrings.
"""
from .cross_attention import cross_attention, cross_attention_reference
from .group_norm import group_norm, group_norm_reference
from .self_attention import self_attention, self_attention_reference

__all__ = ["cross_attention", "cross_attention_reference", "group_norm", "group_norm_reference", "self_attention",
           "self_attention_reference"]
