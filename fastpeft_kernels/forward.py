"""The forward kernel of prefix attention (training and prefill), FlashAttention-2 style: one program per query
block of one (row, query head) walks the row's prefix entry, then the sequence's own keys, with one online softmax
(see ``fastpeft.kernels.prefix_attention`` for the whole scheme)."""

import triton
import triton.language as tl

from .blocks import head_bases, load_keys_transposed, masked_scores, query_block_program, sequence_block_bounds
from .common import LN2, row_prefix, tile_dot, tile_max, tile_sum
from .configs import AUTOTUNE_KEY, FWD_CONFIGS, PRUNE


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
        k_t = load_keys_transposed(k_base, offs_n, offs_d, d_valid, stride_k_n, stride_k_d, n_limit, ON_DIAGONAL)
        if ON_DIAGONAL:
            v_mask = (offs_n < n_limit)[:, None] & d_valid[None, :]
        else:
            v_mask = d_valid[None, :]
        v = tl.load(v_base + offs_n[:, None] * stride_v_n + offs_d[None, :] * stride_v_d, mask=v_mask, other=0.0)
        # Raw scores (invisible keys -inf); qk_scale > 0 commutes with the row max, so the scale is applied once
        # per row to the max and folded into exp2's argument, one FFMA per score instead of FMUL + FADD.
        s = masked_scores(tile_dot(q, k_t, DOT_FP32), offs_n, q_pos, n_limit, mask_base, stride_mask_n,
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


@triton.autotune(configs=FWD_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=PRUNE)
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
    pid_bh, b, h, h_kv, m0 = query_block_program(Hq, group, BLOCK_M)
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
    pk_base, pv_base = head_bases(prefix_k_ptr, prefix_v_ptr, entry, h_kv,
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
    n_full, n_end = sequence_block_bounds(S, L, m0, CAUSAL, BLOCK_M, BLOCK_N)
    k_base, v_base = head_bases(k_ptr, v_ptr, b, h_kv, stride_k_b, stride_k_h, stride_v_b, stride_v_h)
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
    lse = tl.where(sees_something, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
    tl.store(lse_ptr + pid_bh * L + offs_m, lse, mask=m_valid)
