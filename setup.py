"""Build of dualpipe-ext.

Always builds the C++ schedule core as ``dualpipe_ext._C`` (pybind11, no libtorch).

The CUDA sources in ``csrc/cuda`` are an optional second extension, ``dualpipe_ext._cuda``:
  DUALPIPE_EXT_CUDA=1      build it (fails loudly if torch with CUDA or nvcc is missing)
  DUALPIPE_EXT_CUDA=0      skip it
  unset                    build it when torch with CUDA and nvcc are both found
  DUALPIPE_EXT_CUDA_ARCHS  semicolon list of SM versions, default "90a"
  MAX_JOBS                 parallel compile jobs (default: min(cores, free GiB / 4))
The CUDA build imports torch, so install with ``--no-build-isolation`` for it.
"""
import glob
import os
import shutil
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def default_jobs() -> int:
    """Parallel compile jobs: one per core, at most one per 4 GiB of available memory."""
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        by_memory = max(1, avail_kib // (4 << 20))
    except (OSError, StopIteration, ValueError):
        by_memory = os.cpu_count() or 1
    return max(1, min(os.cpu_count() or 1, by_memory))


os.environ.setdefault("MAX_JOBS", str(default_jobs()))  # read by ParallelCompile and torch's ninja build
ParallelCompile("MAX_JOBS").install()


def core_extension():
    sources = sorted(
        p for p in glob.glob("csrc/**/*.cpp", recursive=True) if not p.startswith(os.path.join("csrc", "cuda"))
    )
    return Pybind11Extension(
        "dualpipe_ext._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        cxx_std=17,
        extra_compile_args=["-O2"],
    )


def want_cuda():
    flag = os.environ.get("DUALPIPE_EXT_CUDA")
    if flag == "0":
        return False, "DUALPIPE_EXT_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        if flag == "1":
            sys.exit("DUALPIPE_EXT_CUDA=1 needs torch importable at build time: pip install --no-build-isolation .")
        return False, "torch not importable at build time"
    has_cuda = torch.version.cuda is not None
    nvcc = CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")
    if flag == "1":
        if not has_cuda or not nvcc:
            sys.exit(f"DUALPIPE_EXT_CUDA=1 needs a CUDA build of torch (found {torch.__version__}) and nvcc")
        return True, "DUALPIPE_EXT_CUDA=1"
    if has_cuda and nvcc:
        return True, "CUDA torch and nvcc found"
    return False, "no CUDA torch" if not has_cuda else "no nvcc"


def cuda_extensions():
    from cuda_build import make_cuda_extension  # csrc/cuda/cuda_build.py

    return [make_cuda_extension(ROOT)]


class build_py_with_kernels(build_py):
    """Copies the Triton sources of the top-level kernels/ into the built dualpipe_ext/kernels/.

    kernels/ has no __init__.py, so that from the repository root ``import kernels`` finds the
    distribution of that name (transformers needs it); a source tree or an editable install
    reaches the folder through dualpipe_ext/kernels/__init__.py instead.
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "dualpipe_ext", "kernels")
        self.mkpath(target)
        for source in sorted(glob.glob(os.path.join("kernels", "*.py"))):
            self.copy_file(source, os.path.join(target, os.path.basename(source)))


ext_modules = [core_extension()]
cmdclass = {"build_ext": build_ext, "build_py": build_py_with_kernels}
build_cuda, reason = want_cuda()
if build_cuda:
    sys.path.insert(0, os.path.join(ROOT, "csrc", "cuda"))
    from torch.utils.cpp_extension import BuildExtension

    ext_modules += cuda_extensions()
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
print(f"[dualpipe-ext] C++ core: yes; CUDA extension: {'yes' if build_cuda else 'no'} ({reason})", flush=True)

setup(
    packages=find_packages(include=["dualpipe_ext", "dualpipe_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
