"""The launchers of the split-KV ("flash-decoding") Triton kernels (``fastpeft.kernels.decode``) for one new query
per row (L == 1), inference only: ``prefix_decode_fwd`` over dense K/V, ``paged_prefix_decode_fwd`` over a paged KV
cache read through block tables (the same kernels; only where a key is loaded from differs).

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
lookup, the dots and the reductions are ``common``'s helpers (shared with the training kernels), which keep
the interpreter working even when triton was imported before ``TRITON_INTERPRET=1`` was set.
"""

import functools

import torch
import triton

from .common import INTERPRETING, LOG2E_HOST
from .decode import _prefix_decode_combine_kernel, _prefix_decode_split_kernel

# Programs per SM the split heuristic aims for: a few waves hide the tail of unequal splits.
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 128
# Splits whose accumulators the combine kernel sums per step.
COMBINE_SPLIT_TILE = 16
# Under the interpreter every program runs serially on the CPU: keep the split count small and fixed.
_INTERPRETER_SPLITS = 2


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(device, programs_per_split, max_keys, block_n):
    """Splits of the key range so that ``programs_per_split * num_splits`` fills ~4 waves of the SMs.

    ``max_keys = P + S`` bounds every row's key count; no split is shorter than one ``block_n`` tile.
    Under ``TRITON_INTERPRET=1`` (CPU) a small fixed count keeps the serial interpreter fast.
    """
    tiles = max(1, triton.cdiv(max_keys, block_n))
    if INTERPRETING or device.type != "cuda":
        return min(_INTERPRETER_SPLITS, tiles)
    target_programs = _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None
                                                   else torch.cuda.current_device())
    return max(1, min(triton.cdiv(target_programs, max(1, programs_per_split)), tiles, _MAX_SPLITS))


def launch_config(group, head_dim, dtype):
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
    if q.shape[2] != 1:
        raise ValueError(f"prefix_decode_fwd takes one query per row (L == 1), got L={q.shape[2]}")
    mask = None
    if key_padding_mask is not None:
        mask = (key_padding_mask.view(torch.uint8), key_padding_mask.stride(0), key_padding_mask.stride(1))
    return _launch(q, k, v, k.shape[2], prefix_k, prefix_v, prefix_index, prefix_lengths, softmax_scale, num_splits,
                   mask=mask)


def paged_prefix_decode_fwd(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index,
                            prefix_lengths, softmax_scale, num_splits=None):
    """``prefix_decode_fwd`` with the rows' own keys read from a paged cache through their block tables.

    Arguments (canonical form, validated by ``fastpeft.ops.paged_prefix_decode``): q ``[B, Hq, 1, D]``;
    key_cache, value_cache ``[num_blocks, Hkv, block_size, D]`` (any strides); block_table ``[B, max_blocks]`` int32
    (row ``b``'s key ``j`` in block ``block_table[b, j // block_size]``, offset ``j % block_size``); seq_lens ``[B]``
    int32, each row's number of keys; the prefix table, its index and lengths; softmax_scale; num_splits as above.
    The split heuristic bounds every row by ``max_blocks * block_size`` keys (no host read of seq_lens); splits past
    a short row's end are empty.
    """
    if q.shape[2] != 1:
        raise ValueError(f"paged_prefix_decode_fwd takes one query per row (L == 1), got L={q.shape[2]}")
    block_size = key_cache.shape[2]
    # The kernel indexes these with unit stride in their last axis; they are small, so a copy costs nothing.
    paged = (block_table.contiguous(), seq_lens.contiguous(), block_size, key_cache.shape[0])
    return _launch(q, key_cache, value_cache, block_table.shape[1] * block_size, prefix_k, prefix_v, prefix_index,
                   prefix_lengths, softmax_scale, num_splits, paged=paged)


def _launch(q, k, v, max_keys_per_row, prefix_k, prefix_v, prefix_index, prefix_lengths, softmax_scale, num_splits,
            mask=None, paged=None):
    """The split and combine kernels for dense K/V (``mask``: ``(uint8 view, stride_b, stride_s)`` of a key padding
    mask, or None) or a paged cache (``paged``: ``(block_table, seq_lens, block_size, num_blocks)``)."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    S = max_keys_per_row
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    group = Hq // Hkv
    out = torch.empty_like(q)
    if B == 0 or Hq == 0:
        return out

    block_g, block_n, block_d, num_warps = launch_config(group, D, q.dtype)
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
    # Absent inputs get a placeholder pointer (prefix_index), never read: HAS_MASK / PAGED are off.
    mask_ptr, *mask_strides = mask if mask is not None else (prefix_index, 0, 0)
    block_table, seq_lens, block_size, num_blocks = paged if paged is not None else (prefix_index, prefix_index, 1, 1)
    bt_strides = (block_table.stride(0), block_table.stride(1)) if paged is not None else (0, 0)
    dot_in_fp32 = q.dtype == torch.float32 or INTERPRETING

    _prefix_decode_split_kernel[(programs_per_split, num_splits)](
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask_ptr,
        block_table, seq_lens,
        out, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        prefix_k.stride(0), prefix_k.stride(1), prefix_k.stride(2), prefix_k.stride(3),
        prefix_v.stride(0), prefix_v.stride(1), prefix_v.stride(2), prefix_v.stride(3),
        *mask_strides,
        *bt_strides,
        out.stride(0), out.stride(1), out.stride(3),
        Hq, Hkv, S, P, T, D, num_blocks, chunk_len, softmax_scale * LOG2E_HOST,
        GROUP=group, HEAD_CHUNKS=head_chunks,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_MASK=mask is not None, SINGLE_SPLIT=single_split, DOT_IN_FP32=dot_in_fp32,
        PAGED=paged is not None, KV_BLOCK_SIZE=block_size,
        num_warps=num_warps,
    )
    if not single_split:
        _prefix_decode_combine_kernel[(B * Hq,)](
            part_m, part_l, part_acc, out,
            out.stride(0), out.stride(1), out.stride(3),
            Hq, D, num_splits,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits), SPLIT_TILE=COMBINE_SPLIT_TILE, BLOCK_D=block_d,
            num_warps=4,
        )
    return out
