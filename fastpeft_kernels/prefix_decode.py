"""Split-KV ("flash-decoding") Triton kernels for one new query per row (L == 1), inference only.

Row ``b`` attends over ``[prefix_k[t][:plen] ; k[b]]`` with ``t = prefix_index[b]`` and
``plen = prefix_lengths[t]``; the table entry is read in place, never gathered or concatenated. With
``L == 1`` the query sits at key position ``S - 1`` (bottom-right alignment), so ``causal=True`` hides no key
and only the key padding mask and the prefix length decide visibility.

Layout:

* ``_prefix_decode_split_kernel``, grid ``(B * Hkv * head_chunks, num_splits)``. Each program owns one kv
  head of one row and ``BLOCK_G`` of the ``G = Hq / Hkv`` query heads that read it (all of them unless G
  is large), so each K/V tile is loaded once for the whole group: decode is bound by the bytes of K/V read.
  The row's virtual key range ``[0, plen + S)`` (prefix first, then the row's own keys) is cut into
  ``num_splits`` chunks of ``chunk_len`` keys; a program walks its chunk in ``BLOCK_N`` tiles, the prefix
  part and the sequence part in two loops so that every load comes from one tensor. It keeps an
  online-softmax state in float32 (running max ``m`` in the log2 domain, sum ``l``, unnormalized ``acc``)
  and stores it to the partial buffers, or, with one split, the normalized output directly.
* ``_prefix_decode_combine_kernel``, grid ``(B * Hq,)``: rescales the splits' states to their common max and
  writes ``sum(acc) / sum(l)``; a query that saw no key gets zeros.

The launcher picks ``num_splits`` so that about four waves of programs cover the GPU's SMs. The row's table
lookup, the dots and the reductions are ``_common``'s helpers (shared with the training kernels), which keep
the interpreter working even when triton was imported before ``TRITON_INTERPRET=1`` was set.
"""

import functools

import torch
import triton
import triton.language as tl

# INTERPRETED: whether TRITON_INTERPRET=1 was set when the kernels were decorated; then they run on CPU tensors
# and the interpreter's broken bf16 tl.dot must be avoided.
from ._common import INTERPRETING as INTERPRETED
from ._common import row_prefix, tile_dot, tile_max, tile_sum

_LOG2E = 1.4426950408889634
# Finite "minus infinity" for running maxima: exp2(NEG_BIG - NEG_BIG) = 1 instead of NaN, so a program, a
# split or a whole row that sees no key needs no special case (its sum stays 0 and the output becomes 0).
_NEG_BIG = tl.constexpr(-1.0e30)
# Programs per SM the split heuristic aims for: a few waves hide the tail of unequal splits.
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 128
# Splits whose accumulators the combine kernel sums per step.
_COMBINE_SPLIT_TILE = 16
# Under the interpreter every program runs serially on the CPU: keep the split count small and fixed.
_INTERPRETER_SPLITS = 2


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
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_q_b, stride_q_h, stride_q_d,
    stride_k_b, stride_k_h, stride_k_s, stride_k_d,
    stride_v_b, stride_v_h, stride_v_s, stride_v_d,
    stride_pk_t, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_t, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_mask_b, stride_mask_s,
    stride_o_b, stride_o_h, stride_o_d,
    Hq, Hkv, S, P, T, D, chunk_len, qk_scale,
    GROUP: tl.constexpr, HEAD_CHUNKS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr, SINGLE_SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    pid_row = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    head_chunk = pid_row % HEAD_CHUNKS
    b = pid_row // HEAD_CHUNKS // Hkv
    kv_head = pid_row // HEAD_CHUNKS % Hkv

    entry, prefix_len = row_prefix(prefix_index_ptr, prefix_lengths_ptr, b, T, P)
    chunk_start = split * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, prefix_len + S)

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
    k_base = k_ptr + b.to(tl.int64) * stride_k_b + kv_head * stride_k_h
    v_base = v_ptr + b.to(tl.int64) * stride_v_b + kv_head * stride_v_h
    for start in range(seq_start, seq_stop, BLOCK_N):
        pos = start + offs_n
        visible = pos < seq_stop
        if HAS_MASK:
            # Padding keys are never loaded: their lanes are masked off the K/V loads too.
            visible &= tl.load(mask_ptr + b * stride_mask_b + pos * stride_mask_s, mask=visible, other=0) != 0
        tile_mask = visible[:, None] & d_valid[None, :]
        k_tile = tl.load(k_base + pos[:, None] * stride_k_s + offs_d[None, :] * stride_k_d,
                         mask=tile_mask, other=0.0)
        v_tile = tl.load(v_base + pos[:, None] * stride_v_s + offs_d[None, :] * stride_v_d,
                         mask=tile_mask, other=0.0)
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


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(device, programs_per_split, max_keys, block_n):
    """Splits of the key range so that ``programs_per_split * num_splits`` fills ~4 waves of the SMs.

    ``max_keys = P + S`` bounds every row's key count; no split is shorter than one ``block_n`` tile.
    Under ``TRITON_INTERPRET=1`` (CPU) a small fixed count keeps the serial interpreter fast.
    """
    tiles = max(1, triton.cdiv(max_keys, block_n))
    if INTERPRETED or device.type != "cuda":
        return min(_INTERPRETER_SPLITS, tiles)
    target_programs = _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None
                                                   else torch.cuda.current_device())
    return max(1, min(triton.cdiv(target_programs, max(1, programs_per_split)), tiles, _MAX_SPLITS))


