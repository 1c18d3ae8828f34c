"""Build script for fastpeft.

The pure-Python package (``fastpeft`` plus the Triton kernels in ``fastpeft_kernels/``, installed as
``fastpeft.kernels``) always installs. Two optional C++ extensions link against torch, so they are built only when
torch is importable in the build environment: ``pip install --no-build-isolation .`` (or ``-e .``) so the build
sees the torch you run with; in pip's isolated build environment there is no torch and both are skipped with a
warning, never an error. A binary built against one torch does not load in another (``undefined symbol``):
rebuild after upgrading. Without them every op still runs (Triton / PyTorch paths).

The CPU extension ``fastpeft._cpu`` (``csrc/cpu/*.cpp``: the short-sequence CPU attention without Python's
per-call overhead) is built when ``FASTPEFT_BUILD_CPU`` is unset (a failure to compile is then a warning) or
``1`` (a failure is an error); ``FASTPEFT_BUILD_CPU=0`` never builds it.

The CUDA extension ``fastpeft._C`` (``csrc/*.cu`` + ``csrc/*.cpp``) is built when

* ``FASTPEFT_BUILD_CUDA=1`` (a failure is then an error), or
* ``FASTPEFT_BUILD_CUDA`` is unset, torch is importable in the build environment, torch was built with CUDA
  and ``nvcc`` is found (``CUDA_HOME`` or ``PATH``). A failure to compile is then a warning and the package
  installs without the extension.

``FASTPEFT_BUILD_CUDA=0`` never builds it.

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures (default ``8.0+PTX;9.0a``); ``MAX_JOBS`` caps parallel
nvcc jobs (default: one per 4 GiB of available memory, at most the core count).
"""

import os
import shutil
import warnings
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
# sm_80 code runs on every 8.x GPU, its PTX lets newer GPUs JIT it; sm_90a is the Hopper build.
DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"
MEMORY_PER_JOB = 4 << 30  # peak of one nvcc job on the templated kernels, with margin


