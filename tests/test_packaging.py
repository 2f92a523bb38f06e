"""The project installs one top-level name, dualpipe_ext, and shadows nothing from the repository root."""
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_from_root(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` with the repository root first on sys.path, as ``python -m`` from there does."""
    return subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); {code}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_imports_from_the_repo_root():
    done = run_from_root("import transformers.activations, kernels; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr
    assert not done.stdout.strip().startswith(os.path.join(ROOT, "kernels")), done.stdout


def test_kernel_sources_are_not_a_top_level_package():
    done = run_from_root("import kernels.routing")
    assert done.returncode != 0
    assert "ImportError" in done.stderr or "ModuleNotFoundError" in done.stderr, done.stderr
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))


def test_kernels_import_as_dualpipe_ext_kernels():
    done = run_from_root("import dualpipe_ext.kernels.routing as r; print(r.__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["dualpipe_ext.kernels.routing"]


def test_a_built_package_holds_one_top_level_name(tmp_path):
    """build_py lays out what a wheel installs: dualpipe_ext alone, with the kernel sources inside it."""
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "DUALPIPE_EXT_CUDA": "0"})
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path)) == ["dualpipe_ext"]
    built = {os.path.basename(p) for p in glob.glob(os.path.join(tmp_path, "dualpipe_ext", "kernels", "*.py"))}
    sources = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "kernels", "*.py"))}
    assert sources and sources | {"__init__.py"} == built


def test_subpackages_resolve_on_first_attribute_access():
    done = run_from_root("import dualpipe_ext as d; print(d.schedules.get_plan.__name__, d.runtime.DualPipe.__name__, "
                         "d.viz.__name__, d.moe.__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["get_plan", "DualPipe", "dualpipe_ext.viz", "dualpipe_ext.moe"]
