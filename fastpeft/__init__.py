"""fastpeft: fused prefix attention and a drop-in backend for PEFT prefix tuning and prompt tuning.

Importing fastpeft never touches the GPU, never imports Triton and never fails for a missing CUDA
extension; transformers/PEFT integrations load on first use.
"""

from .ops.prefix_attention import prefix_attention
from .version import __version__

_LAZY = {
    "accelerate": ("fastpeft.integration.peft", "accelerate"),
    "restore": ("fastpeft.integration.peft", "restore"),
    "FallbackWarning": ("fastpeft.integration.peft", "FallbackWarning"),
    "AdapterBank": ("fastpeft.bank", "AdapterBank"),
    "MultiPrefixTrainer": ("fastpeft.multi", "MultiPrefixTrainer"),
    "MultiPrefixModel": ("fastpeft.multi", "MultiPrefixModel"),
}

__all__ = ["prefix_attention", "__version__", *_LAZY]


# Subpackages reachable as attributes (``fastpeft.kernels``) without being imported by ``import fastpeft``.
_LAZY_SUBPACKAGES = ("kernels",)


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
    elif name in _LAZY_SUBPACKAGES:
        value = importlib.import_module(f"fastpeft.{name}")
    else:
        raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")
    globals()[name] = value
    return value