def _build_flag(environ, name):
    flag = environ.get(name, "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"{name} must be 0, 1 or unset, got {flag!r}")
    return flag


def _torch_importable():
    try:
        import torch  # noqa: F401  (only the build needs it, and only here)
    except ImportError:
        return False
    return True


def build_cpu_decision(environ=None):
    """``(build, forced, reason)`` for ``fastpeft._cpu``, as ``build_cuda_decision`` for the CUDA extension."""
    environ = os.environ if environ is None else environ
    flag = _build_flag(environ, "FASTPEFT_BUILD_CPU")
    if flag == "0":
        return False, False, "FASTPEFT_BUILD_CPU=0"
    forced = flag == "1"
    if not _torch_importable():
        if forced:
            raise RuntimeError("FASTPEFT_BUILD_CPU=1 but torch is not importable in the build environment; "
                               "install torch first and use `pip install --no-build-isolation`.")
        return False, False, "torch is not importable in the build environment (use --no-build-isolation)"
    return True, forced, "FASTPEFT_BUILD_CPU=1" if forced else "torch importable"


def build_cuda_decision(environ=None):
    """``(build, forced, reason)``: whether to build ``fastpeft._C``, whether the user demanded it, and why.

    Raises RuntimeError only when ``FASTPEFT_BUILD_CUDA=1`` asks for a build that cannot happen.
    """
    environ = os.environ if environ is None else environ
    flag = _build_flag(environ, "FASTPEFT_BUILD_CUDA")
    if flag == "0":
        return False, False, "FASTPEFT_BUILD_CUDA=0"
    forced = flag == "1"
    try:
        import torch  # only the build needs it, and only here
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        if forced:
            raise RuntimeError("FASTPEFT_BUILD_CUDA=1 but torch is not importable in the build environment; "
                               "install torch first and use `pip install --no-build-isolation`.") from None
        return False, False, "torch is not importable in the build environment (use --no-build-isolation)"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if forced:
        if not nvcc:
            raise RuntimeError("FASTPEFT_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or add it to PATH).")
        return True, True, "FASTPEFT_BUILD_CUDA=1"
    if torch.version.cuda is None:
        return False, False, "torch was built without CUDA"
    if not nvcc:
        return False, False, "nvcc not found (set CUDA_HOME or add it to PATH)"
    return True, False, f"torch {torch.__version__} with CUDA {torch.version.cuda} and nvcc found"


def default_max_jobs():
    """Parallel nvcc jobs: one per MEMORY_PER_JOB of available memory, at most the core count, at least 1."""
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = MEMORY_PER_JOB
    return max(1, min(os.cpu_count() or 1, available // MEMORY_PER_JOB))


def _sources(pattern):
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _cpu_extension():
    """``(extension or None, forced)`` for ``fastpeft._cpu``."""
    build, forced, why = build_cpu_decision()
    if not build:
        if why != "FASTPEFT_BUILD_CPU=0":  # an explicit opt-out needs no warning
            warnings.warn(f"fastpeft: not building the CPU extension ({why}); short CPU attention runs in Python "
                          "(same results, slower).", stacklevel=1)
        return None, False
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(name="fastpeft._cpu", sources=_sources("csrc/cpu/*.cpp"),
                        # OpenMP as torch's own CPU kernels: at::parallel_for and `omp simd` (vectorized reductions)
                        # need it in this translation unit; the runtime is the libgomp torch has loaded already.
                        extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]), forced


def _cuda_extension():
    """``(extension or None, forced)`` for ``fastpeft._C``."""
    build, forced, why = build_cuda_decision()
    if not build:
        if why != "FASTPEFT_BUILD_CUDA=0":
            warnings.warn(f"fastpeft: not building the CUDA extension ({why}); the Triton and PyTorch paths "
                          "still work.", stacklevel=1)
        return None, False
    sources = _sources("csrc/*.cu") + _sources("csrc/*.cpp")
    if not sources:
        raise RuntimeError(f"no CUDA sources under {ROOT / 'csrc'}")
    from torch.utils.cpp_extension import CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    extension = CUDAExtension(
        name="fastpeft._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                     "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    )
    return extension, forced


def _extensions():
    """``(ext_modules, cmdclass)``: the extensions to build and a ``build_ext`` that, for an extension whose build
    was not forced, turns a failed compile (compiler error, CUDA/torch version mismatch) into a warning and
    installs without it."""
    chosen = [_cpu_extension(), _cuda_extension()]
    forced = {ext.name for ext, is_forced in chosen if ext is not None and is_forced}
    extensions = [ext for ext, _ in chosen if ext is not None]
    if not extensions:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    class BuildOptionalExtensions(BuildExtension):
        def build_extensions(self):
            self.failed_extensions = set()
            super().build_extensions()
            # A failed one must not be copied into the install (editable installs copy every extension's output).
            self.extensions = [ext for ext in self.extensions if ext.name not in self.failed_extensions]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if ext.name in forced:
                    raise
                kind = "CUDA" if ext.name == "fastpeft._C" else "CPU"
                warnings.warn(f"fastpeft: building the {kind} extension {ext.name} failed "
                              f"({exc.__class__.__name__}: {exc}); installing without it (the other paths still "
                              f"work). Set FASTPEFT_BUILD_{kind}=1 to make this an error.", stacklevel=1)
                self.failed_extensions.add(ext.name)

    return extensions, {"build_ext": BuildOptionalExtensions.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import the helpers
    ext_modules, cmdclass = _extensions()
    setup(
        # Every subpackage of fastpeft/, plus fastpeft_kernels/ installed as fastpeft.kernels (a top-level folder named
        # kernels/ would shadow Hugging Face's `kernels` package whenever the repository root is on sys.path).
        packages=find_packages(include=["fastpeft", "fastpeft.*"]) + ["fastpeft.kernels"],
        package_dir={"fastpeft": "fastpeft", "fastpeft.kernels": "fastpeft_kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
