"""Launchers of the Triton kernels for prefix attention (training and prefill), FlashAttention-2 style: the host side
that computes grids, strides and buffers (``prefix_attention_fwd``, ``prefix_attention_bwd``). The kernels live in
``forward`` and ``backward``, the device helpers they share in ``blocks`` and ``common``, their autotuning in
``configs``; the decode kernels (one query per row) in ``decode``, launched by ``prefix_decode``.

Every query row attends to ``[prefix ; k]`` of its batch row: first the valid entries of its prefix, read in
place from the table ``prefix_k/prefix_v [T, Hkv, P, D]`` at entry ``prefix_index[b]``, then the sequence's
own keys ``k/v [B, Hkv, S, D]``. Both key ranges share one online softmax, so the prefix is never gathered
per row nor concatenated with k/v.

Kernels (all accumulate in float32):

* ``_prefix_attn_fwd_kernel``: grid ``(cdiv(L, BLOCK_M), B * Hq)``. Walks the row's prefix blocks (only up to
  ``prefix_lengths[entry]``; whole blocks unmasked, a last partial block masked), then the sequence blocks: blocks entirely below the causal diagonal are
  processed without any causal or bounds mask, blocks entirely above it are skipped, and the mask is built
  only for the blocks the diagonal crosses. Writes ``out`` and the natural-log ``lse [B, Hq, L]``
  (``+inf`` for a query that sees nothing, so that every recomputed probability of that query is 0).
* ``_prefix_attn_bwd_preprocess_kernel``: ``delta = rowsum(dout * out)``.
* ``_prefix_attn_bwd_dkdv_kernel``: grid ``(cdiv(S, BLOCK_N), B * Hkv)``; each program owns one key block
  and loops over the query heads of its GQA group and the query blocks that can see the block, so dk/dv
  are written once, without atomics. In the ``fused`` backward (the default, FlashAttention-2's scheme) it
  also adds each block pair's ``dS @ K`` into a float32 dq accumulator with atomics: 5 matmuls per (query
  block, key block) pair.
* ``_prefix_attn_bwd_prefix_dkdv_kernel``: grid ``(cdiv(P, BLOCK_N), chunks, B * Hkv)``; one prefix key block
  of one batch row, the queries of one run of query blocks (the query axis is split so that a short prefix
  still fills the machine), every query head of the group. The gradient is added (fp32 ``atomic_add``) into a
  ``[T, Hkv, P, D]`` float32 buffer at the row's table entry, or, in deterministic mode (one run), written to a
  per-row float32 partial that ``_prefix_grad_reduce_kernel`` sums over the rows of each entry in row order.
  In the ``fused`` backward it also adds the prefix keys' share of dq.
* ``_prefix_attn_bwd_dq_kernel`` (``split`` backward only, also what ``deterministic=True`` runs): grid
  ``(cdiv(L, BLOCK_M), B * Hq)``; prefix blocks, then the sequence blocks with the same diagonal split as the
  forward; it recomputes ``Q K^T`` and ``dO V^T`` (7 matmuls per block pair in all) but needs no atomics.

The forward and dq kernels launch the last (longest, under the causal mask) query blocks first. Table
indices and prefix lengths are clamped into ``[0, T)`` and ``[0, P]`` inside the kernels, so even unchecked
values never read out of bounds.

Scores are kept in the log2 domain: ``softmax_scale * log2(e)`` is folded into one multiplier and ``exp2``
is used throughout; the dots' raw scores are masked as they are and scaled inside exp2's argument
(``s * qk_scale - m``: one FFMA per score). Head sizes up to 256 that are not powers of two run with ``BLOCK_D =
next_power_of_2(D)`` and masked loads. Any strides are accepted; only a tensor whose last dimension is not
unit-stride is made contiguous, once, in the launcher.

Under ``TRITON_INTERPRET=1`` (CPU tensors) every ``tl.dot`` upcasts its operands to float32, because the
Triton interpreter computes bfloat16 dots incorrectly; on the GPU fp16/bf16 dots stay native. Float32
inputs always use IEEE float32 dots (no TF32), which the float32 parity target needs.

The interpreter mode is fixed when this module is imported (as ``triton.jit`` decides it at decoration), so
``TRITON_INTERPRET=1`` must be set before the first import of this module, though not necessarily before
triton's: the reductions and ``tile_dot`` come from ``common`` (shared with the decode kernels), which avoids
triton's own ``@jit`` library functions for that case.
"""

