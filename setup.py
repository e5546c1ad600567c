"""Builds p2p_engine with its C++ extension (p2p_engine._native, from csrc/).

`kernels/` is installed as `p2p_engine.kernels`, so no top-level module named
`kernels` lands in site-packages.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

native = Pybind11Extension(
    "p2p_engine._native",
    sorted(glob("csrc/*.cpp")),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="p2p-engine",
    version="0.1.0",
    description="Fast Prompt-to-Prompt editing and null-text inversion for Stable Diffusion",
    python_requires=">=3.10",
    packages=["p2p_engine", "p2p_engine.kernels"],
    package_dir={"p2p_engine": "p2p_engine", "p2p_engine.kernels": "kernels"},
    package_data={"p2p_engine": ["data/*", "data/toy/*", "data/toy/*/*"]},
    ext_modules=[native],
    cmdclass={"build_ext": build_ext},
    install_requires=["torch", "triton", "safetensors", "transformers", "numpy", "pillow", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark", "diffusers"]},
    entry_points={"console_scripts": ["p2p-engine=p2p_engine.cli:main"]},
)
