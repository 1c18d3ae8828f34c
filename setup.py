"""Build script for fastpeft.

The pure-Python package (``fastpeft`` plus the Triton kernels in ``kernels/``, installed as
``fastpeft.kernels``) always installs. The CUDA extension ``fastpeft._C`` is built from ``csrc/`` only when

* ``FASTPEFT_BUILD_CUDA=1``, or
* ``FASTPEFT_BUILD_CUDA`` is unset, torch is importable in the build environment, torch was built with CUDA
  and ``nvcc`` is found (``CUDA_HOME`` or ``PATH``).

``FASTPEFT_BUILD_CUDA=0`` never builds it. Because the extension links against torch, build it with
``pip install --no-build-isolation .`` so the build sees the torch you run with (otherwise pip's isolated
build environment has no torch and the extension is skipped with a warning, never an error).

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``8.0;9.0a``); ``MAX_JOBS`` caps parallel
nvcc jobs (default: one per 4 GiB of free memory, at most the core count).
"""

import os
import shutil
import warnings
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCH_LIST = "8.0;9.0a"


def _build_cuda_requested():
    flag = os.environ.get("FASTPEFT_BUILD_CUDA", "").strip()
    if flag == "0":
        return False, "FASTPEFT_BUILD_CUDA=0"
    forced = flag == "1"
    try:
        import torch  # noqa: F401  (only the build needs it; never imported at module scope)
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        if forced:
            raise RuntimeError("FASTPEFT_BUILD_CUDA=1 but torch is not importable in the build environment; "
                               "install torch first and use `pip install --no-build-isolation`.")
        return False, "torch is not importable in the build environment (use --no-build-isolation)"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if forced:
        if not nvcc:
            raise RuntimeError("FASTPEFT_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME).")
        return True, "FASTPEFT_BUILD_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch was built without CUDA"
    if not nvcc:
        return False, "nvcc not found (set CUDA_HOME or add it to PATH)"
    return True, f"CUDA {torch.version.cuda} and nvcc found"


def _default_max_jobs():
    try:
        pages, page_size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        by_memory = max(1, (pages * page_size) // (4 << 30))
    except (ValueError, OSError, AttributeError):
        by_memory = 1
    return str(min(os.cpu_count() or 1, by_memory))


def _cuda_extensions():
    build, why = _build_cuda_requested()
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu")) + \
        sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not build or not sources:
        if not build:
            warnings.warn(f"fastpeft: not building the CUDA extension ({why}); the Triton and PyTorch paths "
                          "still work.", stacklevel=1)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    ext = CUDAExtension(
        name="fastpeft._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()

setup(
    packages=["fastpeft", "fastpeft.ops", "fastpeft.integration", "fastpeft.kernels"],
    package_dir={"fastpeft": "fastpeft", "fastpeft.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
