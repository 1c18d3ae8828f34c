"""``fastpeft.prefix_attention``: attention over a learned prefix K/V plus the sequence's own K/V.

Layers: Triton kernels and their launchers live in ``fastpeft.kernels.prefix_attention`` (training and
prefill) and ``fastpeft.kernels.prefix_decode`` (L == 1 inference); the CUDA extension ``fastpeft._C``
implements decode; the ``sdpa`` backend (PyTorch's fused attention ops, one call per part of the key axis,
merged by log-sum-exp; the default on CPU) lives in ``fastpeft.ops.sdpa_prefix_attention``. This module
validates the arguments once, brings them to one canonical form, picks the backend and registers the Triton
kernels as the custom ops ``fastpeft::prefix_attention_fwd`` / ``fastpeft::prefix_attention_bwd`` (with fake
implementations and autograd, so ``torch.compile`` traces them). Calls with an additive score bias (``attn_bias``)
go to the ``sdpa`` backend's biased variant (``fastpeft.ops.sdpa_bias_attention``) or the reference: the Triton
kernels and the CUDA extension take no bias.
"""

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .. import _backend, observe
from . import sdpa_bias_attention as _sdpa_bias
from . import sdpa_prefix_attention as _sdpa
from ._autograd import register_prefix_attention_autograd
from .reference import reference_prefix_attention

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACCEPTED_DTYPES = frozenset(SUPPORTED_DTYPES + (torch.float64,))  # float64: the reference path
MAX_HEAD_DIM = 256


