"""The split-KV ("flash-decoding") Triton kernels for one new query per row (L == 1), inference only; launched by
``fastpeft.kernels.prefix_decode`` (whose docstring gives the scheme).

* ``_prefix_decode_split_kernel``, grid ``(B * Hkv * head_chunks, num_splits)``: one kv head of one row, ``BLOCK_G``
  of the query heads that read it, one chunk of the row's virtual key range ``[prefix ; k]``; an online softmax
  in float32, stored as a partial state (or, with one split, as the normalized output). ``PAGED``: the row's own
  keys are read from a paged cache ``[num_blocks, Hkv, KV_BLOCK_SIZE, D]`` through its block table (key ``j`` in
  block ``block_table[b, j // KV_BLOCK_SIZE]`` at offset ``j % KV_BLOCK_SIZE``), ``seq_lens[b]`` of them, instead of
  from ``k[b, :, :S]``.
* ``_prefix_decode_combine_kernel``, grid ``(B * Hq,)``: the splits' states rescaled to their common max and summed.
"""

import triton
import triton.language as tl

from .common import row_prefix, tile_dot, tile_max, tile_sum

# Finite "minus infinity" for running maxima: exp2(NEG_BIG - NEG_BIG) = 1 instead of NaN, so a program, a
# split or a whole row that sees no key needs no special case (its sum stays 0 and the output becomes 0).
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _online_softmax_tile(q, k_tile, v_tile, visible, m_i, l_i, acc, qk_scale, DOT_IN_FP32: tl.constexpr):
    """Fold one tile of keys into the running (max, sum, acc) of BLOCK_G query heads.

    q ``[BLOCK_G, BLOCK_D]``, k_tile / v_tile ``[BLOCK_N, BLOCK_D]``, visible ``[BLOCK_N]`` bool.
    Scores are in the log2 domain (``qk_scale`` includes log2(e)) so exp2 replaces exp. ``DOT_IN_FP32``: IEEE
    float32 dots, for float32 inputs (no TF32) and under the interpreter (whose bf16 dot is wrong).
    """
    scores = tile_dot(q, tl.trans(k_tile), DOT_IN_FP32)
    scores = tl.where(visible[None, :], scores * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tile_max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tile_sum(p, 1)
    acc = acc * alpha[:, None] + tile_dot(p.to(v_tile.dtype), v_tile, DOT_IN_FP32)
    return m_new, l_i, acc


@triton.jit
def _prefix_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, prefix_k_ptr, prefix_v_ptr, prefix_index_ptr, prefix_lengths_ptr, mask_ptr,
    block_table_ptr, seq_lens_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_q_b, stride_q_h, stride_q_d,
    stride_k_b, stride_k_h, stride_k_s, stride_k_d,
    stride_v_b, stride_v_h, stride_v_s, stride_v_d,
    stride_pk_t, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_t, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_mask_b, stride_mask_s,
    stride_bt_b, stride_bt_n,
    stride_o_b, stride_o_h, stride_o_d,
    Hq, Hkv, S, P, T, D, num_blocks, chunk_len, qk_scale,
    GROUP: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    PAGED: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
):
    # Dense: k/v are [B, Hkv, S, D] and every row has S keys. PAGED: k/v are the caches [num_blocks, Hkv,
    # KV_BLOCK_SIZE, D] (stride_k_b steps over blocks), S = max_blocks * KV_BLOCK_SIZE bounds every row's length.
    pid_row = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    head_chunk = pid_row % HEAD_CHUNKS
    b = pid_row // HEAD_CHUNKS // Hkv
    kv_head = pid_row // HEAD_CHUNKS % Hkv

    entry, prefix_len = row_prefix(prefix_index_ptr, prefix_lengths_ptr, b, T, P)
    if PAGED:   # clamped like the prefix reads: unchecked lengths never reach past the row's block table
        row_len = tl.minimum(tl.maximum(tl.load(seq_lens_ptr + b), 0), S)
    else:
        row_len = S
    chunk_start = split * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, prefix_len + row_len)

    offs_g = head_chunk * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_valid = offs_g < GROUP
    d_valid = offs_d < D
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :] * stride_q_d,
                mask=g_valid[:, None] & d_valid[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, tl.float32)

    # Prefix part of the chunk: table positions [chunk_start, min(chunk_end, prefix_len)).
    prefix_stop = tl.minimum(chunk_end, prefix_len)
    pk_base = prefix_k_ptr + entry * stride_pk_t + kv_head * stride_pk_h
    pv_base = prefix_v_ptr + entry * stride_pv_t + kv_head * stride_pv_h
    for start in range(chunk_start, prefix_stop, BLOCK_N):
        pos = start + offs_n
        visible = pos < prefix_stop
        tile_mask = visible[:, None] & d_valid[None, :]
        k_tile = tl.load(pk_base + pos[:, None] * stride_pk_p + offs_d[None, :] * stride_pk_d,
                         mask=tile_mask, other=0.0)
        v_tile = tl.load(pv_base + pos[:, None] * stride_pv_p + offs_d[None, :] * stride_pv_d,
                         mask=tile_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_tile(q, k_tile, v_tile, visible, m_i, l_i, acc, qk_scale, DOT_IN_FP32)

    # Sequence part: virtual positions [max(chunk_start, prefix_len), chunk_end) are keys j = pos - prefix_len.
    seq_start = tl.maximum(chunk_start, prefix_len) - prefix_len
    seq_stop = chunk_end - prefix_len
    if PAGED:
        k_base = k_ptr + kv_head * stride_k_h
        v_base = v_ptr + kv_head * stride_v_h
    else:
        k_base = k_ptr + b.to(tl.int64) * stride_k_b + kv_head * stride_k_h
        v_base = v_ptr + b.to(tl.int64) * stride_v_b + kv_head * stride_v_h
    for start in range(seq_start, seq_stop, BLOCK_N):
        pos = start + offs_n
        visible = pos < seq_stop
        if PAGED:
            # Each key's block from the row's table (clamped into the pool: unchecked entries stay in bounds).
            block = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt_b + (pos // KV_BLOCK_SIZE) * stride_bt_n,
                            mask=visible, other=0)
            block = tl.minimum(tl.maximum(block, 0), num_blocks - 1).to(tl.int64)
            k_rows = block * stride_k_b + (pos % KV_BLOCK_SIZE) * stride_k_s
            v_rows = block * stride_v_b + (pos % KV_BLOCK_SIZE) * stride_v_s
        else:
            if HAS_MASK:
                # Padding keys are never loaded: their lanes are masked off the K/V loads too.
                visible &= tl.load(mask_ptr + b * stride_mask_b + pos * stride_mask_s, mask=visible, other=0) != 0
            k_rows = pos * stride_k_s
            v_rows = pos * stride_v_s
        tile_mask = visible[:, None] & d_valid[None, :]
        k_tile = tl.load(k_base + k_rows[:, None] + offs_d[None, :] * stride_k_d, mask=tile_mask, other=0.0)
        v_tile = tl.load(v_base + v_rows[:, None] + offs_d[None, :] * stride_v_d, mask=tile_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_tile(q, k_tile, v_tile, visible, m_i, l_i, acc, qk_scale, DOT_IN_FP32)

    if SINGLE_SPLIT:
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(out_ptr + b * stride_o_b + heads[:, None] * stride_o_h + offs_d[None, :] * stride_o_d,
                 out.to(out_ptr.dtype.element_ty), mask=g_valid[:, None] & d_valid[None, :])
    else:
        # Partial buffers are contiguous [B, Hq, num_splits] (m, l) and [B, Hq, num_splits, D] (acc).
        row_split = (b * Hq + heads) * num_splits + split
        tl.store(part_m_ptr + row_split, m_i, mask=g_valid)
        tl.store(part_l_ptr + row_split, l_i, mask=g_valid)
        tl.store(part_acc_ptr + row_split[:, None] * D + offs_d[None, :], acc,
                 mask=g_valid[:, None] & d_valid[None, :])


@triton.jit
def _prefix_decode_combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr,
    stride_o_b, stride_o_h, stride_o_d,
    Hq, D, num_splits,
    BLOCK_SPLITS: tl.constexpr, SPLIT_TILE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // Hq
    head = pid % Hq
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    first = pid * num_splits
    # The maxima and sums of all splits fit in a vector; the accumulators ([splits, D]) are summed SPLIT_TILE
    # splits at a time so that a long split list does not need [BLOCK_SPLITS, BLOCK_D] registers.
    offs_all = tl.arange(0, BLOCK_SPLITS)
    all_valid = offs_all < num_splits
    m_all = tl.load(part_m_ptr + first + offs_all, mask=all_valid, other=_NEG_BIG)
    l_all = tl.load(part_l_ptr + first + offs_all, mask=all_valid, other=0.0)
    m_max = tile_max(m_all, 0)
    denominator = tile_sum(tl.exp2(m_all - m_max) * l_all, 0)
    numerator = tl.full([BLOCK_D], 0.0, tl.float32)
    for tile_start in range(0, num_splits, SPLIT_TILE):
        offs_s = tile_start + tl.arange(0, SPLIT_TILE)
        s_valid = offs_s < num_splits
        weight = tl.exp2(tl.load(part_m_ptr + first + offs_s, mask=s_valid, other=_NEG_BIG) - m_max)
        acc = tl.load(part_acc_ptr + (first + offs_s)[:, None] * D + offs_d[None, :],
                      mask=s_valid[:, None] & d_valid[None, :], other=0.0)
        numerator += tile_sum(weight[:, None] * acc, 0)
    out = tl.where(denominator > 0, numerator / tl.where(denominator > 0, denominator, 1.0), 0.0)
    tl.store(out_ptr + b * stride_o_b + head * stride_o_h + offs_d * stride_o_d,
             out.to(out_ptr.dtype.element_ty), mask=d_valid)
