"""The optional CUDA extension ``dualpipe_ext._cuda``: CUTLASS sm90 kernels and their torch binding.

``setup.py`` imports :func:`make_cuda_extension` only when it builds the extension (CUDA torch
and nvcc present, or ``DUALPIPE_EXT_CUDA=1``). CUTLASS headers come from ``CUTLASS_HOME`` when
set, else from the ``nvidia-cutlass`` pip package.
"""
import glob
import os


def cutlass_include_dirs():
    home = os.environ.get("CUTLASS_HOME")
    if home:
        return [os.path.join(home, "include"), os.path.join(home, "tools", "util", "include")]
    try:
        import cutlass_library
    except ImportError as e:
        raise RuntimeError(
            "building dualpipe_ext._cuda needs the CUTLASS headers: pip install nvidia-cutlass, or set CUTLASS_HOME"
        ) from e
    source = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    return [os.path.join(source, "include"), os.path.join(source, "tools", "util", "include")]


def cuda_arch_flags():
    archs = os.environ.get("DUALPIPE_EXT_CUDA_ARCHS", "90a")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";") if a.strip()]


def make_cuda_extension(root):
    from torch.utils.cpp_extension import CUDAExtension

    here = os.path.join(root, "csrc", "cuda")
    sources = sorted(glob.glob(os.path.join(here, "*.cu")) + glob.glob(os.path.join(here, "*.cpp")))
    return CUDAExtension(
        "dualpipe_ext._cuda",
        [os.path.relpath(s, root) for s in sources],
        include_dirs=[here] + cutlass_include_dirs(),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-DNDEBUG"]
            + cuda_arch_flags(),
        },
    )
