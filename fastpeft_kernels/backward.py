"""The backward kernels of prefix attention (see ``fastpeft.kernels.prefix_attention`` for the whole scheme):

* ``_prefix_attn_bwd_preprocess_kernel``: ``delta = rowsum(dout * out)``;
* ``_prefix_attn_bwd_dkdv_kernel``: dk/dv of a block of sequence keys (and, fused, its share of dq by atomics);
* ``_prefix_attn_bwd_prefix_dkdv_kernel``: a row's gradient of a block of its prefix entry, added per table entry;
* ``_prefix_grad_reduce_kernel``: the deterministic per-entry sum of per-row prefix gradients;
* ``_prefix_attn_bwd_dq_kernel``: dq in a separate pass (the ``split`` backward).
"""

import triton
import triton.language as tl

from .blocks import head_bases, load_keys_transposed, masked_scores, query_block_program, sequence_block_bounds
from .common import LOG2E, row_prefix, tile_dot, tile_sum
from .configs import AUTOTUNE_KEY, DKDV_AUTOTUNE_KEY, DKDV_CONFIGS, DQ_CONFIGS, PRUNE


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
        k_t = load_keys_transposed(k_base, offs_n, offs_d, d_valid, stride_k_n, stride_k_d, n_limit, ON_DIAGONAL)
        v_t = load_keys_transposed(v_base, offs_n, offs_d, d_valid, stride_v_n, stride_v_d, n_limit, ON_DIAGONAL)
        s = masked_scores(tile_dot(q, k_t, DOT_FP32), offs_n, q_pos, n_limit, mask_base, stride_mask_n,
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
        lse2 = tl.load(lse_base + offs_m, mask=m_valid, other=float("inf")) * LOG2E
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
@triton.autotune(configs=DKDV_CONFIGS, key=DKDV_AUTOTUNE_KEY, prune_configs_by=PRUNE,
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


@triton.autotune(configs=DKDV_CONFIGS, key=DKDV_AUTOTUNE_KEY + ["ATOMIC"], prune_configs_by=PRUNE,
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


@triton.autotune(configs=DQ_CONFIGS, key=AUTOTUNE_KEY, prune_configs_by=PRUNE)
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
    pid_bh, b, h, h_kv, m0 = query_block_program(Hq, group, BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < L
    d_valid = offs_d < D
    tile_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_l
                + offs_d[None, :] * stride_q_d, mask=tile_mask, other=0.0)
    do = tl.load(dout_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_l
                 + offs_d[None, :] * stride_do_d, mask=tile_mask, other=0.0)
    lse2 = tl.load(lse_ptr + pid_bh * L + offs_m, mask=m_valid, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + pid_bh * L + offs_m, mask=m_valid, other=0.0)
    q_pos = offs_m + (S - L)

    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    entry, prefix_len = row_prefix(prefix_index_ptr, prefix_lengths_ptr, b, T, P)
    pk_base, pv_base = head_bases(prefix_k_ptr, prefix_v_ptr, entry, h_kv,
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
    n_full, n_end = sequence_block_bounds(S, L, m0, CAUSAL, BLOCK_M, BLOCK_N)
    k_base, v_base = head_bases(k_ptr, v_ptr, b, h_kv, stride_k_b, stride_k_h, stride_v_b, stride_v_h)
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
