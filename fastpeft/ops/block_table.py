"""Reading a paged KV cache through a block table: the rule, once, for every path that gathers (the sdpa and reference
backends' paged decode, the chunked prefill of ``fastpeft.integration.paged_cache``). The Triton and CUDA kernels apply
the same rule inside their loops, without gathering.

A layer's cache is ``[num_blocks, Hkv, block_size, D]`` (keys and values alike, any strides); row ``b``'s token ``j``
lives in block ``block_table[b, j // block_size]`` at offset ``j % block_size``. Entries of a row's block table past its
last token, and the slots of its last block past its last token, are never read into the result: they may hold
anything, NaN included (a cache allocated with ``torch.empty``), as for the kernels, which never load them.

Two granularities of the one rule: ``gather_rows`` copies whole blocks (decode: every row's tokens from column 0, one
``index_select`` of contiguous memory when the cache is stored ``[num_blocks, block_size, Hkv, D]``, as
``fastpeft.serve.kv_pool`` stores it); ``plan_gather``/``gather`` place each token in any column (the right-aligned
context of a chunked prefill)."""

from typing import NamedTuple

import torch


def _zero_outside(rows, valid):
    """Zero ``rows [B, width, Hkv, D]`` where ``valid [B, width]`` is False, in place. By a bit mask on the
    values' bits: a NaN there becomes 0 too (a multiplication would keep it), and on CPU it runs at the speed of a
    multiplication (``masked_fill``/``where`` with a broadcast mask are ~10x slower there)."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
    keep = -valid.to(bits)   # all ones where valid, all zeros elsewhere
    rows.view(bits).bitwise_and_(keep[:, :, None, None].expand(rows.shape))


def gather_rows(cache, block_table, lengths):
    """``([B, Hkv, max_blocks * block_size, D], valid [B, max_blocks * block_size])``: every row's blocks in table
    order, so its ``lengths[b]`` tokens sit in columns ``0 .. lengths[b]-1``; zeros elsewhere (``valid`` False).
    ``block_table [B, max_blocks]`` integer; its entries are clamped into the cache, so nothing out of bounds is read
    even from unchecked values."""
    num_blocks, Hkv, block_size, D = cache.shape
    B, max_blocks = block_table.shape
    blocks = block_table.reshape(-1).to(torch.int64).clamp(0, num_blocks - 1)
    rows = cache.transpose(1, 2).index_select(0, blocks).view(B, max_blocks * block_size, Hkv, D)
    valid = torch.arange(max_blocks * block_size, device=cache.device)[None, :] < lengths[:, None]
    _zero_outside(rows, valid)
    return rows.transpose(1, 2), valid


class GatherPlan(NamedTuple):
    """Where each column of a gathered ``[B, Hkv, width, D]`` reads its token (``plan_gather``)."""
    blocks: torch.Tensor    # [B, width] int64: the column's block (clamped into the cache where the column is empty)
    offsets: torch.Tensor   # [B, width] int64: its offset in the block
    valid: torch.Tensor     # [B, width] bool: the column holds one of the row's tokens


def plan_gather(block_table, lengths, width, block_size, num_blocks, right_aligned=False):
    """The columns of ``width`` per row that hold the row's ``lengths[b]`` tokens, in order: columns ``0 ..
    lengths[b]-1`` (left-aligned), or the last ``lengths[b]`` columns (``right_aligned``: the empty columns in front,
    as a context that the new tokens of a chunked prefill follow). ``block_table [B, max_blocks]`` integer, ``lengths
    [B]`` integer at most ``max_blocks * block_size``. Indices that would leave the cache (empty columns, and unchecked
    values) are clamped into it: nothing is read out of bounds."""
    B, max_blocks = block_table.shape
    columns = torch.arange(width, device=block_table.device)[None, :]
    lengths = lengths.to(torch.int64)[:, None]
    tokens = columns - (width - lengths) if right_aligned else columns.expand(B, width)
    valid = (tokens >= 0) & (tokens < lengths)
    tokens = tokens.clamp(0, max_blocks * block_size - 1)
    blocks = block_table.to(torch.int64).gather(1, tokens // block_size).clamp(0, num_blocks - 1)
    return GatherPlan(blocks, tokens % block_size, valid)


def gather(cache, plan):
    """``[B, Hkv, width, D]``: the rows' tokens of ``cache [num_blocks, Hkv, block_size, D]`` in the plan's columns,
    zeros in its empty ones."""
    rows = cache.transpose(1, 2)[plan.blocks, plan.offsets]   # [B, width, Hkv, D]
    _zero_outside(rows, plan.valid)
    return rows.transpose(1, 2)