import os

import torch
import triton

from .backward import (_prefix_attn_bwd_dkdv_kernel, _prefix_attn_bwd_dq_kernel, _prefix_attn_bwd_prefix_dkdv_kernel,
                       _prefix_attn_bwd_preprocess_kernel, _prefix_grad_reduce_kernel)
from .common import INTERPRETING, LOG2E_HOST
from .forward import _prefix_attn_fwd_kernel

# Block sizes of the small kernels that are not autotuned.
_PREPROCESS_BLOCK_M = 64
_REDUCE_BLOCK_P = 32

# Backward variants (see ``bwd_mode``), the default first.
BWD_MODES = ("fused", "split")

# The prefix-gradient grid splits the query axis until it has about this many programs (about 4 waves of 2
# CTAs on 132 SMs), with runs of at least this many queries (16 under the interpreter, so that its small test
# shapes run several runs).
_PREFIX_TARGET_PROGRAMS = 1024
_PREFIX_CHUNK_MIN_ROWS = 16 if INTERPRETING else 128


def _unit_last_stride(t):
    """The tensor itself when its last dimension is unit-stride (any other strides are passed to the kernels);
    otherwise a contiguous copy, made once here rather than inside a kernel."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_device(q):
    if q.device.type == "cpu" and not INTERPRETING:
        raise RuntimeError("fastpeft.kernels.prefix_attention runs CPU tensors only under the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before fastpeft.kernels.prefix_attention is first imported")


def _mask_args(key_padding_mask, fallback):
    """(pointer tensor, stride_b, stride_s, HAS_MASK). A bool mask is read through a uint8 view (no copy)."""
    if key_padding_mask is None:
        return fallback, 0, 0, False
    mask = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
    mask = mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1), True


def _zeros_contiguous(t):
    return torch.zeros(t.shape, dtype=t.dtype, device=t.device)


def _bucket(n):
    """Autotuning key of a length: the next power of two, so varying lengths share tuned configs."""
    return triton.next_power_of_2(max(int(n), 1))


def _block_d(D):
    # tl.dot needs every tile dimension >= 16.
    return max(16, triton.next_power_of_2(D))


def _dot_fp32(dtype):
    return INTERPRETING or dtype == torch.float32


def _index_args(prefix_index, prefix_lengths):
    return prefix_index.to(torch.int32).contiguous(), prefix_lengths.to(torch.int32).contiguous()


def prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                         softmax_scale):
    """Forward of prefix attention on canonical arguments.

    Arguments: q ``[B, Hq, L, D]``; k, v ``[B, Hkv, S, D]`` (S >= L); prefix_k, prefix_v ``[T, Hkv, P, D]``;
    prefix_index ``[B]`` int32 (values in [0, T)); prefix_lengths ``[T]`` int32 (values in [0, P]);
    key_padding_mask ``[B, S]`` bool or None; causal bool (bottom-right: query i sits at key S - L + i);
    softmax_scale float. All floating inputs share one dtype (fp16, bf16 or fp32) and device.

    Returns ``(out [B, Hq, L, D] in q's dtype, with q's memory layout, lse [B, Hq, L] float32)``; lse is the
    natural-log normalizer of each query, ``+inf`` for a query that sees no key (its output is 0).
    """
    _check_device(q)
    # out takes q's memory layout (before any copy below): a [B, L, H, D] buffer viewed as [B, H, L, D] gives one.
    out = torch.empty_like(q)
    q, k, v, prefix_k, prefix_v = (_unit_last_stride(t) for t in (q, k, v, prefix_k, prefix_v))
    prefix_index, prefix_lengths = _index_args(prefix_index, prefix_lengths)
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    mask, stride_mask_b, stride_mask_s, has_mask = _mask_args(key_padding_mask, q)

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_M"]), B * Hq)

    _prefix_attn_fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
        stride_mask_b, stride_mask_s, *out.stride(),
        Hq, L, S, D, prefix_k.shape[0], prefix_k.shape[2], Hq // Hkv, softmax_scale * LOG2E_HOST,
        _bucket(L), _bucket(S),
        CAUSAL=bool(causal), HAS_MASK=has_mask, DOT_FP32=_dot_fp32(q.dtype), BLOCK_D=_block_d(D))
    return out, lse


def bwd_mode(mode=None, deterministic=False):
    """The backward variant a call runs: ``mode`` if given, else ``FASTPEFT_TRITON_BWD``, else ``"fused"``;
    ``deterministic=True`` always runs ``"split"`` (the fused variant adds dq with atomics, in no fixed order).

    ``"fused"`` (FlashAttention-2's scheme): 5 matmuls per (query block, key block): the dk/dv pass also adds
    ``dS @ K`` into a float32 dq accumulator with atomics. ``"split"``: 7 matmuls: a separate dq pass recomputes
    ``Q K^T`` and ``dO V^T``, and writes dq without atomics. Kept selectable so that a GPU run can compare."""
    mode = mode or os.environ.get("FASTPEFT_TRITON_BWD") or BWD_MODES[0]
    if mode not in BWD_MODES:
        raise ValueError(f"FASTPEFT_TRITON_BWD / mode must be one of {BWD_MODES}, got {mode!r}")
    return "split" if deterministic else mode


def prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, out,
                         lse, causal, softmax_scale, deterministic, mode=None):
    """Backward of prefix attention on canonical arguments (see ``prefix_attention_fwd``).

    ``dout`` and ``out`` are ``[B, Hq, L, D]``, ``lse`` the forward's ``[B, Hq, L]`` float32.
    Returns ``(dq, dk, dv, dprefix_k, dprefix_v)`` in the input dtype; ``dprefix_* [T, Hkv, P, D]`` is the sum
    over the rows that use each table entry (0 for entries no row uses and for positions past an entry's
    length). The prefix sum is accumulated in float32 with atomics (order unspecified), or, with
    ``deterministic=True``, through per-row float32 partials summed in row order (bitwise reproducible).
    ``mode``: ``"fused"`` or ``"split"`` (see ``bwd_mode``).
    """
    _check_device(q)
    mode = bwd_mode(mode, deterministic)
    # Gradients take the inputs' layout (before any copy below); the prefix gradients are contiguous.
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dout, q, k, v, prefix_k, prefix_v, out = (
        _unit_last_stride(t) for t in (dout, q, k, v, prefix_k, prefix_v, out))
    prefix_index, prefix_lengths = _index_args(prefix_index, prefix_lengths)
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    if q.numel() == 0:
        return (dq, dk.zero_(), dv.zero_(), _zeros_contiguous(prefix_k), _zeros_contiguous(prefix_v))
    lse = lse.contiguous()
    mask, stride_mask_b, stride_mask_s, has_mask = _mask_args(key_padding_mask, q)
    block_d = _block_d(D)
    dot_fp32 = _dot_fp32(q.dtype)
    qk_scale = softmax_scale * LOG2E_HOST
    buckets = (_bucket(L), _bucket(S))
    fused = mode == "fused"
    # fused: float32 dq accumulator [B, Hq, L, D] the dk/dv passes add into; split: an unused placeholder.
    dq_acc = (torch.zeros((B, Hq, L, D), dtype=torch.float32, device=q.device) if fused
              else torch.empty(0, dtype=torch.float32, device=q.device))
    dq_acc_strides = dq_acc.stride() if fused else (0, 0, 0, 0)

    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    _prefix_attn_bwd_preprocess_kernel[(triton.cdiv(L, _PREPROCESS_BLOCK_M), B * Hq)](
        out, dout, delta, *out.stride(), *dout.stride(), Hq, L, D,
        BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=block_d)

    def key_grid(meta):
        return (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)

    # The dk/dv kernel reads the key mask as int32: an 8-bit load anywhere in it makes Triton pick 8-bit operand
    # packing (kWidth 4) for its mma.sync dot too, which costs the registers it does not have (spills).
    key_mask = mask.to(torch.int32) if has_mask else mask
    _prefix_attn_bwd_dkdv_kernel[key_grid](
        q, k, v, dout, lse, delta, key_mask, dk, dv, dq_acc,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *((key_mask.stride()) if has_mask else (0, 0)),
        *dk.stride(), *dv.stride(), *dq_acc_strides,
        Hq, Hkv, L, S, D, group, softmax_scale, qk_scale, *buckets,
        CAUSAL=bool(causal), HAS_MASK=has_mask, DQ_ATOMIC=fused, DOT_FP32=dot_fp32, BLOCK_D=block_d)
    if has_mask:
        padding = (mask == 0)[:, None, :, None]     # [B, 1, S, 1]: the true gradient of a padding key is 0
        dk.masked_fill_(padding, 0.0)
        dv.masked_fill_(padding, 0.0)

    if not fused:
        def query_grid(meta):
            return (triton.cdiv(L, meta["BLOCK_M"]), B * Hq)

        _prefix_attn_bwd_dq_kernel[query_grid](
            q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
            stride_mask_b, stride_mask_s, *dout.stride(), *dq.stride(),
            Hq, L, S, D, prefix_k.shape[0], prefix_k.shape[2], group, softmax_scale, qk_scale, *buckets,
            CAUSAL=bool(causal), HAS_MASK=has_mask, DOT_FP32=dot_fp32, BLOCK_D=block_d)

    dprefix_k, dprefix_v = _prefix_grads(q, prefix_k, prefix_v, prefix_index, prefix_lengths, dout, lse, delta,
                                         causal, has_mask, softmax_scale, deterministic, block_d, dot_fp32, buckets,
                                         dq_acc, dq_acc_strides, fused)
    if fused:
        dq.copy_(dq_acc.mul_(softmax_scale))
    return dq, dk, dv, dprefix_k, dprefix_v


def _prefix_chunks(L, key_programs, deterministic):
    """How many runs of query blocks the prefix-gradient grid splits L into: enough programs to fill the machine
    (about ``_PREFIX_TARGET_PROGRAMS``), each run at least ``_PREFIX_CHUNK_MIN_ROWS`` queries; one run in
    deterministic mode (its per-row partials are stored, not added)."""
    if deterministic:
        return 1
    return max(1, min(triton.cdiv(L, _PREFIX_CHUNK_MIN_ROWS), triton.cdiv(_PREFIX_TARGET_PROGRAMS, key_programs)))


def _prefix_grads(q, prefix_k, prefix_v, prefix_index, prefix_lengths, dout, lse, delta, causal, has_mask,
                  softmax_scale, deterministic, block_d, dot_fp32, buckets, dq_acc, dq_acc_strides, fused):
    """dprefix_k, dprefix_v ``[T, Hkv, P, D]`` in the prefix dtype, summed over the rows using each entry
    (``fused``: the prefix keys' share of dq is added into ``dq_acc`` on the way)."""
    B, Hq, L, D = q.shape
    T, Hkv, P = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    if P == 0:
        return _zeros_contiguous(prefix_k), _zeros_contiguous(prefix_v)
    # Atomic: one float32 [T, Hkv, P, D] buffer the rows add into. Deterministic: per-row float32 partials.
    rows = B if deterministic else T
    acc_k = torch.zeros((rows, Hkv, P, D), dtype=torch.float32, device=q.device)
    acc_v = torch.zeros_like(acc_k)

    def grid(meta):
        key_programs = triton.cdiv(P, meta["BLOCK_N"]) * B * Hkv
        return (triton.cdiv(P, meta["BLOCK_N"]), _prefix_chunks(L, key_programs, deterministic), B * Hkv)

    _prefix_attn_bwd_prefix_dkdv_kernel[grid](
        q, prefix_k, prefix_v, prefix_index, prefix_lengths, dout, lse, delta, acc_k, acc_v, dq_acc,
        *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *dout.stride(), *acc_k.stride(), *dq_acc_strides,
        Hq, Hkv, L, D, T, P, Hq // Hkv, softmax_scale, softmax_scale * LOG2E_HOST, *buckets,
        ATOMIC=not deterministic, DQ_ATOMIC=fused, CAUSAL=bool(causal), HAS_MASK=has_mask, DOT_FP32=dot_fp32,
        BLOCK_D=block_d)
    if not deterministic:
        return acc_k.to(prefix_k.dtype), acc_v.to(prefix_v.dtype)

    dprefix_k = torch.empty(prefix_k.shape, dtype=prefix_k.dtype, device=prefix_k.device)
    dprefix_v = torch.empty(prefix_v.shape, dtype=prefix_v.dtype, device=prefix_v.device)
    _prefix_grad_reduce_kernel[(triton.cdiv(P, _REDUCE_BLOCK_P), T * Hkv)](
        acc_k, acc_v, prefix_index, dprefix_k, dprefix_v,
        *acc_k.stride(), *dprefix_k.stride(), *dprefix_v.stride(), B, Hkv, T, P, D,
        BLOCK_P=_REDUCE_BLOCK_P, BLOCK_D=block_d)
    return dprefix_k, dprefix_v
