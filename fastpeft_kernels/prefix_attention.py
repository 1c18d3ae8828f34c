"""Triton kernels for prefix attention (training and prefill), FlashAttention-2 style.

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
triton's: the reductions and ``tile_dot`` come from ``_common`` (shared with the decode kernels), which avoids
triton's own ``@jit`` library functions for that case.
"""

import os

import torch
import triton
import triton.language as tl

from ._common import INTERPRETING as _INTERPRETING
from ._common import row_prefix, tile_dot, tile_max, tile_sum

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E_HOST = 1.4426950408889634

# Block sizes of the small kernels that are not autotuned.
_PREPROCESS_BLOCK_M = 64
_REDUCE_BLOCK_P = 32

# Backward variants (see ``bwd_mode``), the default first.
BWD_MODES = ("fused", "split")

# The prefix-gradient grid splits the query axis until it has about this many programs (about 4 waves of 2
# CTAs on 132 SMs), with runs of at least this many queries (16 under the interpreter, so that its small test
# shapes run several runs).
_PREFIX_TARGET_PROGRAMS = 1024
_PREFIX_CHUNK_MIN_ROWS = 16 if _INTERPRETING else 128


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _query_block_program(Hq, group, BLOCK_M: tl.constexpr):
    """(row-head index ``b * Hq + h`` of the ``[B, Hq, L]`` lse/delta buffers, b as int64, query head h, kv head,
    first query m0) of a program of grid ``(cdiv(L, BLOCK_M), B * Hq)``.

    Under the causal mask later query blocks see more keys: program 0 takes the last block, so the longest
    programs start first and the tail is shorter.
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % Hq
    return pid_bh, (pid_bh // Hq).to(tl.int64), h, h // group, pid_m * BLOCK_M


@triton.jit
def _head_bases(k_ptr, v_ptr, row, h_kv, stride_k_row, stride_k_h, stride_v_row, stride_v_h):
    """(k, v) pointers to key 0 of kv head ``h_kv`` of ``row`` (a batch row of k/v or a prefix table entry)."""
    return k_ptr + row * stride_k_row + h_kv * stride_k_h, v_ptr + row * stride_v_row + h_kv * stride_v_h


@triton.jit
def _sequence_block_bounds(S, L, m0, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(n_full, n_end) of the sequence keys for the query block starting at ``m0``.

    Key blocks before ``n_full`` are visible to every query of the block (and lie inside S); ``[n_full,
    n_end)`` are crossed by the causal diagonal or the end of S; keys from ``n_end`` on are never visible.
    """
    if CAUSAL:
        return ((S - L + m0 + 1) // BLOCK_N) * BLOCK_N, tl.minimum(S, S - L + m0 + BLOCK_M)
    else:
        return (S // BLOCK_N) * BLOCK_N, S


@triton.jit
def _load_keys_transposed(base, offs_n, offs_d, d_valid, stride_n, stride_d, n_limit, ON_DIAGONAL: tl.constexpr):
    """Tile ``[BLOCK_D, BLOCK_N]`` of the rows ``offs_n`` of a K or V range, transposed for ``q @ k_t``.

    Only ``ON_DIAGONAL`` blocks can reach past the ``n_limit`` valid keys, so only they mask the key dimension.
    """
    if ON_DIAGONAL:
        mask = (offs_n < n_limit)[None, :] & d_valid[:, None]
    else:
        mask = d_valid[:, None]
    return tl.load(base + offs_n[None, :] * stride_n + offs_d[:, None] * stride_d, mask=mask, other=0.0)


@triton.jit
def _masked_scores(s, offs_n, q_pos, n_limit, mask_base, stride_mask_n,
                   ON_DIAGONAL: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Scores ``s [BLOCK_M, BLOCK_N]`` with the invisible keys set to ``-inf``: on ``ON_DIAGONAL`` blocks the
    keys ``>= n_limit`` and (``CAUSAL``) those after each query's position ``q_pos``; with ``HAS_MASK`` the
    padding keys."""
    if ON_DIAGONAL:
        visible = (offs_n < n_limit)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    if HAS_MASK:
        key_real = tl.load(mask_base + offs_n * stride_mask_n, mask=offs_n < n_limit, other=0) != 0
        s = tl.where(key_real[None, :], s, float("-inf"))
    return s


@triton.jit
def _fwd_key_blocks(acc, m_i, l_i, q, k_base, v_base, mask_base,
                    stride_k_n, stride_k_d, stride_v_n, stride_v_d, stride_mask_n,
                    q_pos, offs_d, d_valid, n_lo, n_hi, n_limit, qk_scale,
                    ON_DIAGONAL: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                    DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update over key blocks ``[n_lo, n_hi)`` of one key range (a prefix entry or the sequence).

    ``n_limit`` is the number of valid keys in the range. ``ON_DIAGONAL`` blocks may hold keys ``>= n_limit``
    or (with ``CAUSAL``) keys after a query's position ``q_pos``, so they are masked; the other blocks are
    known to be fully visible and skip that work. ``HAS_MASK`` applies the key padding mask.
    ``m_i`` is in the log2 domain (``qk_scale`` includes log2(e)); the raw scores are scaled inside exp2's FFMA.
    """
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_t = _load_keys_transposed(k_base, offs_n, offs_d, d_valid, stride_k_n, stride_k_d, n_limit, ON_DIAGONAL)
        if ON_DIAGONAL:
            v_mask = (offs_n < n_limit)[:, None] & d_valid[None, :]
        else:
            v_mask = d_valid[None, :]
        v = tl.load(v_base + offs_n[:, None] * stride_v_n + offs_d[None, :] * stride_v_d, mask=v_mask, other=0.0)
        # Raw scores (invisible keys -inf); qk_scale > 0 commutes with the row max, so the scale is applied once
        # per row to the max and folded into exp2's argument, one FFMA per score instead of FMUL + FADD.
        s = _masked_scores(tile_dot(q, k_t, DOT_FP32), offs_n, q_pos, n_limit, mask_base, stride_mask_n,
                           ON_DIAGONAL, CAUSAL, HAS_MASK)
        # A row that has seen no visible key yet keeps m = -inf; shifting by 0 instead keeps exp2 finite
        # (its weights are exp2(-inf) = 0) and its correction factor exp2(-inf - 0) = 0.
        m_new = tl.maximum(m_i, tile_max(s, 1) * qk_scale)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s * qk_scale - m_shift[:, None])
        l_i = l_i * alpha + tile_sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _dq_key_blocks(dq, q, do, lse2, delta, k_base, v_base, mask_base,
                   stride_k_n, stride_k_d, stride_v_n, stride_v_d, stride_mask_n,
                   q_pos, offs_d, d_valid, n_lo, n_hi, n_limit, qk_scale,
                   ON_DIAGONAL: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                   DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate ``dS @ K`` (unscaled) over key blocks ``[n_lo, n_hi)``; masks as in ``_fwd_key_blocks``.

    ``lse2`` is the row's log-sum-exp in the log2 domain, ``delta = rowsum(dO * O)``.
    """
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_t = _load_keys_transposed(k_base, offs_n, offs_d, d_valid, stride_k_n, stride_k_d, n_limit, ON_DIAGONAL)
        v_t = _load_keys_transposed(v_base, offs_n, offs_d, d_valid, stride_v_n, stride_v_d, n_limit, ON_DIAGONAL)
        s = _masked_scores(tile_dot(q, k_t, DOT_FP32), offs_n, q_pos, n_limit, mask_base, stride_mask_n,
                           ON_DIAGONAL, CAUSAL, HAS_MASK)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        dp = tile_dot(do, v_t, DOT_FP32)
        ds = p * (dp - delta[:, None])
        dq += tile_dot(ds.to(k_t.dtype), tl.trans(k_t), DOT_FP32)
    return dq


@triton.jit
def _dkdv_query_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                       stride_q_l, stride_q_d, stride_do_l, stride_do_d, stride_dq_l, stride_dq_d,
                       offs_n, offs_d, d_valid, m_lo, m_hi, L, query_offset, qk_scale,
                       CAUSAL_MASK: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                       DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate ``P^T @ dO`` into dv and ``dS^T @ Q`` (unscaled) into dk for one key block ``k, v
    [BLOCK_N, BLOCK_D]`` over the query blocks ``[m_lo, m_hi)`` of one query head.

    Query ``i`` sits at key position ``i + query_offset``; ``CAUSAL_MASK`` hides keys after it (only the
    blocks the diagonal crosses need it). Query rows ``>= L`` load ``lse = +inf`` so their probabilities are 0.
    Keys that are invalid for every query (padding, past a prefix length, ``>= S``) only feed their own rows of
    dk/dv (a key's probabilities and dS are per key row), which the caller zeroes or does not store, so they need
    no mask here. With ``DQ_ATOMIC`` their dS would reach dq through ``dS @ K``: the callers load the rows of
    invalid keys of ``k`` as zeros (padding, past a prefix length, ``>= S``), so no per-score mask is needed.

    ``DQ_ATOMIC`` (the 5-matmul backward, as FlashAttention-2): also add ``dS @ K`` (unscaled) for each query
    block into the float32 ``dq`` accumulator at ``dq_base`` with atomics, so that no second pass recomputes
    ``Q K^T`` and ``dO V^T`` for dq. (Computed as ``trans(dS^T) @ K [BLOCK_M, BLOCK_D]``: with the 16-row query
    tiles that fit the registers it is an mma.sync; the transposed form, ``K^T @ dS^T`` on wgmma, needs a
    [BLOCK_D, BLOCK_M] layout conversion for the atomics and spills.)
    """
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_valid = offs_m < L
        q_t = tl.load(q_base + offs_m[None, :] * stride_q_l + offs_d[:, None] * stride_q_d,
                      mask=m_valid[None, :] & d_valid[:, None], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_do_l + offs_d[None, :] * stride_do_d,
                     mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=m_valid, other=float("inf")) * _LOG2E
        delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        s_t = tile_dot(k, q_t, DOT_FP32)                                             # [BLOCK_N, BLOCK_M], raw
        if CAUSAL_MASK:
            s_t = tl.where(offs_n[:, None] <= (offs_m + query_offset)[None, :], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t * qk_scale - lse2[None, :])                           # one FFMA per score
        dv += tile_dot(p_t.to(do.dtype), do, DOT_FP32)
        dp_t = tile_dot(v, tl.trans(do), DOT_FP32)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk += tile_dot(ds_t, tl.trans(q_t), DOT_FP32)
        if DQ_ATOMIC:
            dq = tile_dot(tl.trans(ds_t), k, DOT_FP32)                               # [BLOCK_M, BLOCK_D]
            tl.atomic_add(dq_base + offs_m[:, None] * stride_dq_l + offs_d[None, :] * stride_dq_d, dq,
                          mask=m_valid[:, None] & d_valid[None, :], sem="relaxed")
    return dk, dv


# ----------------------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------------------

def _any_case(block_d, dq_atomic, has_mask):
    return True


def _up_to_d64(block_d, dq_atomic, has_mask):
    return block_d <= 64


def _wide_head(block_d, dq_atomic, has_mask):
    # Up to D=64 the larger configs cover every case (and this one spills the fused prefix kernel at D=64 under
    # Triton 3.9); it stays the fallback when nothing else is kept.
    return block_d > 64


def _not_fused_d128(block_d, dq_atomic, has_mask):
    return block_d <= 64 or not dq_atomic


def _configs(shapes):
    """triton.Config list from ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, where])``; one small config when
    interpreting (autotuning there would only multiply the interpreter's run time).

    ``where(block_d, dq_atomic, has_mask)`` says for which cases the pruner keeps the config: the ones where it
    compiles for sm_90a without register spills (``benchmarks/results/static-*``, checked by
    ``tests/test_static_report.py``)."""
    if _INTERPRETING:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    configs = []
    for m, n, w, s, *where in shapes:
        config = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        config.fastpeft_where = where[0] if where else _any_case
        configs.append(config)
    return configs


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose tiles do not fit a wide head (by bytes per row: fp32 rows are twice as wide as
    bf16 ones) in registers and shared memory, configs that spill registers in this case (their ``where``),
    and query tiles much taller than L."""
    row_bytes = kwargs["BLOCK_D"] * named_args["q_ptr"].element_size()
    max_tile = 32 if row_bytes > 512 else 64 if row_bytes > 256 else None
    bucket_l = named_args["bucket_l"]
    case = (kwargs["BLOCK_D"], bool(kwargs.get("DQ_ATOMIC", False)), bool(kwargs.get("HAS_MASK", False)))
    kept = []
    for config in configs:
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if max_tile is not None and max(block_m, block_n) > max_tile:
            continue
        if block_m > max(16, bucket_l) and bucket_l < 64:
            continue
        if not getattr(config, "fastpeft_where", _any_case)(*case):
            continue
        kept.append(config)
    return kept or configs[-1:]


# (BLOCK_M, BLOCK_N, num_warps, num_stages[, where]). The last entry of each list, 32 x 32, is the pruner's
# fallback: it fits every head size and dtype. (The small configs' warps and stages are the ones that do not spill
# under Triton 3.6's ptxas either, which caps some 4-warp kernels at 128 registers.)
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2, _up_to_d64), (128, 128, 8, 3, _up_to_d64),
                         (64, 128, 4, 2, _up_to_d64), (128, 32, 4, 3, _up_to_d64), (64, 64, 4, 3),
                         (16, 64, 4, 1, _up_to_d64), (64, 32, 4, 2), (32, 32, 4, 2)])
_DQ_CONFIGS = _configs([(128, 32, 8, 2), (64, 64, 4, 2), (16, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)])
# For the dk/dv kernels BLOCK_N is the key tile each program owns and BLOCK_M the query tile it loops over.
# At D=128 their two float32 [BLOCK_N, 128] accumulators take 128 registers a thread; only 16-row query tiles
# (32 without the fused dq) leave room for the rest.
_DKDV_CONFIGS = _configs([(16, 128, 8, 2), (16, 128, 8, 3), (32, 128, 8, 2, _up_to_d64),
                          (32, 64, 8, 2, _not_fused_d128), (16, 64, 4, 2, _up_to_d64), (32, 64, 4, 2, _up_to_d64),
                          (32, 32, 8, 1, _wide_head)])

_AUTOTUNE_KEY = ["BLOCK_D", "bucket_l", "bucket_s", "CAUSAL", "HAS_MASK"]
_DKDV_AUTOTUNE_KEY = _AUTOTUNE_KEY + ["DQ_ATOMIC"]
_PRUNE = {"early_config_prune": _prune_configs}


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _prefix_attn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, prefix_k_ptr, prefix_v_ptr, prefix_index_ptr, prefix_lengths_ptr, mask_ptr,
        out_ptr, lse_ptr,
        stride_q_b, stride_q_h, stride_q_l, stride_q_d,
        stride_k_b, stride_k_h, stride_k_s, stride_k_d,
        stride_v_b, stride_v_h, stride_v_s, stride_v_d,
        stride_pk_t, stride_pk_h, stride_pk_p, stride_pk_d,
        stride_pv_t, stride_pv_h, stride_pv_p, stride_pv_d,
        stride_mask_b, stride_mask_s,
        stride_out_b, stride_out_h, stride_out_l, stride_out_d,
        Hq, L, S, D, T, P, group, qk_scale,
        bucket_l, bucket_s,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """out/lse of one query block of one (row, query head). ``bucket_l``/``bucket_s`` only key the autotuner."""
    pid_bh, b, h, h_kv, m0 = _query_block_program(Hq, group, BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < L
    d_valid = offs_d < D
    q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_l
                + offs_d[None, :] * stride_q_d, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    q_pos = offs_m + (S - L)    # bottom-right alignment

    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)

    # The row's prefix entry, read in place from the table: every valid entry is visible to every query.
    entry, prefix_len = row_prefix(prefix_index_ptr, prefix_lengths_ptr, b, T, P)
    pk_base, pv_base = _head_bases(prefix_k_ptr, prefix_v_ptr, entry, h_kv,
                                   stride_pk_t, stride_pk_h, stride_pv_t, stride_pv_h)
    # Whole blocks of the prefix need no mask at all; only a last partial block (a length that is not a
    # multiple of BLOCK_N) is masked.
    prefix_full = (prefix_len // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _fwd_key_blocks(
        acc, m_i, l_i, q, pk_base, pv_base, mask_ptr, stride_pk_p, stride_pk_d, stride_pv_p, stride_pv_d, 0,
        q_pos, offs_d, d_valid, 0, prefix_full, prefix_len, qk_scale,
        ON_DIAGONAL=False, CAUSAL=False, HAS_MASK=False, DOT_FP32=DOT_FP32, BLOCK_N=BLOCK_N)
    acc, m_i, l_i = _fwd_key_blocks(
        acc, m_i, l_i, q, pk_base, pv_base, mask_ptr, stride_pk_p, stride_pk_d, stride_pv_p, stride_pv_d, 0,
        q_pos, offs_d, d_valid, prefix_full, prefix_len, prefix_len, qk_scale,
        ON_DIAGONAL=True, CAUSAL=False, HAS_MASK=False, DOT_FP32=DOT_FP32, BLOCK_N=BLOCK_N)

    # The sequence: unmasked blocks up to n_full, then the blocks the diagonal or the end of S crosses.
    n_full, n_end = _sequence_block_bounds(S, L, m0, CAUSAL, BLOCK_M, BLOCK_N)
    k_base, v_base = _head_bases(k_ptr, v_ptr, b, h_kv, stride_k_b, stride_k_h, stride_v_b, stride_v_h)
    mask_base = mask_ptr + b * stride_mask_b
    acc, m_i, l_i = _fwd_key_blocks(
        acc, m_i, l_i, q, k_base, v_base, mask_base, stride_k_s, stride_k_d, stride_v_s, stride_v_d,
        stride_mask_s, q_pos, offs_d, d_valid, 0, n_full, S, qk_scale,
        ON_DIAGONAL=False, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK, DOT_FP32=DOT_FP32, BLOCK_N=BLOCK_N)
    acc, m_i, l_i = _fwd_key_blocks(
        acc, m_i, l_i, q, k_base, v_base, mask_base, stride_k_s, stride_k_d, stride_v_s, stride_v_d,
        stride_mask_s, q_pos, offs_d, d_valid, n_full, n_end, S, qk_scale,
        ON_DIAGONAL=True, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK, DOT_FP32=DOT_FP32, BLOCK_N=BLOCK_N)

    # A query that saw nothing: output 0 and lse = +inf, so the backward's exp2(s - lse) is 0 for it.
    sees_something = l_i > 0.0
    l_safe = tl.where(sees_something, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + b * stride_out_b + h * stride_out_h + offs_m[:, None] * stride_out_l
             + offs_d[None, :] * stride_out_d, out.to(out_ptr.dtype.element_ty),
             mask=m_valid[:, None] & d_valid[None, :])
    lse = tl.where(sees_something, (m_i + tl.math.log2(l_safe)) * _LN2, float("inf"))
    tl.store(lse_ptr + pid_bh * L + offs_m, lse, mask=m_valid)


@triton.jit
def _prefix_attn_bwd_preprocess_kernel(
        out_ptr, dout_ptr, delta_ptr,
        stride_out_b, stride_out_h, stride_out_l, stride_out_d,
        stride_do_b, stride_do_h, stride_do_l, stride_do_d,
        Hq, L, D,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dout * out (float32), the softmax backward's row term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (offs_m < L)[:, None] & (offs_d < D)[None, :]
    o = tl.load(out_ptr + b * stride_out_b + h * stride_out_h + offs_m[:, None] * stride_out_l
                + offs_d[None, :] * stride_out_d, mask=tile_mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_l
                 + offs_d[None, :] * stride_do_d, mask=tile_mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_bh * L + offs_m, tile_sum(o * do, 1), mask=offs_m < L)


# Autotuning benchmarks each config by launching it: the accumulators that kernels add into are zeroed before
# each try (reset_to_zero) or restored to their value before the launch (restore_value: dq_acc already holds
# what other kernels added).
@triton.autotune(configs=_DKDV_CONFIGS, key=_DKDV_AUTOTUNE_KEY, prune_configs_by=_PRUNE,
                 restore_value=["dq_acc_ptr"])
@triton.jit
def _prefix_attn_bwd_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, mask_ptr, dk_ptr, dv_ptr, dq_acc_ptr,
        stride_q_b, stride_q_h, stride_q_l, stride_q_d,
        stride_k_b, stride_k_h, stride_k_s, stride_k_d,
        stride_v_b, stride_v_h, stride_v_s, stride_v_d,
        stride_do_b, stride_do_h, stride_do_l, stride_do_d,
        stride_mask_b, stride_mask_s,
        stride_dk_b, stride_dk_h, stride_dk_s, stride_dk_d,
        stride_dv_b, stride_dv_h, stride_dv_s, stride_dv_d,
        stride_dqa_b, stride_dqa_h, stride_dqa_l, stride_dqa_d,
        Hq, Hkv, L, S, D, group, softmax_scale, qk_scale,
        bucket_l, bucket_s,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DQ_ATOMIC: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk/dv of one block of sequence keys of one (row, kv head), summed over the query heads of its group.
    ``DQ_ATOMIC``: also adds this block's share of dq (unscaled) into the float32 ``dq_acc`` with atomics."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    h_kv = pid_bh % Hkv

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < S
    d_valid = offs_d < D
    tile_mask = n_valid[:, None] & d_valid[None, :]
    if HAS_MASK:
        # Padding keys load as zero rows of k. Each key's probabilities and dS only feed its own rows of dk/dv
        # (zeroed by the launcher) and, through dS @ K, dq: zero rows keep them out of dq without any per-score
        # mask.
        key_real = tl.load(mask_ptr + b * stride_mask_b + offs_n * stride_mask_s, mask=n_valid, other=0) != 0
        k = tl.load(k_ptr + b * stride_k_b + h_kv * stride_k_h + offs_n[:, None] * stride_k_s
                    + offs_d[None, :] * stride_k_d, mask=tile_mask & key_real[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + b * stride_k_b + h_kv * stride_k_h + offs_n[:, None] * stride_k_s
                    + offs_d[None, :] * stride_k_d, mask=tile_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_v_b + h_kv * stride_v_h + offs_n[:, None] * stride_v_s
                + offs_d[None, :] * stride_v_d, mask=tile_mask, other=0.0)
    # Query i sees key j iff j <= i + (S - L). Query blocks before m_lo see none of this block; blocks in
    # [m_lo, m_full) are crossed by the diagonal; blocks from m_full on see all of it.
    if CAUSAL:
        m_lo = (tl.maximum(n0 - (S - L), 0) // BLOCK_M) * BLOCK_M
        m_full = tl.minimum((tl.maximum(n0 + BLOCK_N - 1 - (S - L), 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, L)
    else:
        m_lo = 0
        m_full = 0
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    for g in range(group):
        h = h_kv * group + g
        q_base = q_ptr + b * stride_q_b + h * stride_q_h
        do_base = dout_ptr + b * stride_do_b + h * stride_do_h
        row = (b * Hq + h) * L
        dq_base = dq_acc_ptr + b * stride_dqa_b + h * stride_dqa_h
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, lse_ptr + row, delta_ptr + row, dq_base,
            stride_q_l, stride_q_d, stride_do_l, stride_do_d, stride_dqa_l, stride_dqa_d, offs_n, offs_d, d_valid,
            m_lo, m_full, L, S - L, qk_scale, CAUSAL_MASK=True, DQ_ATOMIC=DQ_ATOMIC, DOT_FP32=DOT_FP32,
            BLOCK_M=BLOCK_M)
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, lse_ptr + row, delta_ptr + row, dq_base,
            stride_q_l, stride_q_d, stride_do_l, stride_do_d, stride_dqa_l, stride_dqa_d, offs_n, offs_d, d_valid,
            m_full, L, L, S - L, qk_scale, CAUSAL_MASK=False, DQ_ATOMIC=DQ_ATOMIC, DOT_FP32=DOT_FP32,
            BLOCK_M=BLOCK_M)
    # Padding keys got probabilities in the loop above (unmasked there): the launcher zeroes their rows of dk/dv
    # (a masked_fill; here the mask would be one more value held through the loop, where registers are short).
    dk = dk * softmax_scale
    tl.store(dk_ptr + b * stride_dk_b + h_kv * stride_dk_h + offs_n[:, None] * stride_dk_s
             + offs_d[None, :] * stride_dk_d, dk.to(dk_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(dv_ptr + b * stride_dv_b + h_kv * stride_dv_h + offs_n[:, None] * stride_dv_s
             + offs_d[None, :] * stride_dv_d, dv.to(dv_ptr.dtype.element_ty), mask=tile_mask)


@triton.autotune(configs=_DKDV_CONFIGS, key=_DKDV_AUTOTUNE_KEY + ["ATOMIC"], prune_configs_by=_PRUNE,
                 reset_to_zero=["dprefix_k_acc_ptr", "dprefix_v_acc_ptr"], restore_value=["dq_acc_ptr"])
@triton.jit
def _prefix_attn_bwd_prefix_dkdv_kernel(
        q_ptr, prefix_k_ptr, prefix_v_ptr, prefix_index_ptr, prefix_lengths_ptr, dout_ptr, lse_ptr, delta_ptr,
        dprefix_k_acc_ptr, dprefix_v_acc_ptr, dq_acc_ptr,
        stride_q_b, stride_q_h, stride_q_l, stride_q_d,
        stride_pk_t, stride_pk_h, stride_pk_p, stride_pk_d,
        stride_pv_t, stride_pv_h, stride_pv_p, stride_pv_d,
        stride_do_b, stride_do_h, stride_do_l, stride_do_d,
        stride_acc_r, stride_acc_h, stride_acc_p, stride_acc_d,
        stride_dqa_b, stride_dqa_h, stride_dqa_l, stride_dqa_d,
        Hq, Hkv, L, D, T, P, group, softmax_scale, qk_scale,
        bucket_l, bucket_s,
        ATOMIC: tl.constexpr, DQ_ATOMIC: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
        DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One batch row's gradient of one block of its prefix entry (one kv head, the queries of one chunk of L
    for every query head of its group). Grid ``(cdiv(P, BLOCK_N), chunks, B * Hkv)``: the query axis is split
    into ``chunks`` equal runs of query blocks, so the grid fills the machine even when ``P`` is short.

    ``ATOMIC``: float32 ``atomic_add`` into ``dprefix_*_acc [T, Hkv, P, D]`` at the row's entry (the sum over
    rows and chunks happens in memory, order unspecified). Otherwise (one chunk) the row's gradient is stored
    to the per-row partial ``dprefix_*_acc [B, Hkv, P, D]`` for ``_prefix_grad_reduce_kernel``. Prefix entries
    are visible to every query, so there is no causal split; ``CAUSAL``/``HAS_MASK`` only key the autotuner.
    ``DQ_ATOMIC``: also adds the prefix keys' share of dq into ``dq_acc`` (see ``_dkdv_query_blocks``).
    """
    pid_n = tl.program_id(0)
    pid_chunk = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)
    h_kv = pid_bh % Hkv
    entry, prefix_len = row_prefix(prefix_index_ptr, prefix_lengths_ptr, b, T, P)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (offs_n < prefix_len)[:, None] & (offs_d < D)[None, :]
    k = tl.load(prefix_k_ptr + entry * stride_pk_t + h_kv * stride_pk_h + offs_n[:, None] * stride_pk_p
                + offs_d[None, :] * stride_pk_d, mask=tile_mask, other=0.0)
    v = tl.load(prefix_v_ptr + entry * stride_pv_t + h_kv * stride_pv_h + offs_n[:, None] * stride_pv_p
                + offs_d[None, :] * stride_pv_d, mask=tile_mask, other=0.0)

    # This program's run of query blocks; a block past the entry's length has no gradient: run none for it.
    blocks_per_chunk = ((L + BLOCK_M - 1) // BLOCK_M + tl.num_programs(1) - 1) // tl.num_programs(1)
    m_lo = pid_chunk * blocks_per_chunk * BLOCK_M
    m_hi = tl.where(n0 < prefix_len, tl.minimum(m_lo + blocks_per_chunk * BLOCK_M, L), m_lo)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    for g in range(group):
        h = h_kv * group + g
        row = (b * Hq + h) * L
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_ptr + b * stride_q_b + h * stride_q_h,
            dout_ptr + b * stride_do_b + h * stride_do_h, lse_ptr + row, delta_ptr + row,
            dq_acc_ptr + b * stride_dqa_b + h * stride_dqa_h,
            stride_q_l, stride_q_d, stride_do_l, stride_do_d, stride_dqa_l, stride_dqa_d,
            offs_n, offs_d, offs_d < D, m_lo, m_hi, L, 0, qk_scale,
            CAUSAL_MASK=False, DQ_ATOMIC=DQ_ATOMIC, DOT_FP32=DOT_FP32, BLOCK_M=BLOCK_M)
    dk = dk * softmax_scale
    # Entries past the length got probabilities in the loop (unmasked there) but are not stored.
    if ATOMIC:
        acc_offsets = (entry * stride_acc_r + h_kv * stride_acc_h + offs_n[:, None] * stride_acc_p
                       + offs_d[None, :] * stride_acc_d)
        tl.atomic_add(dprefix_k_acc_ptr + acc_offsets, dk, mask=tile_mask, sem="relaxed")
        tl.atomic_add(dprefix_v_acc_ptr + acc_offsets, dv, mask=tile_mask, sem="relaxed")
    else:
        acc_offsets = (b * stride_acc_r + h_kv * stride_acc_h + offs_n[:, None] * stride_acc_p
                       + offs_d[None, :] * stride_acc_d)
        tl.store(dprefix_k_acc_ptr + acc_offsets, dk, mask=tile_mask)
        tl.store(dprefix_v_acc_ptr + acc_offsets, dv, mask=tile_mask)


@triton.jit
def _prefix_grad_reduce_kernel(
        partial_k_ptr, partial_v_ptr, prefix_index_ptr, dprefix_k_ptr, dprefix_v_ptr,
        stride_part_b, stride_part_h, stride_part_p, stride_part_d,
        stride_dpk_t, stride_dpk_h, stride_dpk_p, stride_dpk_d,
        stride_dpv_t, stride_dpv_h, stride_dpv_p, stride_dpv_d,
        B, Hkv, T, P, D,
        BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Deterministic per-entry sum: dprefix[t] = sum of the per-row partials of the rows b with
    prefix_index[b] == t, added in increasing b. Grid ``(cdiv(P, BLOCK_P), T * Hkv)``."""
    pid_p = tl.program_id(0)
    pid_th = tl.program_id(1)
    entry = pid_th // Hkv
    h_kv = pid_th % Hkv
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (offs_p < P)[:, None] & (offs_d < D)[None, :]
    part_offsets = h_kv * stride_part_h + offs_p[:, None] * stride_part_p + offs_d[None, :] * stride_part_d
    acc_k = tl.full([BLOCK_P, BLOCK_D], 0.0, dtype=tl.float32)
    acc_v = tl.full([BLOCK_P, BLOCK_D], 0.0, dtype=tl.float32)
    # Row pointers advance by one row per step (64-bit pointer arithmetic, no int32 overflow).
    row_k_ptrs = partial_k_ptr + part_offsets
    row_v_ptrs = partial_v_ptr + part_offsets
    for b in range(B):
        # The partials of rows using other entries are never read.
        if tl.minimum(tl.maximum(tl.load(prefix_index_ptr + b), 0), T - 1) == entry:
            acc_k += tl.load(row_k_ptrs, mask=tile_mask, other=0.0)
            acc_v += tl.load(row_v_ptrs, mask=tile_mask, other=0.0)
        row_k_ptrs += stride_part_b
        row_v_ptrs += stride_part_b
    tl.store(dprefix_k_ptr + entry * stride_dpk_t + h_kv * stride_dpk_h + offs_p[:, None] * stride_dpk_p
             + offs_d[None, :] * stride_dpk_d, acc_k.to(dprefix_k_ptr.dtype.element_ty), mask=tile_mask)
    tl.store(dprefix_v_ptr + entry * stride_dpv_t + h_kv * stride_dpv_h + offs_p[:, None] * stride_dpv_p
             + offs_d[None, :] * stride_dpv_d, acc_v.to(dprefix_v_ptr.dtype.element_ty), mask=tile_mask)


@triton.autotune(configs=_DQ_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _prefix_attn_bwd_dq_kernel(
        q_ptr, k_ptr, v_ptr, prefix_k_ptr, prefix_v_ptr, prefix_index_ptr, prefix_lengths_ptr, mask_ptr,
        dout_ptr, lse_ptr, delta_ptr, dq_ptr,
        stride_q_b, stride_q_h, stride_q_l, stride_q_d,
        stride_k_b, stride_k_h, stride_k_s, stride_k_d,
        stride_v_b, stride_v_h, stride_v_s, stride_v_d,
        stride_pk_t, stride_pk_h, stride_pk_p, stride_pk_d,
        stride_pv_t, stride_pv_h, stride_pv_p, stride_pv_d,
        stride_mask_b, stride_mask_s,
        stride_do_b, stride_do_h, stride_do_l, stride_do_d,
        stride_dq_b, stride_dq_h, stride_dq_l, stride_dq_d,
        Hq, L, S, D, T, P, group, softmax_scale, qk_scale,
        bucket_l, bucket_s,
        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq of one query block of one (row, query head): prefix keys, then sequence keys (diagonal split as in
    the forward)."""
    pid_bh, b, h, h_kv, m0 = _query_block_program(Hq, group, BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < L
    d_valid = offs_d < D
    tile_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_l
                + offs_d[None, :] * stride_q_d, mask=tile_mask, other=0.0)
    do = tl.load(dout_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_l
                 + offs_d[None, :] * stride_do_d, mask=tile_mask, other=0.0)
    lse2 = tl.load(lse_ptr + pid_bh * L + offs_m, mask=m_valid, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + pid_bh * L + offs_m, mask=m_valid, other=0.0)
    q_pos = offs_m + (S - L)

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    entry, prefix_len = row_prefix(prefix_index_ptr, prefix_lengths_ptr, b, T, P)
    pk_base, pv_base = _head_bases(prefix_k_ptr, prefix_v_ptr, entry, h_kv,
                                   stride_pk_t, stride_pk_h, stride_pv_t, stride_pv_h)
    prefix_full = (prefix_len // BLOCK_N) * BLOCK_N      # whole prefix blocks: unmasked
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, pk_base, pv_base, mask_ptr, stride_pk_p, stride_pk_d, stride_pv_p, stride_pv_d, 0,
        q_pos, offs_d, d_valid, 0, prefix_full, prefix_len, qk_scale,
        ON_DIAGONAL=False, CAUSAL=False, HAS_MASK=False, DOT_FP32=DOT_FP32, BLOCK_N=BLOCK_N)
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, pk_base, pv_base, mask_ptr, stride_pk_p, stride_pk_d, stride_pv_p, stride_pv_d, 0,
        q_pos, offs_d, d_valid, prefix_full, prefix_len, prefix_len, qk_scale,
        ON_DIAGONAL=True, CAUSAL=False, HAS_MASK=False, DOT_FP32=DOT_FP32, BLOCK_N=BLOCK_N)

    # The sequence: unmasked blocks up to n_full, then the blocks the diagonal or the end of S crosses.
    n_full, n_end = _sequence_block_bounds(S, L, m0, CAUSAL, BLOCK_M, BLOCK_N)
    k_base, v_base = _head_bases(k_ptr, v_ptr, b, h_kv, stride_k_b, stride_k_h, stride_v_b, stride_v_h)
    mask_base = mask_ptr + b * stride_mask_b
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_k_s, stride_k_d, stride_v_s, stride_v_d,
        stride_mask_s, q_pos, offs_d, d_valid, 0, n_full, S, qk_scale,
        ON_DIAGONAL=False, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK, DOT_FP32=DOT_FP32, BLOCK_N=BLOCK_N)
    dq = _dq_key_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, stride_k_s, stride_k_d, stride_v_s, stride_v_d,
        stride_mask_s, q_pos, offs_d, d_valid, n_full, n_end, S, qk_scale,
        ON_DIAGONAL=True, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK, DOT_FP32=DOT_FP32, BLOCK_N=BLOCK_N)

    dq = dq * softmax_scale
    tl.store(dq_ptr + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_l
             + offs_d[None, :] * stride_dq_d, dq.to(dq_ptr.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------

def _unit_last_stride(t):
    """The tensor itself when its last dimension is unit-stride (any other strides are passed to the kernels);
    otherwise a contiguous copy, made once here rather than inside a kernel."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_device(q):
    if q.device.type == "cpu" and not _INTERPRETING:
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
    return _INTERPRETING or dtype == torch.float32


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
        Hq, L, S, D, prefix_k.shape[0], prefix_k.shape[2], Hq // Hkv, softmax_scale * _LOG2E_HOST,
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
    qk_scale = softmax_scale * _LOG2E_HOST
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
        Hq, Hkv, L, D, T, P, Hq // Hkv, softmax_scale, softmax_scale * _LOG2E_HOST, *buckets,
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
