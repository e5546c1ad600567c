"""Names of ours never shadow a dependency's, from the repository root as from anywhere.

transformers >= 5.25 imports Hugging Face's `kernels` distribution when a CLIP model loads; a Python started at the
repository root (tests, `python -c`, a notebook) finds the checkout's `kernels/` folder first. These run in
subprocesses at the root, where the shadowing happened.
"""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_at_root(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def top_level_names() -> list[str]:
    """What `import NAME` finds in the repository root: packages (folders with __init__.py) and modules."""
    names = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    names += [p.stem for p in ROOT.glob("*.py")]
    return sorted(names)


def test_the_toy_model_loads_from_the_root_after_transformers_hub_kernels():
    done = run_at_root("import transformers.integrations.hub_kernels\n"
                       "import p2p_engine as p2p\n"
                       "pipe = p2p.load('toy')\n"
                       "print(pipe.family)")
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("name", top_level_names())
def test_no_top_level_name_of_ours_shadows_an_installed_distribution(name):
    owners = set(importlib.metadata.packages_distributions().get(name, [])) - {"p2p-engine", "p2p_engine"}
    if not owners:
        # nobody else owns it here; `kernels` is owned wherever transformers >= 5.25 is installed
        assert name != "kernels" or "kernels" not in {d.metadata["Name"] for d in importlib.metadata.distributions()}
        return
    done = run_at_root(f"import {name}, os; print(os.path.realpath({name}.__file__))")
    assert done.returncode == 0, done.stderr[-3000:]
    found = Path(done.stdout.strip().splitlines()[-1])
    ours = (ROOT / name, ROOT / f"{name}.py")
    assert not any(found == p or p in found.parents for p in ours), \
        f"`import {name}` at the root found {found}, not {sorted(owners)}'s"


def test_our_kernels_are_not_importable_under_the_top_level_name():
    done = run_at_root("import importlib.util\n"
                       "print(importlib.util.find_spec('kernels.cross_attention') is None)")
    # with Hugging Face's package installed, its own path holds no cross_attention; without it, `kernels` fails
    assert (done.returncode == 0 and done.stdout.strip() == "True") or "ModuleNotFoundError" in done.stderr


def test_without_the_distribution_the_checkouts_folder_says_what_it_is():
    done = run_at_root("import sys\n"
                       "sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
                       "import kernels")
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr and "p2p_engine.kernels" in done.stderr, done.stderr[-2000:]


def test_the_package_finds_its_kernels_under_its_own_name():
    done = run_at_root("import p2p_engine.kernels as k, os\n"
                       "print(k.__name__, callable(k.cross_attention), callable(k.self_attention))")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["p2p_engine.kernels", "True", "True"]


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_runs_outside_the_checkout(tmp_path):
    """`pip wheel .` then the wheel alone (installed into a folder, dependencies from this environment) runs the
    toy edit through Python and the CLI from a folder outside the repository."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("p2p_engine-*.whl")
    import zipfile
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"p2p_engine/{p.relative_to(ROOT / 'p2p_engine').as_posix()}" for p in (ROOT / "p2p_engine").rglob("*.py")}
    sources |= {f"p2p_engine/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    data = {f"p2p_engine/{p.relative_to(ROOT / 'p2p_engine').as_posix()}" for folder in ("data", "serve/static")
            for p in (ROOT / "p2p_engine" / folder).rglob("*") if p.is_file()}
    assert not (sources | data) - names, f"missing from the wheel: {sorted((sources | data) - names)}"
    assert any(n.startswith("p2p_engine/_native.") for n in names), "the compiled aligner is not in the wheel"
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "user"
    elsewhere.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(site)}
    python = subprocess.run(
        [sys.executable, "-c",
         "import p2p_engine as p2p, os\n"
         "assert p2p.__file__.startswith(os.environ['PYTHONPATH']), p2p.__file__\n"
         "from p2p_engine.toy.dataset import make_scene\n"
         "pipe = p2p.load('toy')\n"
         "out = pipe.edit(['a big red circle on a white background', 'a big blue circle on a white background'],"
         " controller=p2p.Replace(), steps=4, progress=False)\n"
         "out.images[1].save('blue.png')"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert python.returncode == 0, python.stderr[-3000:]
    cli = subprocess.run(
        [sys.executable, "-m", "p2p_engine", "edit", "--model", "toy", "--steps", "4",
         "--prompt", "a big red circle on a white background",
         "--target", "a big blue circle on a white background", "--out", "edit.png"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert (elsewhere / "blue.png").stat().st_size > 0 and (elsewhere / "edit.png").stat().st_size > 0
