"""What this installation and environment offer the backends (``fastpeft.ops.registry`` decides among them): Triton
and the interpreter, the CUDA extension ``fastpeft._C``, the CPU extension ``fastpeft._cpu``, and the one-time
warnings of the fallbacks. Nothing here touches the GPU or imports Triton at import time; the extensions and Triton
are looked up lazily, once.
"""

import functools
import importlib
import importlib.util
import os
import warnings


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_available():
    """(available, reason): Triton imports and fastpeft's kernels are installed."""
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc})"
    if importlib.util.find_spec("fastpeft.kernels.prefix_attention") is None:
        return False, "fastpeft.kernels.prefix_attention is not installed"
    return True, "triton importable"


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """(module or None, reason). Loaded lazily, once; a missing or broken extension warns once and never raises.

    Importing ``fastpeft._C`` registers its ops under ``torch.ops.fastpeft``.
    """
    try:
        module = importlib.import_module("fastpeft._C")
    except (ImportError, OSError) as exc:
        reason = _extension_failure_reason(exc)
        warnings.warn(f"fastpeft: CUDA extension unavailable, using Triton/PyTorch kernels: {reason}",
                      RuntimeWarning, stacklevel=3)
        return None, reason
    return module, "loaded"


def cpu_extension_enabled():
    """``FASTPEFT_CPU_EXTENSION=0`` keeps the CPU path in Python (read on every call, so tests can compare both)."""
    return os.environ.get("FASTPEFT_CPU_EXTENSION", "1").strip() != "0"


@functools.lru_cache(maxsize=None)
def cpu_extension():
    """(module or None, reason): ``fastpeft._cpu``, the C++ build of the short-sequence CPU path. Loaded lazily,
    once, when a CPU call first needs it; a missing or broken build warns once and the Python path runs instead
    (same results, more per-call overhead). Importing it registers its ops under ``torch.ops.fastpeft``."""
    try:
        module = importlib.import_module("fastpeft._cpu")
    except (ImportError, OSError) as exc:
        reason = _extension_failure_reason(exc, "fastpeft._cpu")
        warnings.warn(f"fastpeft: CPU extension unavailable, short CPU attention runs in Python: {reason}",
                      RuntimeWarning, stacklevel=3)
        return None, reason
    return module, "loaded"


_HOW_TO_BUILD = {
    "fastpeft._C": "reinstall where torch has CUDA and nvcc is present: `pip install --no-deps --no-build-isolation "
                   "-e .` (FASTPEFT_BUILD_CUDA=1 makes a failed build an error)",
    "fastpeft._cpu": "reinstall with torch installed and visible to the build (and a C++ compiler): `pip install "
                     "--no-deps --no-build-isolation -e .` (FASTPEFT_BUILD_CPU=1 makes a failed build an error)",
}


def _extension_failure_reason(exc, name="fastpeft._C"):
    """Why ``import <name>`` of an extension failed, and what fixes it."""
    message = str(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name == name:
        return f"{name} is not built; {_HOW_TO_BUILD[name]}"
    if "undefined symbol" in message:
        import torch

        return (f"{name} was built against a different torch than the installed torch {torch.__version__} "
                f"({message}); rebuild it against the installed torch: "
                "`pip install --no-deps --no-build-isolation --force-reinstall -e .`")
    return f"{name} failed to load ({exc.__class__.__name__}: {message})"


_warned_messages = set()


def warn_once(message):
    """Warn once per distinct message."""
    if message not in _warned_messages:
        _warned_messages.add(message)
        warnings.warn(f"fastpeft: {message}", RuntimeWarning, stacklevel=3)


def warn_fallback_once(case):
    """One warning per distinct case that falls back to the reference path, naming it."""
    warn_once(f"using the PyTorch reference path: {case}")
