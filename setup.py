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

Both extensions compile with the C++ standard that the torch in the build requires (``torch_cxx_standard``: C++17
up to torch 2.13, C++20 from 2.14). Their sources (``csrc/``) ship in the sdist through MANIFEST.in, whether or not
torch is importable when the sdist is made; a source tree that lacks them skips the extension with a warning
naming the missing files (an error where FASTPEFT_BUILD_*=1 asked for the extension).
"""

import os
import re
import shutil
import warnings
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
# sm_80 code runs on every 8.x GPU, its PTX lets newer GPUs JIT it; sm_90a is the Hopper build.
DEFAULT_ARCH_LIST = "8.0+PTX;9.0a"
MEMORY_PER_JOB = 4 << 30  # peak of one nvcc job on the templated kernels, with margin
CPU_SOURCES = ("csrc/cpu/*.cpp",)
CUDA_SOURCES = ("csrc/*.cu", "csrc/*.cpp")
# The headers of torch that the extensions include and that state the C++ standard torch needs, as
# `#error C++20 or later compatible compiler is required to use PyTorch.` under an `#if __cplusplus < ...` guard.
TORCH_HEADERS_WITH_STANDARD = ("torch/csrc/api/include/torch/all.h", "ATen/ATen.h")
STANDARD_STATEMENT = re.compile(r"#error C\+\+(\d+) or later compatible compiler is required")
LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


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


def missing_source_files(root, patterns):
    """What an extension's build needs but the source tree at ``root`` lacks: each pattern that matches no file, and
    each ``#include "..."`` of a matched file (looked up beside it) that is not there. An sdist made without
    MANIFEST.in lacked all of csrc/, or its headers only."""
    missing = []
    for pattern in patterns:
        sources = sorted(Path(root).glob(pattern))
        if not sources:
            missing.append(pattern)
        for source in sources:
            for included in LOCAL_INCLUDE.findall(source.read_text(errors="replace")):
                if not (source.parent / included).exists():
                    missing.append((source.parent / included).relative_to(root).as_posix())
    return sorted(set(missing))


def _missing_sources_reason(root, patterns):
    missing = missing_source_files(root, patterns)
    if not missing:
        return None
    return (f"its sources are missing from {root} ({', '.join(missing)}): build from a git checkout or from "
            "an sdist that carries csrc/")


def build_cpu_decision(environ=None, root=ROOT):
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
    missing = _missing_sources_reason(root, CPU_SOURCES)
    if missing:
        if forced:
            raise RuntimeError(f"FASTPEFT_BUILD_CPU=1 but the CPU extension cannot be built: {missing}.")
        return False, False, missing
    return True, forced, "FASTPEFT_BUILD_CPU=1" if forced else "torch importable"


def build_cuda_decision(environ=None, root=ROOT):
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
    missing = _missing_sources_reason(root, CUDA_SOURCES)
    if missing:
        if forced:
            raise RuntimeError(f"FASTPEFT_BUILD_CUDA=1 but the CUDA extension cannot be built: {missing}.")
        return False, False, missing
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


def torch_cxx_standard(include_dir):
    """The ``-std`` value (``"c++17"``, ``"c++20"``) for the extensions: the highest standard that the torch headers
    under ``include_dir`` (torch's ``include/`` folder) demand, i.e. the lowest standard they compile under, which
    keeps older host compilers and nvcc working where torch allows them. None where no header states one: then
    torch's BuildExtension adds its own default ``-std`` to the C++ and the nvcc flags."""
    stated = []
    for header in TORCH_HEADERS_WITH_STANDARD:
        path = Path(include_dir) / header
        if path.exists():
            stated += [int(year) for year in STANDARD_STATEMENT.findall(path.read_text(errors="replace"))]
    return f"c++{max(stated)}" if stated else None


def _standard_flags():
    """``["-std=c++NN"]`` for the installed torch (the cxx and the nvcc flags alike), or [] for torch's default."""
    import torch  # only the build needs it, and only here

    standard = torch_cxx_standard(Path(torch.__file__).parent / "include")
    return [f"-std={standard}"] if standard else []


def _sources(patterns):
    return sorted(str(p.relative_to(ROOT)) for pattern in patterns for p in ROOT.glob(pattern))


def _cpu_extension():
    """``(extension or None, forced)`` for ``fastpeft._cpu``."""
    build, forced, why = build_cpu_decision()
    if not build:
        if why != "FASTPEFT_BUILD_CPU=0":  # an explicit opt-out needs no warning
            warnings.warn(f"fastpeft: not building the CPU extension ({why}); short CPU attention runs in Python "
                          "(same results, slower).", stacklevel=1)
        return None, False
    from torch.utils.cpp_extension import CppExtension

    return CppExtension(name="fastpeft._cpu", sources=_sources(CPU_SOURCES),
                        # OpenMP as torch's own CPU kernels: at::parallel_for and `omp simd` (vectorized reductions)
                        # need it in this translation unit; the runtime is the libgomp torch has loaded already.
                        extra_compile_args=["-O3", "-fopenmp", *_standard_flags()],
                        extra_link_args=["-fopenmp"]), forced


def _cuda_extension():
    """``(extension or None, forced)`` for ``fastpeft._C``."""
    build, forced, why = build_cuda_decision()
    if not build:
        if why != "FASTPEFT_BUILD_CUDA=0":
            warnings.warn(f"fastpeft: not building the CUDA extension ({why}); the Triton and PyTorch paths "
                          "still work.", stacklevel=1)
        return None, False
    from torch.utils.cpp_extension import CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    standard = _standard_flags()
    extension = CUDAExtension(
        name="fastpeft._C",
        sources=_sources(CUDA_SOURCES),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3", *standard],
            "nvcc": ["-O3", *standard, "--use_fast_math", "-lineinfo",
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
