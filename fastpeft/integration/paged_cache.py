"""A transformers ``Cache`` over a paged KV pool, for one forward of a batch whose rows each feed new tokens after
tokens already in the pool (the serving engine's decode steps and chunked prefill).

The pool is one key and one value tensor ``[num_blocks, Hkv, block_size, D]`` per layer (``fastpeft.serve.kv_pool``);
row ``b`` holds ``context_lens[b]`` tokens in the blocks its block table lists and feeds ``query_lens[b]`` new ones,
whose slots follow (the pool made room for them before the forward). Every layer's ``update`` writes the row's real
new keys and values into those slots. What attention then reads:

* a decode step (every row feeds one token): nothing is gathered. ``update`` hands attention the new token's states
  only, and fastpeft's attention function, finding this cache under ``PAGED_KWARG`` (``compat.cache_kwargs`` passes
  it there besides the cache keyword), reads each row's prefix entry and its ``context + 1`` tokens through the block
  table with ``fastpeft.ops.paged_prefix_decode``. ``check_consumed`` after the forward verifies that every layer did
  (any other attention would see the new token alone);
* a prefill chunk (rows feed up to ``L`` tokens): ``update`` gathers each row's earlier tokens, right-aligned in
  ``max_context`` columns, and appends the chunk (right-padded to ``L``): ``[B, Hkv, max_context + L, D]``. Query
  ``i`` then sits at column ``max_context + i``, exactly where bottom-right causal alignment puts it, so any attention
  over these keys with ``attention_mask()`` (1 for a row's context and real chunk columns) is right, fastpeft's or
  transformers' own.

Positions are the caller's (``positions`` gives each token's index in its row; a prefix adds its length, as the
bank's rows do); ``get_seq_length`` is ``max_context``, so masks built by the model cover ``max_context + L`` keys.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..ops.block_table import gather, plan_gather
from .attention import PAGED_KWARG


class PagedKVCache(Cache):
    """One forward's view of a paged pool.

    Arguments:
        key_caches, value_caches: one ``[num_blocks, Hkv, block_size, D]`` tensor per layer.
        block_table: ``[B, max_blocks]`` int32 on the pool's device; row ``b``'s blocks in token order, covering its
            ``context_lens[b] + query_lens[b]`` tokens (entries past them are never read).
        context_lens: ``B`` ints, the row's tokens already in the pool.
        query_lens: ``B`` ints >= 1, the row's new tokens in this forward (its ``input_ids`` row holds them first,
            then padding up to ``max(query_lens)``).
    """

    def __init__(self, key_caches, value_caches, block_table, context_lens, query_lens):
        if not key_caches or len(key_caches) != len(value_caches):
            raise ValueError("key_caches and value_caches must hold one tensor per layer")
        if not len(context_lens) == len(query_lens) == block_table.shape[0] > 0:
            raise ValueError(f"context_lens and query_lens must have one entry per block_table row "
                             f"({block_table.shape[0]}, at least one), got {len(context_lens)} and {len(query_lens)}")
        if min(query_lens) < 1 or min(context_lens) < 0:
            raise ValueError("every row feeds at least one token (query_lens >= 1) after context_lens >= 0 tokens")
        num_blocks, _, block_size, _ = key_caches[0].shape
        if max(c + n for c, n in zip(context_lens, query_lens)) > block_table.shape[1] * block_size:
            raise ValueError(f"a row's tokens exceed its block table's {block_table.shape[1]} blocks of {block_size}")
        self.key_caches, self.value_caches = list(key_caches), list(value_caches)
        self.block_table = block_table
        device = block_table.device
        self.context_lens, self.query_lens = list(context_lens), list(query_lens)
        self.max_context, self.width = max(context_lens), max(query_lens)
        self.decode = self.width == 1
        seq_lens = [c + n for c, n in zip(context_lens, query_lens)]
        self.max_seq_len = max(seq_lens)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        # Where the step's real new tokens go, computed once for every layer: row b's token i lands in the slot of
        # its token context_lens[b] + i.
        rows = [b for b, n in enumerate(query_lens) for _ in range(n)]
        columns = [i for n in query_lens for i in range(n)]
        tokens = torch.tensor([context_lens[b] + i for b, i in zip(rows, columns)], device=device)
        self._rows = torch.tensor(rows, device=device)
        self._columns = torch.tensor(columns, device=device)
        self._write_blocks = block_table[self._rows, tokens // block_size].long()
        self._write_offsets = tokens % block_size
        self._context = None
        if not self.decode and self.max_context > 0:
            context = torch.tensor(context_lens, device=device)
            self._context = plan_gather(block_table, context, self.max_context, block_size, num_blocks,
                                        right_aligned=True)
        self.read_layers = set()
        super().__init__(layers=[_PagedLayer(self, i) for i in range(len(self.key_caches))])

    # ----- what the caller passes the model ------------------------------------------------------------------------

    @property
    def fastpeft_attention_kwargs(self):
        """What ``compat.cache_kwargs`` passes a model besides this cache: the cache again under ``PAGED_KWARG``, for
        fastpeft's attention function, which reads a decode step's keys through the block table."""
        return {PAGED_KWARG: self}

    def attention_mask(self):
        """``[B, max_context + L]`` long (1 = a key the row sees: its context, right-aligned, and its real new tokens),
        or None for a decode step, whose rows' keys are read through the block table and need no mask."""
        if self.decode:
            return None
        B, device = len(self.query_lens), self.block_table.device
        columns = torch.arange(self.max_context + self.width, device=device)[None, :]
        context = torch.tensor(self.context_lens, device=device)[:, None]
        queries = torch.tensor(self.query_lens, device=device)[:, None]
        in_context = (columns < self.max_context) & (columns >= self.max_context - context)
        in_chunk = (columns >= self.max_context) & (columns < self.max_context + queries)
        return (in_context | in_chunk).long().reshape(B, -1)

    def positions(self):
        """``[B, L]`` long: each new token's index in its row (``context_lens[b] + i``); padding gets 0 (its outputs
        are unused and its keys masked, it only needs a valid position)."""
        device = self.block_table.device
        steps = torch.arange(self.width, device=device)[None, :]
        context = torch.tensor(self.context_lens, device=device)[:, None]
        real = steps < torch.tensor(self.query_lens, device=device)[:, None]
        return torch.where(real, context + steps, torch.zeros_like(steps))

    # ----- what the layers and the attention function use ----------------------------------------------------------

    def layer_storage(self, layer_idx):
        """``(key_cache, value_cache)`` of layer ``layer_idx``, for the attention function's read through the block
        table; recorded for ``check_consumed``."""
        if layer_idx is None or not 0 <= layer_idx < len(self.key_caches):
            raise ValueError(f"the attention module's layer_idx={layer_idx} has no layer in this paged cache "
                             f"({len(self.key_caches)} layers)")
        self.read_layers.add(layer_idx)
        return self.key_caches[layer_idx], self.value_caches[layer_idx]

    def check_consumed(self, model_name):
        """After a decode forward: raise ValueError unless every layer's attention read its keys through the block
        table (an attention that does not take fastpeft's ``PAGED_KWARG`` would have seen the new token alone). A
        prefill forward hands every attention the gathered keys: nothing to check."""
        if not self.decode:
            return
        missing = sorted(set(range(len(self.key_caches))) - self.read_layers)
        self.read_layers.clear()
        if missing:
            raise ValueError(f"the attention of {model_name}'s layers {missing} did not read the paged KV cache "
                             f"(fastpeft's attention with the {PAGED_KWARG} keyword does): their outputs saw the new "
                             "token alone")

    def _write(self, layer_idx, key_states, value_states):
        for cache, states in ((self.key_caches[layer_idx], key_states), (self.value_caches[layer_idx], value_states)):
            cache[self._write_blocks, :, self._write_offsets] = states[self._rows, :, self._columns].to(cache.dtype)

    def _keys_and_values(self, layer_idx, key_states, value_states):
        """What a prefill chunk's attention reads: each row's gathered context, right-aligned, then its chunk."""
        if self._context is None:
            return key_states, value_states
        keys = gather(self.key_caches[layer_idx], self._context).to(key_states.dtype)
        values = gather(self.value_caches[layer_idx], self._context).to(value_states.dtype)
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)


class _PagedLayer(DynamicLayer):
    """One layer of a ``PagedKVCache``: writes the new tokens into the pool and hands attention its keys."""

    def __init__(self, step, layer_idx):
        super().__init__()
        self.step, self.layer_idx = step, layer_idx
        storage = step.key_caches[layer_idx]
        self.dtype, self.device = storage.dtype, storage.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        step = self.step
        if key_states.shape[0] != len(step.query_lens) or key_states.shape[2] != step.width:
            raise ValueError(f"the paged cache was built for {len(step.query_lens)} rows of {step.width} new tokens, "
                             f"the layer fed {tuple(key_states.shape[::2])}")
        step._write(self.layer_idx, key_states, value_states)
        if step.decode:   # attention reads the pool through the block table
            return key_states, value_states
        return step._keys_and_values(self.layer_idx, key_states, value_states)

    def get_seq_length(self):
        return self.step.max_context

    def get_mask_sizes(self, query_length):
        return self.step.max_context + query_length, 0

    def get_max_length(self):
        return -1
