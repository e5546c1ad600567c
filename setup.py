"""Builds p2p_engine with its C++ extension (p2p_engine._native, from csrc/).

`kernels/` is installed as `p2p_engine.kernels`, so no top-level module named
`kernels` lands in site-packages.
"""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

SERVE = ["fastapi>=0.165,<0.166", "uvicorn>=0.55,<0.56", "python-multipart>=0.0.34,<0.0.35"]

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
    # every subpackage of p2p_engine/ (toy, serve, and any added later), and kernels/ installed inside it
    packages=find_packages(include=["p2p_engine", "p2p_engine.*"]) + ["p2p_engine.kernels"],
    package_dir={"p2p_engine": "p2p_engine", "p2p_engine.kernels": "kernels"},
    package_data={"p2p_engine": ["data/*", "data/toy/*", "data/toy/*/*"], "p2p_engine.serve": ["static/*"]},
    ext_modules=[native],
    cmdclass={"build_ext": build_ext},
    # Lower bounds: releases the whole suite passed on (benchmarks/gpu_releases.sh is the GPU machine's set:
    # torch 2.11, triton 3.6, transformers 5.17, NumPy 2.3). Upper bounds: below the next release line that no
    # run has tried; benchmarks/newest_releases.sh tries the newest releases with and without them. The exact
    # set CI tests is constraints.txt.
    install_requires=[
        "torch>=2.11,<2.16",
        "triton>=3.6,<3.10",
        "transformers>=5.17,<5.26",
        "safetensors>=0.6,<0.9",
        "numpy>=2.3,<2.5",
        "pillow>=11,<14",
        "tqdm>=4.66,<5",
    ],
    # `serve`: the HTTP service (p2p_engine/serve), tested with FastAPI 0.165, uvicorn 0.55, python-multipart 0.0.34
    # (the lower bounds: FastAPI's strict JSON bodies and uvicorn's Server hooks as used there); the tests drive its
    # page in Chromium through Playwright.
    extras_require={"serve": SERVE,
                    "test": ["pytest>=8.3,<10", "pytest-benchmark>=5.1,<6", "diffusers>=0.42.1,<0.43", *SERVE,
                             "playwright>=1.65,<1.66",
                             # to rebuild the extension and build the wheel without build isolation (test_install)
                             "pybind11>=2.12,<3.2", "setuptools>=64,<85", "wheel>=0.40,<0.49"]},
    entry_points={"console_scripts": ["p2p-engine=p2p_engine.cli:main"]},
)
