"""The serving engine's KV memory: a pool of fixed-size blocks, and a block table per request (vLLM's paged KV cache,
with fastpeft's prefix tables beside it).

Storage. Per layer one key and one value tensor, allocated once (from a count of blocks, or from a byte or token
budget: ``KVBlockPool.from_budget``), stored ``[num_blocks, block_size, Hkv, D]`` (FlashAttention's and vLLM v1's
layout: a token's heads side by side, so a token is written in one piece and whole blocks gather as contiguous memory)
and handed out as ``[num_blocks, Hkv, block_size, D]`` views (``key_caches``/``value_caches``), the layout
``fastpeft.ops.paged_prefix_decode`` takes. A block holds ``block_size`` consecutive tokens of one request in every
layer; a request's ``BlockTable`` lists its blocks in token order, so its token ``j`` lives in
block ``blocks[j // block_size]`` at offset ``j % block_size`` (``fastpeft.ops.paged_prefix_decode`` reads it so). The
pool holds only the requests' own tokens: an adapter's prefix K/V stays in the ``AdapterBank``'s tables, read through
``prefix_index``, never copied into a request's blocks.

Allocation. Free blocks sit on a free list; ``append`` gives a table room for more tokens and ``free`` returns its
blocks. A block's reference count is the number of tables holding it: ``fork`` makes a table that shares all of another
table's blocks (the prompt of ``n > 1`` continuations, prefilled once). Tokens are only ever written past a table's
``num_tokens``, so shared full blocks are never written; a shared last block that is only partly filled is copied
before the first write (copy-on-write: the appending table gets a private copy of its filled slots, the others keep
the original). Allocation never evicts: a request that cannot get its blocks gets ``KVPoolExhausted`` with nothing
changed, and the engine makes it wait until running requests free theirs.

A freed block is not zeroed: no reader reaches a slot past a row's tokens (the decode kernels never load one; the
paths that gather zero those slots), so what a former owner left there is never seen.

Not thread-safe: the engine thread owns the pool; ``blocks_in_use`` / ``bytes_in_use`` are plain reads for metrics.
"""

import torch


class KVPoolExhausted(Exception):
    """Not enough free blocks for an allocation; the pool and the table are unchanged (the request waits)."""

    def __init__(self, needed, free):
        super().__init__(f"the KV pool has {free} free blocks, the allocation needs {needed}")
        self.needed, self.free = needed, free


class BlockTable:
    """One request's blocks in token order (``blocks``) and the number of its tokens they hold (``num_tokens``): the
    tokens whose K/V are written, or are being written by the forward that the last ``append`` made room for."""

    __slots__ = ("blocks", "num_tokens")

    def __init__(self):
        self.blocks = []
        self.num_tokens = 0

    def __repr__(self):
        return f"BlockTable(blocks={self.blocks}, num_tokens={self.num_tokens})"