def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_integer(name, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _canonicalize(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                  softmax_scale, check_values=True):
    """Validate every argument and return the canonical form the backends take.

    Canonical: prefix_k/prefix_v ``[T, Hkv, P, D]`` (a shared prefix becomes T = 1), prefix_index ``[B]``
    int32, prefix_lengths ``[T]`` int32, key_padding_mask ``[B, S]`` bool or None, softmax_scale a float.
    ``check_values=False`` skips the value checks of prefix_index / prefix_lengths (they synchronize with the
    device); only callers that validated them already (once per model forward) pass it. Under torch.compile the
    value checks are skipped too (they are data-dependent); the kernels clamp indices, so nothing is read out of
    bounds either way.
    """
    check_values = check_values and not torch.compiler.is_compiling()
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    B, Hq, L, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, S, D={D}] like q, got {tuple(k.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the kv heads of k ({Hkv})")
    if S < L:
        raise ValueError(f"k/v must hold at least the L={L} query positions (S >= L), got S={S}")
    if not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"head size D={D} is not supported (1..{MAX_HEAD_DIM})")

    if not isinstance(prefix_k, torch.Tensor) or not isinstance(prefix_v, torch.Tensor):
        raise ValueError("prefix_k and prefix_v must be torch.Tensors")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} "
                         f"and {tuple(prefix_v.shape)}")
    if prefix_k.dim() == 3:
        if prefix_index is not None:
            raise ValueError("prefix_index is only for a 4-D prefix table [T, Hkv, P, D]; "
                             "a 3-D prefix_k [Hkv, P, D] is shared by every row")
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    elif prefix_k.dim() == 4:
        if prefix_index is None:
            raise ValueError("prefix_index [B] is required with a 4-D prefix table prefix_k [T, Hkv, P, D]")
    else:
        raise ValueError(f"prefix_k must be [Hkv, P, D] or [T, Hkv, P, D], got shape {tuple(prefix_k.shape)}")
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    if prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
        raise ValueError(f"prefix_k must have Hkv={Hkv} heads and head size D={D} like k, "
                         f"got shape {tuple(prefix_k.shape)}")
    if T == 0:
        raise ValueError("the prefix table must hold at least one entry (T >= 1)")

    dtype, device = q.dtype, q.device
    if dtype not in _ACCEPTED_DTYPES:
        raise ValueError(f"q has dtype {dtype}; supported: float16, bfloat16, float32 (float64 on the reference path)")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != dtype:
            raise ValueError(f"all inputs must share one dtype: q is {dtype} but {name} is {t.dtype}")
        if t.device != device:
            raise ValueError(f"all inputs must be on one device: q is on {device} but {name} is on {t.device}")

    if prefix_index is None:
        prefix_index = torch.zeros(B, dtype=torch.int32, device=q.device)
    else:
        _check_integer("prefix_index", prefix_index, (B,), q.device)
        if check_values and B > 0:
            lo, hi = int(prefix_index.min()), int(prefix_index.max())
            if lo < 0 or hi >= T:
                raise IndexError(f"prefix_index values must lie in [0, T={T}), got min {lo}, max {hi}")
        prefix_index = prefix_index.to(torch.int32)

    if prefix_lengths is None:
        prefix_lengths = torch.full((T,), P, dtype=torch.int32, device=q.device)
    else:
        _check_integer("prefix_lengths", prefix_lengths, (T,), q.device)
        if check_values:
            lo, hi = int(prefix_lengths.min()), int(prefix_lengths.max())
            if lo < 0 or hi > P:
                raise ValueError(f"prefix_lengths values must lie in [0, P={P}], got min {lo}, max {hi}")
        prefix_lengths = prefix_lengths.to(torch.int32)

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise ValueError("key_padding_mask must be a torch.Tensor [B, S] or None")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise ValueError(f"key_padding_mask must be bool or integer 0/1, got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        key_padding_mask = key_padding_mask.to(torch.bool)

    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(D)
    else:
        softmax_scale = float(softmax_scale)
        if not math.isfinite(softmax_scale) or softmax_scale <= 0:
            raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")

    return (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, softmax_scale)


def _canonical_bias(attn_bias, q, k, prefix_k):
    """Validate ``attn_bias`` against the canonical q, k and prefix_k and return it 4-D,
    ``[1 or B, 1 or Hq, 1 or L, P + S]`` (a view), or None."""
    if attn_bias is None:
        return None
    if not isinstance(attn_bias, torch.Tensor):
        raise ValueError(f"attn_bias must be a torch.Tensor or None, got {type(attn_bias).__name__}")
    B, Hq, L, _ = q.shape
    S, P = k.shape[2], prefix_k.shape[2]
    if not attn_bias.dtype.is_floating_point:
        raise ValueError(f"attn_bias must be a floating-point additive bias (use key_padding_mask or -inf entries "
                         f"to mask), got {attn_bias.dtype}")
    if attn_bias.dtype != q.dtype:
        raise ValueError(f"all inputs must share one dtype: q is {q.dtype} but attn_bias is {attn_bias.dtype}")
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias is on {attn_bias.device} but q is on {q.device}")
    full = (B, Hq, L, P + S)
    if attn_bias.dim() > 4:
        raise ValueError(f"attn_bias must be broadcastable to [B, Hq, L, P + S] = {list(full)}, "
                         f"got shape {tuple(attn_bias.shape)}")
    bias = attn_bias[(None,) * (4 - attn_bias.dim())]
    if bias.shape[3] != P + S or any(n not in (1, want) for n, want in zip(bias.shape[:3], full[:3])):
        raise ValueError(f"attn_bias must be broadcastable to [B, Hq, L, P + S] = {list(full)} with exactly "
                         f"P + S = {P} + {S} columns (the prefix entries, then the keys), got shape "
                         f"{tuple(attn_bias.shape)}")
    return bias


def _kernel_case_unsupported(dtype):
    """Why the Triton kernels cannot run this case, or None."""
    if dtype == torch.float64:
        return "float64 inputs"
    return None


def _choose_backend(q, needs_grad):
    """'cuda', 'triton', 'sdpa' or 'reference' for these (already validated) inputs."""
    length = q.shape[2]
    if torch.compiler.is_compiling():
        # With a dynamic query length, L is symbolic (and not 1: Dynamo specializes sizes 0 and 1); the choice
        # below is folded to a constant, which needs a plain bool. (Dynamo has imported this module already.)
        from torch.fx.experimental.symbolic_shapes import guard_or_false
        one_query = guard_or_false(length == 1)
    else:
        one_query = length == 1
    return _select_backend(q.device, q.dtype, one_query and not needs_grad)


def _select_backend(device, dtype, decode):
    forced = _backend.forced_backend()
    is_cuda = device.type == "cuda"
    if forced == "reference":
        return "reference"
    if forced == "sdpa":
        reason = _sdpa.unavailable_reason(device, dtype)
        if reason is not None:
            raise ValueError(f"FASTPEFT_BACKEND=sdpa cannot run here: {reason}")
        return "sdpa"
    unsupported = _kernel_case_unsupported(dtype)
    if forced is not None:
        if unsupported is not None:
            raise ValueError(f"FASTPEFT_BACKEND={forced} cannot run {unsupported}")
        if not _backend.triton_usable_on(device) and not (forced == "cuda" and is_cuda):
            raise ValueError(f"FASTPEFT_BACKEND={forced} needs CUDA tensors (or TRITON_INTERPRET=1 for "
                             f"triton on CPU), got tensors on {device}")
        if forced == "cuda" and is_cuda and decode and _cuda_decode_available():
            return "cuda"
        if forced == "cuda":
            if not _backend.triton_usable_on(device):
                raise ValueError("FASTPEFT_BACKEND=cuda: the CUDA extension does not cover this case "
                                 "and Triton is unavailable")
            _backend.warn_once("FASTPEFT_BACKEND=cuda: the CUDA extension (where built) implements decode "
                               "(L=1, no grad) only; using Triton for the rest")
        return "triton"

    if is_cuda and decode and _cuda_decode_available():
        return "cuda"
    if _backend.triton_usable_on(device) and unsupported is None:
        return "triton"
    # Then PyTorch's fused attention ops (any device that has them; the CPU default), then the reference.
    reason = _sdpa.unavailable_reason(device, dtype)
    if reason is None:
        if is_cuda:
            _backend.warn_once(f"Triton kernels unavailable ({_backend.triton_available()[1]}); using the sdpa "
                               "backend (PyTorch's fused attention ops)")
        return "sdpa"
    _backend.warn_fallback_once(reason)
    return "reference"


# torch.compile evaluates the choice once while tracing (it depends on the environment and on cached imports,
# which Dynamo cannot trace) and bakes the result into the graph. This is exactly what
# `torch.compiler.assume_constant_result` does (it sets this attribute), but calling it imports torch._dynamo,
# and with it triton, which `import fastpeft` must not do.
_select_backend._dynamo_marked_constant = True


def _select_bias_backend(device, dtype):
    """'sdpa' or 'reference' for a call with an attn_bias (the Triton kernels and the CUDA extension take none)."""
    forced = _backend.forced_backend()
    if forced == "reference":
        return "reference"
    reason = _sdpa.unavailable_reason(device, dtype)
    if forced == "sdpa" and reason is not None:
        raise ValueError(f"FASTPEFT_BACKEND=sdpa cannot run here: {reason}")
    if forced in ("triton", "cuda"):
        _backend.warn_once(f"FASTPEFT_BACKEND={forced}: the {forced} kernels take no attn_bias; calls with one use "
                           "the sdpa backend (or the reference where sdpa cannot run)")
    if reason is None:
        return "sdpa"
    _backend.warn_fallback_once(f"attn_bias with {reason}")
    return "reference"


_select_bias_backend._dynamo_marked_constant = True  # as _select_backend


def _cuda_decode_available():
    module, _ = _backend.cuda_extension()
    return module is not None and hasattr(torch.ops.fastpeft, "prefix_decode")


def _decode_forward(backend, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                    softmax_scale):
    """Inference with one query per row (L == 1, no grad): the split-KV decode kernels."""
    if backend == "cuda":
        return torch.ops.fastpeft.prefix_decode(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                                key_padding_mask, causal, softmax_scale)
    from ..kernels.prefix_decode import prefix_decode_fwd
    return prefix_decode_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                             causal, softmax_scale)


