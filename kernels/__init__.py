"""Fused kernels (this folder is installed as `p2p_engine.kernels`): attention driven by control plans
(`p2p_engine.plan`), and GroupNorm with its SiLU on channels-last activations.

One op per file, each with its Triton kernel, launcher and the pure-torch
reference of the same signature (the reference is also the CPU production
path of `backend="torch"`). No backward: see the kernel docstrings.

The top-level name `kernels` belongs to Hugging Face's `kernels` distribution (transformers >= 5.25 imports it).
Where the repository root is on sys.path (tests, `python -c` or a notebook started there), Python finds this
folder first; imported under that name, it steps aside: the module is replaced by the installed distribution, or
the import fails as if this folder were not there. Nothing of ours is importable as `kernels`.
"""
if __name__ == "kernels":
    def _step_aside():
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
        rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", rest)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(
                "No module named 'kernels' (the folder kernels/ in this checkout is p2p_engine.kernels, not "
                "Hugging Face's kernels distribution: `pip install kernels` for that)", name="kernels")
        module = importlib.util.module_from_spec(spec)
        # the import system returns what sys.modules holds once this file has run
        sys.modules["kernels"] = module
        spec.loader.exec_module(module)

    _step_aside()
else:
    from .cross_attention import cross_attention, cross_attention_reference
    from .group_norm import group_norm, group_norm_reference
    from .self_attention import self_attention, self_attention_reference

    __all__ = ["cross_attention", "cross_attention_reference", "group_norm", "group_norm_reference",
               "self_attention", "self_attention_reference"]