def _launch_config(group, head_dim, dtype):
    """(BLOCK_G, BLOCK_N, BLOCK_D, num_warps), sized so the sm_90 build keeps its tiles in registers (no
    spills, checked with an offline compile). fp32 dots run on FMA units, with the whole product tile in
    registers, so fp32 gets smaller head tiles and more warps."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    wide = dtype == torch.float32
    if block_d <= 64:
        head_cap, block_n = (32 if wide else 64), 64
    elif block_d <= 128:
        head_cap, block_n = (16, 32) if wide else (32, 64)
    else:
        head_cap, block_n = 16, 32
    # tl.dot needs M >= 16; a group larger than the cap is spread over several programs (head chunks),
    # each of which reads the group's K/V again.
    block_g = min(max(16, triton.next_power_of_2(group)), head_cap)
    num_warps = 8 if wide or block_d > 128 else 4
    return block_g, block_n, block_d, num_warps


def prefix_decode_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                      softmax_scale, num_splits=None):
    """Attention output of one new query per row over ``[prefix ; k]``, split over the key range.

    Arguments (canonical form, validated by ``fastpeft.ops.prefix_attention``):
        q: ``[B, Hq, 1, D]``; k, v: ``[B, Hkv, S, D]``; prefix_k, prefix_v: ``[T, Hkv, P, D]``;
        prefix_index: ``[B]`` int32; prefix_lengths: ``[T]`` int32; key_padding_mask: ``[B, S]`` bool or None;
        causal: accepted for the common signature; with ``L == 1`` the query sits at position ``S - 1`` and
        sees every key either way; softmax_scale: float.
        num_splits: force the number of key-range splits (tests); default: chosen to fill the GPU.

    Returns ``[B, Hq, 1, D]`` in q's dtype; a query that sees no key gets zeros. Accumulation is float32.
    """
    B, Hq, L, D = q.shape
    if L != 1:
        raise ValueError(f"prefix_decode_fwd takes one query per row (L == 1), got L={L}")
    Hkv, S = k.shape[1], k.shape[2]
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    group = Hq // Hkv
    out = torch.empty_like(q)
    if B == 0 or Hq == 0:
        return out

    block_g, block_n, block_d, num_warps = _launch_config(group, D, q.dtype)
    head_chunks = triton.cdiv(group, block_g)
    programs_per_split = B * Hkv * head_chunks
    if num_splits is None:
        num_splits = choose_num_splits(q.device, programs_per_split, P + S, block_n)
    elif num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    # Chunks are whole tiles; recomputing the count drops splits that would start past every row's end.
    chunk_len = triton.cdiv(triton.cdiv(P + S, num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(P + S, chunk_len))

    single_split = num_splits == 1
    if single_split:
        part_m = part_l = part_acc = out  # unused by the kernel in this mode
    else:
        part_m = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
    # The kernel reads these with unit stride; they are tiny, so a copy of a strided view costs nothing.
    prefix_index, prefix_lengths = prefix_index.contiguous(), prefix_lengths.contiguous()
    has_mask = key_padding_mask is not None
    mask = key_padding_mask.view(torch.uint8) if has_mask else prefix_index  # placeholder pointer when absent
    mask_strides = (key_padding_mask.stride(0), key_padding_mask.stride(1)) if has_mask else (0, 0)
    dot_in_fp32 = q.dtype == torch.float32 or INTERPRETED

    _prefix_decode_split_kernel[(programs_per_split, num_splits)](
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask,
        out, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2), prefix_k.stride(3),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2), prefix_v.stride(3),
        *mask_strides,
        out.stride(0), out.stride(1), out.stride(3),
        Hq, Hkv, S, P, T, D, chunk_len, softmax_scale * _LOG2E,
        GROUP=group, HEAD_CHUNKS=head_chunks,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_MASK=has_mask, SINGLE_SPLIT=single_split, DOT_IN_FP32=dot_in_fp32,
        num_warps=num_warps,
    )
    if not single_split:
        _prefix_decode_combine_kernel[(B * Hq,)](
            part_m, part_l, part_acc, out,
            out.stride(0), out.stride(1), out.stride(3),
            Hq, D, num_splits,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits), SPLIT_TILE=_COMBINE_SPLIT_TILE, BLOCK_D=block_d,
            num_warps=4,
        )
    return out