# The Triton training/prefill kernels as torch custom ops, so that torch.compile traces through them (the
# fake implementations give the output metadata) and autograd reaches the backward kernels. The kernel
# module (and Triton) is imported on the first call, never when fastpeft is imported.
@torch.library.custom_op("fastpeft::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                             prefix_v: torch.Tensor, prefix_index: torch.Tensor, prefix_lengths: torch.Tensor,
                             key_padding_mask: Optional[torch.Tensor], causal: bool, softmax_scale: float,
                             deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Canonical arguments (see ``_canonicalize``) -> (out ``[B, Hq, L, D]``, lse ``[B, Hq, L]`` float32).
    ``deterministic`` is not used by the forward; it is an input so that the backward can read it."""
    from ..kernels.prefix_attention import prefix_attention_fwd
    return prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                causal, softmax_scale)


@_prefix_attention_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale,
      deterministic):
    B, Hq, L, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, L), dtype=torch.float32)


@torch.library.custom_op("fastpeft::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             prefix_k: torch.Tensor, prefix_v: torch.Tensor, prefix_index: torch.Tensor,
                             prefix_lengths: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                             out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                             deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v); the prefix gradients are summed over the rows using each entry."""
    from ..kernels.prefix_attention import prefix_attention_bwd
    return prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                out, lse, causal, softmax_scale, deterministic)


@_prefix_attention_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, out, lse, causal,
      softmax_scale, deterministic):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), prefix_k.new_empty(prefix_k.shape),
            prefix_v.new_empty(prefix_v.shape))


register_prefix_attention_autograd(_prefix_attention_fwd_op, _prefix_attention_bwd_op)


