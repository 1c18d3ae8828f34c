"""Device helpers shared by every Triton kernel module (``forward``, ``backward``, ``decode``), and whether this
process runs the kernels under Triton's interpreter (``INTERPRETING``).

Interpreter robustness: ``tl.max``, ``tl.sum``, ``tl.zeros`` and ``tl.cdiv`` are themselves ``@triton.jit``
functions, decorated when ``triton`` is imported. If that happened before ``TRITON_INTERPRET=1`` was set (any
script that imports peft, bitsandbytes or transformers first), they stay compiled-mode functions and calling
them from an interpreted kernel raises "Cannot call @triton.jit'd outside of the scope of a kernel". Kernels
therefore use ``tl.full`` (a builtin) instead of ``tl.zeros``, host-side ``triton.cdiv`` only, and the
reductions below. The interpreter patches ``tl.reduce`` at launch and evaluates the standard combine
functions through its numpy fast path, whatever the import order; compiled kernels keep ``tl.max``/``tl.sum``.
"""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Scores are kept in the log2 domain (exp2 is cheaper than exp): device constants and their host twin.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LOG2E_HOST = 1.4426950408889634


@triton.jit
def tile_dot(a, b, DOT_FP32: tl.constexpr):
    """``a @ b`` accumulated in float32. ``DOT_FP32`` upcasts the operands and forbids TF32: used for float32
    inputs (parity) and under the interpreter (whose bfloat16 dot is wrong)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


# Whether this process decorates kernels for the interpreter: fixed by TRITON_INTERPRET when this module is
# first imported (triton.jit decides at decoration time), so it must be set before then. Asking triton.jit
# itself keeps this in step with however Triton parses the variable.
INTERPRETING = isinstance(tile_dot, InterpretedFunction)


if INTERPRETING:
    @triton.jit
    def tile_max(x, AXIS: tl.constexpr):
        """Maximum of ``x`` along ``AXIS`` (the dimension is removed)."""
        return tl.reduce(x, AXIS, tl.standard._elementwise_max)

    @triton.jit
    def tile_sum(x, AXIS: tl.constexpr):
        """Sum of ``x`` along ``AXIS`` (the dimension is removed)."""
        return tl.reduce(x, AXIS, tl.standard._sum_combine)
else:
    @triton.jit
    def tile_max(x, AXIS: tl.constexpr):
        """Maximum of ``x`` along ``AXIS`` (the dimension is removed)."""
        return tl.max(x, AXIS)

    @triton.jit
    def tile_sum(x, AXIS: tl.constexpr):
        """Sum of ``x`` along ``AXIS`` (the dimension is removed)."""
        return tl.sum(x, AXIS)


@triton.jit
def row_prefix(prefix_index_ptr, prefix_lengths_ptr, b, T, P):
    """(table entry as int64, valid prefix length) of batch row ``b``. Clamped into ``[0, T)`` and ``[0, P]`` so
    that nothing out of bounds is read even from unchecked values (``prefix_attention_prevalidated`` skips the
    checks; the clamp only guards the memory)."""
    entry = tl.minimum(tl.maximum(tl.load(prefix_index_ptr + b), 0), T - 1).to(tl.int64)
    prefix_len = tl.minimum(tl.maximum(tl.load(prefix_lengths_ptr + entry), 0), P)
    return entry, prefix_len
