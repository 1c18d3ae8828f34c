"""fastpeft: fused prefix attention and a drop-in backend for PEFT prefix tuning and prompt tuning.

Importing fastpeft never touches the GPU, never imports Triton and never fails for a missing CUDA
extension; transformers/PEFT integrations load on first use.
"""

from .ops.prefix_attention import prefix_attention
from .version import __version__

_LAZY = {
    "accelerate": ("fastpeft.integration.peft", "accelerate"),
    "restore": ("fastpeft.integration.peft", "restore"),
    "AdapterBank": ("fastpeft.bank", "AdapterBank"),
    "MultiPrefixTrainer": ("fastpeft.multi", "MultiPrefixTrainer"),
}

__all__ = ["prefix_attention", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastpeft' has no attribute {name!r}")