def _run_biased(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
                softmax_scale, deterministic):
    if _select_bias_backend(q.device, q.dtype) == "reference":
        return reference_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                          key_padding_mask, causal, softmax_scale, attn_bias=attn_bias)
    observe.record_attention_call("sdpa")  # the reference records its own calls
    return _sdpa_bias.sdpa_bias_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                                 key_padding_mask, attn_bias, causal, softmax_scale, deterministic)


def _needs_grad(q, k, v, prefix_k, prefix_v):
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v))


def _run(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale,
         deterministic, attn_bias=None, needs_grad=None, backend=None, host=None):
    """Canonical arguments -> out. ``needs_grad``, ``backend`` and the sdpa backend's ``host`` plan are computed
    here unless the caller planned them already (``prefix_attention_prevalidated``'s ``plan_cache``)."""
    if attn_bias is not None:
        return _run_biased(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
                           causal, softmax_scale, deterministic)
    if needs_grad is None:
        needs_grad = _needs_grad(q, k, v, prefix_k, prefix_v)
    if backend is None:
        backend = _choose_backend(q, needs_grad)
    if backend == "reference":
        return reference_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                          key_padding_mask, causal, softmax_scale)
    observe.record_attention_call(backend)  # the reference records its own calls
    if backend == "sdpa":
        return _sdpa.sdpa_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                           key_padding_mask, causal, softmax_scale, deterministic, host=host)
    if q.shape[2] == 1 and not needs_grad:
        return _decode_forward(backend, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                               key_padding_mask, causal, softmax_scale)
    out, _ = _prefix_attention_fwd_op(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                      causal, softmax_scale, deterministic)
    return out


def prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None,
                     key_padding_mask=None, causal=True, softmax_scale=None, deterministic=False, attn_bias=None):
    """Attention of ``q`` over ``[prefix ; k]`` per row, without building the concatenation.

    Arguments:
        q: ``[B, Hq, L, D]`` queries.
        k, v: ``[B, Hkv, S, D]`` the sequence's own keys and values, ``S >= L`` (``S > L`` when a KV cache
            precedes the ``L`` new queries). ``Hq`` must be a multiple of ``Hkv``; query head ``h`` reads kv
            head ``h // (Hq // Hkv)`` (grouped-query / multi-query attention).
        prefix_k, prefix_v: ``[Hkv, P, D]`` one prefix shared by every row, or ``[T, Hkv, P, D]`` a table of
            ``T`` prefixes (one per adapter/tenant) read in place, never copied per row.
        prefix_index: ``[B]`` integer, row ``b`` uses table entry ``prefix_index[b]``. Required with a 4-D
            table, not allowed with a 3-D prefix.
        prefix_lengths: ``[T]`` integer in ``[0, P]``, the valid length of each table entry (ragged);
            entries ``p >= prefix_lengths[t]`` are invisible. Default: ``P`` for every entry.
        key_padding_mask: ``[B, S]`` bool or 0/1 integer, True/1 = real key. None = every key is real.
        causal: with True, query ``i`` of a row sits at key position ``S - L + i`` (bottom-right aligned, as
            FlashAttention with a KV cache) and sees every valid prefix entry and the keys ``j <= S - L + i``.
            With False it sees every valid prefix entry and every real key.
        softmax_scale: scale of ``q @ k^T``; default ``1 / sqrt(D)``.
        deterministic: make the backward's prefix-gradient reduction deterministic (no atomics).
        attn_bias: None, or an additive score bias broadcastable to ``[B, Hq, L, P + S]`` (any of the first three
            axes may be 1; the last is exactly ``P + S``) in q's dtype, over ``[prefix ; k]``: columns ``0 .. P-1``
            are the row's prefix entries (of its table entry; those beyond its ``prefix_lengths`` are ignored),
            columns ``P .. P+S-1`` its keys. It is added to ``softmax_scale * q @ k^T`` before the masks, like
            xformers' ``attn_bias``, a float ``attn_mask`` of PyTorch's SDPA or T5's relative position bias
            (``-inf`` entries mask). Differentiable; a broadcast axis gets the sum. Such calls run on the ``sdpa``
            backend (the reference where sdpa cannot run): the Triton and CUDA kernels take no bias.

    Returns:
        ``[B, Hq, L, D]`` in q's dtype. A query that sees no key at all (every prefix entry and key masked)
        gets zeros, never NaN.

    Example of the causal alignment, ``L = 2`` new queries after a cache of 3 (``S = 5``), ``P = 2``::

        keys:      p0 p1 | k0 k1 k2 k3 k4
        query 0:    1  1 |  1  1  1  1  0      (sits at position S - L + 0 = 3)
        query 1:    1  1 |  1  1  1  1  1      (sits at position 4)

    Differentiable in q, k, v, prefix_k, prefix_v (and attn_bias); the gradient of a table entry is the sum over the
    rows that used it (a shared prefix gets the sum over the batch). dtypes: float16, bfloat16, float32 (one dtype
    for all inputs), any ``D <= 256``; accumulation is float32 inside. Bad input raises ``ValueError`` (or
    ``IndexError`` for ``prefix_index`` outside ``[0, T)``) before any kernel runs.
    """
    canonical = _canonicalize(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                              softmax_scale)
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, softmax_scale = canonical
    attn_bias = _canonical_bias(attn_bias, q, k, prefix_k)
    return _run(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, bool(causal),
                softmax_scale, bool(deterministic), attn_bias)


