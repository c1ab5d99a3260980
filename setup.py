"""Build script for preflexor.

Builds the optional compiled extension ``preflexor_core._C`` from ``csrc/``:
a CppExtension (OpenMP) under a CPU-only torch, a CUDAExtension (CPU + CUDA
sources) when torch has CUDA and nvcc is available. Target GPU architectures
come from ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0").

Install for development (torch must already be installed):
    pip install --no-build-isolation -e .
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = bool(cu) and torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or cpp_extension.CUDA_HOME is not None
    ) and os.environ.get("PREFLEXOR_NO_CUDA", "0") != "1"
    # Portable flags only (no -march=native): the wheel may run on another CPU than the build host.
    # torch >= 2.10 headers need C++20.
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    libs = ["gomp"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "preflexor_core._C", cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DPREFLEXOR_WITH_CUDA"],
                                # no --use_fast_math: sampling divides logits by the temperature and
                                # must match the torch reference bit for bit before the selection.
                                "nvcc": ["-O3", "-std=c++20", "-DPREFLEXOR_WITH_CUDA"]},
            libraries=libs)
    else:
        ext = cpp_extension.CppExtension(
            "preflexor_core._C", cpp, extra_compile_args=cxx, libraries=libs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="preflexor",
    version="0.1.0",
    description="Preference-based recursive language modeling (PRefLexOR) from scratch on torch + triton",
    packages=find_packages(include=["preflexor_core", "preflexor_core.*"]),
    package_data={"preflexor_core": ["corpus/*", "corpus/**/*"]},
    py_modules=["train", "infer"],
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
