"""Reading a paged KV cache through a block table: the rule, once, for every path that gathers (the sdpa and reference
backends' paged decode, the chunked prefill of ``fastpeft.integration.paged_cache``). The Triton and CUDA kernels apply
the same rule inside their loops, without gathering.

A layer's cache is ``[num_blocks, Hkv, block_size, D]`` (keys and values alike); row ``b``'s token ``j`` lives in block
``block_table[b, j // block_size]`` at offset ``j % block_size``. Entries of a row's block table past its last token
are never read; they may hold anything."""

from typing import NamedTuple

import torch


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
    zeros in its empty ones (so stale K/V a block holds past a row's tokens, even non-finite values, never reaches an
    attention's arithmetic)."""
    rows = cache.transpose(1, 2)[plan.blocks, plan.offsets]   # [B, width, Hkv, D]
    return rows.masked_fill(~plan.valid[:, :, None, None], 0).transpose(1, 2)