class _Plan(NamedTuple):
    """What a call decided from its arguments besides q/k/v and the prefix tensors: their canonical forms, the
    backend, and the sdpa backend's host plan. Valid for every call with the same ``_signature``."""
    inputs: tuple          # the signature's tensors (prefix_index, prefix_lengths, key_padding_mask), kept alive
    prefix_index: torch.Tensor
    prefix_lengths: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    softmax_scale: float
    backend: str
    host: object           # sdpa_prefix_attention._Host, or None off the sdpa backend


# A model's forward calls attention once per layer with one signature; a plan cache that outgrows this is cleared
# (it belongs to one forward; a caller reusing it across many would otherwise keep their masks alive).
_PLAN_CACHE_LIMIT = 64


def _signature(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale,
               deterministic, needs_grad):
    """Everything ``_canonicalize``, the backend choice and the host plan read, except the values of the index,
    lengths and mask tensors, which are identified by object (their values do not change during a forward)."""
    return (q.shape, k.shape, v.shape, prefix_k.shape, prefix_v.shape, q.dtype, k.dtype, v.dtype, prefix_k.dtype,
            prefix_v.dtype, q.device, k.device, v.device, prefix_k.device, prefix_v.device, id(prefix_index),
            id(prefix_lengths), id(key_padding_mask), bool(causal), softmax_scale, bool(deterministic), needs_grad)


def prefix_attention_prevalidated(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None,
                                  key_padding_mask=None, causal=True, softmax_scale=None, deterministic=False,
                                  attn_bias=None, plan_cache=None):
    """``prefix_attention`` without the value checks of ``prefix_index``/``prefix_lengths`` (which sync the
    device). For the model integrations, which check those values once per forward instead of once per layer.
    Shapes, dtypes and devices are still checked.

    ``plan_cache``: a dict owned by the caller for the duration of one model forward (``PrefixSpec.plan_cache``).
    The first layer's call validates and plans as usual and stores the result under its signature (shapes, dtypes,
    devices, flags, and the index/lengths/mask tensors by identity); the other layers' calls, which have the same
    signature, reuse it and go straight to the backend. At short sequence lengths that per-layer work is a
    measurable part of a training step. Calls with an ``attn_bias`` and traced calls do not use it."""
    if plan_cache is None or attn_bias is not None or torch.compiler.is_compiling():
        canonical = _canonicalize(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                  softmax_scale, check_values=False)
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, softmax_scale = canonical
        attn_bias = _canonical_bias(attn_bias, q, k, prefix_k)
        return _run(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, bool(causal),
                    softmax_scale, bool(deterministic), attn_bias)
    needs_grad = _needs_grad(q, k, v, prefix_k, prefix_v)
    signature = _signature(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                           softmax_scale, deterministic, needs_grad)
    plan = plan_cache.get(signature)
    if plan is None:
        canonical = _canonicalize(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                  softmax_scale, check_values=False)
        _, _, _, table_k, _, index, lengths, mask, scale = canonical
        backend = _choose_backend(q, needs_grad)
        host = (_sdpa._host_plan(q, table_k, index, lengths, mask) if backend == "sdpa" and q.numel() else None)
        if len(plan_cache) >= _PLAN_CACHE_LIMIT:
            plan_cache.clear()
        plan = plan_cache[signature] = _Plan((prefix_index, prefix_lengths, key_padding_mask), index, lengths, mask,
                                             scale, backend, host)
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    return _run(q, k, v, prefix_k, prefix_v, plan.prefix_index, plan.prefix_lengths, plan.key_padding_mask,
                bool(causal), plan.softmax_scale, bool(deterministic), needs_grad=needs_grad, backend=plan.backend,
                host=plan.host)