class KVBlockPool:
    """Fixed-size KV blocks for ``num_layers`` layers of ``num_kv_heads`` heads of size ``head_dim``.

    Arguments:
        num_layers, num_kv_heads, head_dim: the model's KV geometry (``AdapterBank.geometry``).
        block_size: tokens per block (16 is vLLM's default: small enough that a request's last, partly filled
            block wastes little, large enough that block tables stay short).
        num_blocks: blocks in the pool (every layer has this many).
        device, dtype: where the storage lives and its dtype (the model's).
    """

    def __init__(self, num_layers, num_kv_heads, head_dim, block_size, num_blocks, device=None,
                 dtype=torch.float32):
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("block_size", block_size), ("num_blocks", num_blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_caches = [torch.zeros(shape, device=device, dtype=dtype).transpose(1, 2) for _ in range(num_layers)]
        self.value_caches = [torch.zeros(shape, device=device, dtype=dtype).transpose(1, 2)
                             for _ in range(num_layers)]
        self.block_size, self.num_blocks = block_size, num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))   # popped from the end: the lowest block first
        self._ref_counts = [0] * num_blocks

    @classmethod
    def from_budget(cls, num_layers, num_kv_heads, head_dim, block_size, budget_bytes=None, budget_tokens=None,
                    device=None, dtype=torch.float32):
        """A pool of as many blocks as ``budget_bytes`` holds (keys and values of every layer), or of enough blocks
        for ``budget_tokens`` tokens (rounded up to whole blocks); exactly one of the two. ValueError when the budget
        does not hold one block."""
        if (budget_bytes is None) == (budget_tokens is None):
            raise ValueError("give exactly one of budget_bytes and budget_tokens")
        if budget_bytes is not None:
            element = torch.empty((), dtype=dtype).element_size()
            per_block = 2 * num_layers * num_kv_heads * block_size * head_dim * element
            num_blocks = int(budget_bytes) // per_block
            what = f"budget_bytes={budget_bytes} (one block of {block_size} tokens takes {per_block} bytes)"
        else:
            num_blocks = -(-int(budget_tokens) // block_size)
            what = f"budget_tokens={budget_tokens}"
        if num_blocks < 1:
            raise ValueError(f"{what} holds no block")
        return cls(num_layers, num_kv_heads, head_dim, block_size, num_blocks, device=device, dtype=dtype)

    # ----- sizes and metrics -------------------------------------------------------------------------------------

    @property
    def bytes_per_block(self):
        """Bytes one block takes: keys and values of every layer."""
        return sum(cache[0].numel() * cache.element_size() for cache in self.key_caches + self.value_caches)

    @property
    def nbytes(self):
        """Bytes of the whole pool (allocated once)."""
        return self.num_blocks * self.bytes_per_block

    @property
    def num_free_blocks(self):
        return len(self._free)

    @property
    def blocks_in_use(self):
        return self.num_blocks - len(self._free)

    @property
    def bytes_in_use(self):
        return self.blocks_in_use * self.bytes_per_block

    def ref_count(self, block):
        """How many tables hold ``block``."""
        return self._ref_counts[block]

    # ----- allocation --------------------------------------------------------------------------------------------

    def blocks_needed(self, table, num_new_tokens):
        """Free blocks ``append(table, num_new_tokens)`` takes: the new blocks, plus one for the copy of a shared,
        partly filled last block."""
        self._check_count(num_new_tokens)
        total = -(-(table.num_tokens + num_new_tokens) // self.block_size)
        return total - len(table.blocks) + int(num_new_tokens > 0 and self._last_block_is_shared_and_partial(table))

    def can_append(self, table, num_new_tokens):
        return self.blocks_needed(table, num_new_tokens) <= len(self._free)

    def append(self, table, num_new_tokens):
        """Make room in ``table`` for ``num_new_tokens`` more tokens, then count them in ``table.num_tokens`` (the
        caller's next forward writes their K/V). All or nothing: ``KVPoolExhausted`` leaves the pool and the table as
        they were."""
        needed = self.blocks_needed(table, num_new_tokens)
        if needed > len(self._free):
            raise KVPoolExhausted(needed, len(self._free))
        if num_new_tokens and self._last_block_is_shared_and_partial(table):
            self._copy_last_block(table)
            needed -= 1
        for _ in range(needed):
            table.blocks.append(self._take())
        table.num_tokens += num_new_tokens

    def fork(self, table):
        """A new table holding ``table``'s tokens, sharing all of its blocks (no copy; their reference counts grow).
        The first of them to write into a shared, partly filled last block gets its own copy first."""
        child = BlockTable()
        child.blocks, child.num_tokens = list(table.blocks), table.num_tokens
        for block in child.blocks:
            self._ref_counts[block] += 1
        return child

    def free(self, table):
        """Give ``table``'s blocks back (a block shared with other tables stays theirs) and empty it."""
        for block in table.blocks:
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
        table.blocks, table.num_tokens = [], 0

    def _take(self):
        block = self._free.pop()
        self._ref_counts[block] = 1
        return block

    def _last_block_is_shared_and_partial(self, table):
        return (table.num_tokens % self.block_size != 0 and table.blocks
                and self._ref_counts[table.blocks[-1]] > 1)

    def _copy_last_block(self, table):
        """Copy-on-write: ``table``'s last block, shared and partly filled, becomes a private copy of its filled
        slots in every layer."""
        shared, private = table.blocks[-1], self._take()
        filled = table.num_tokens % self.block_size
        with torch.no_grad():
            for cache in self.key_caches + self.value_caches:
                cache[private, :, :filled] = cache[shared, :, :filled]
        self._ref_counts[shared] -= 1
        table.blocks[-1] = private

    def _check_count(self, num_new_tokens):
        if not isinstance(num_new_tokens, int) or isinstance(num_new_tokens, bool) or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be a non-negative integer, got {num_new_tokens!r}")

    # ----- a forward's view ----------------------------------------------------------------------------------------

    def block_table_tensor(self, tables, device=None):
        """``[len(tables), max_blocks]`` int32: the tables' blocks, rows padded with -1 (never read) to the longest
        (at least one column)."""
        width = max([len(table.blocks) for table in tables] + [1])
        rows = [table.blocks + [-1] * (width - len(table.blocks)) for table in tables]
        return torch.tensor(rows, dtype=torch.int32).to(device if device is not None else self.key_caches[0].device)

    def step_cache(self, tables, num_new_tokens, gather_decode=False, model_mask_redundant=False):
        """The transformers ``Cache`` for one forward whose row ``b`` feeds ``num_new_tokens[b]`` (>= 1) tokens
        that ``append`` already made room for in ``tables[b]``: every layer writes them into the pool, and attention
        reads each row's earlier tokens through its block table (``fastpeft.integration.paged_cache``; with
        ``gather_decode`` a decode step's keys are gathered, as a prefill chunk's; ``model_mask_redundant``: see
        ``PagedKVCache``)."""
        from ..integration.paged_cache import PagedKVCache

        if len(tables) != len(num_new_tokens) or not tables:
            raise ValueError(f"one count of new tokens per table, and at least one table; got {len(tables)} tables "
                             f"and {len(num_new_tokens)} counts")
        for b, (table, count) in enumerate(zip(tables, num_new_tokens)):
            if not 1 <= count <= table.num_tokens:
                raise ValueError(f"row {b} feeds {count} new tokens but its table holds {table.num_tokens}: "
                                 "append them to the table first (and feed at least one)")
        return PagedKVCache(self.key_caches, self.value_caches, self.block_table_tensor(tables),
                            [table.num_tokens - count for table, count in zip(tables, num_new_tokens)],
                            list(num_new_tokens), gather_decode=gather_decode,
                            model_mask_redundant=model_mask_redundant)
