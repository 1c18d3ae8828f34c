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
``gather_decode=True`` makes a decode step gather like a prefill chunk: for a model whose attention adds a position
bias the paged op does not (T5's relative bias; right-aligned keys keep every row's distances exact).
``model_mask_redundant=True``: the caller passes the model no mask for a decode step, so a mask that reaches attention
was built by the model itself from nothing (BART's decoder makes one of ones) and says nothing the block table does
not: the paged read ignores it rather than refusing it (fastpeft's mask function hands one over on accelerators).

Encoder-decoders (``EncoderDecoderPagedCache``). The decoder's self-attention is a ``PagedKVCache``; its
cross-attention K/V live in the same pool, in blocks listed by a block table of their own per request
(``PagedCrossAttentionCache``): computed once, by the request's first decoder step (``writing``: each layer writes
the row's encoder positions into its blocks and attends over the keys it computed, with the encoder's mask), then read
by every decode step through ``fastpeft.ops.paged_prefix_decode`` with no prefix (the layer hands the model an empty
placeholder, so nothing is recomputed from the encoder's output, and attention reads the row's ``lengths[b]``
positions from the pool). An adapter's prefix never enters the cross-attention (PEFT gives it none).
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer, EncoderDecoderCache

from ..ops.block_table import gather, plan_gather
from .attention import PAGED_KWARG, is_decoder_self_attention


class PagedKVCache(Cache):
    """One forward's view of a paged pool.

    Arguments:
        key_caches, value_caches: one ``[num_blocks, Hkv, block_size, D]`` tensor per layer.
        block_table: ``[B, max_blocks]`` int32 on the pool's device; row ``b``'s blocks in token order, covering its
            ``context_lens[b] + query_lens[b]`` tokens (entries past them are never read).
        context_lens: ``B`` ints, the row's tokens already in the pool.
        query_lens: ``B`` ints >= 1, the row's new tokens in this forward (its ``input_ids`` row holds them first,
            then padding up to ``max(query_lens)``).
        gather_decode: a decode step (every row feeds one token) hands attention the gathered keys, as a prefill
            chunk does, instead of having it read them through the block table.
        model_mask_redundant: a decode step's attention ignores a mask the model built itself (see above).
    """

    def __init__(self, key_caches, value_caches, block_table, context_lens, query_lens, gather_decode=False,
                 model_mask_redundant=False):
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
        self.decode = self.width == 1 and not gather_decode
        self.model_mask_redundant = model_mask_redundant
        seq_lens = [c + n for c, n in zip(context_lens, query_lens)]
        self.max_seq_len = max(seq_lens)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        self.context_lens_tensor = torch.tensor(context_lens, dtype=torch.long, device=device)
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


class PagedCrossAttentionCache(Cache):
    """The cross-attention half of one encoder-decoder forward over a paged pool: row ``b``'s encoder positions
    ``0 .. lengths[b] - 1`` (its virtual tokens then its input, packed to the left:
    ``EncoderDecoderAdapterBank.encode``'s layout, so they need no mask) in the blocks of its cross-attention block
    table.

    Arguments:
        key_caches, value_caches: the pool's, one ``[num_blocks, Hkv, block_size, D]`` tensor per decoder layer.
        block_table: ``[B, max_blocks]`` int32, the rows' cross-attention blocks, covering ``lengths[b]`` positions.
        lengths: ``B`` ints >= 1, each row's encoder positions.
        writing: the rows' first decoder step: every layer computes the K/V from the encoder's output, writes row
            ``b``'s first ``lengths[b]`` positions into its blocks and attends over what it computed (with the
            encoder's mask). Otherwise a decode step: every layer hands the model an empty placeholder (the model skips
            its K/V projections of the encoder's output) and fastpeft's attention reads the blocks.
    """

    def __init__(self, key_caches, value_caches, block_table, lengths, writing):
        if not key_caches or len(key_caches) != len(value_caches):
            raise ValueError("key_caches and value_caches must hold one tensor per layer")
        if len(lengths) != block_table.shape[0] or not lengths or min(lengths) < 1:
            raise ValueError(f"lengths must hold one length >= 1 per block_table row ({block_table.shape[0]}), got "
                             f"{list(lengths)}")
        _, _, block_size, _ = key_caches[0].shape
        if max(lengths) > block_table.shape[1] * block_size:
            raise ValueError(f"a row's encoder positions exceed its block table's {block_table.shape[1]} blocks of "
                             f"{block_size}")
        self.key_caches, self.value_caches = list(key_caches), list(value_caches)
        self.block_table, self.lengths, self.writing = block_table, list(lengths), writing
        device = block_table.device
        self.decode = not writing   # what fastpeft's attention function asks of a paged view
        self.max_seq_len = max(lengths)
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
        if writing:
            rows = [b for b, n in enumerate(lengths) for _ in range(n)]
            columns = [j for n in lengths for j in range(n)]
            self._rows = torch.tensor(rows, device=device)
            self._columns = torch.tensor(columns, device=device)
            positions = self._columns
            self._write_blocks = block_table[self._rows, positions // block_size].long()
            self._write_offsets = positions % block_size
        self.read_layers = set()
        super().__init__(layers=[_PagedCrossLayer(self, i) for i in range(len(self.key_caches))])

    def layer_storage(self, layer_idx):
        """``(key_cache, value_cache)`` of layer ``layer_idx`` for the attention function's read; recorded for
        ``check_consumed``."""
        return _layer_storage(self, layer_idx)

    def check_consumed(self, model_name):
        """After a decode step: raise ValueError unless every layer's cross-attention read the pool (one that did not
        attended over the empty placeholder)."""
        if self.writing:
            return
        _check_read(self, model_name, "cross-attention", "attended over no encoder position")


class _PagedCrossLayer(DynamicLayer):
    """One layer of a ``PagedCrossAttentionCache``."""

    def __init__(self, view, layer_idx):
        super().__init__()
        self.view, self.layer_idx = view, layer_idx
        storage = view.key_caches[layer_idx]
        self.dtype, self.device = storage.dtype, storage.device
        self.is_initialized = True
        if not view.writing:
            _, Hkv, _, D = storage.shape
            self.keys = self.values = storage.new_zeros(len(view.lengths), Hkv, 0, D)

    def update(self, key_states, value_states, *args, **kwargs):
        view = self.view
        if not view.writing:
            raise ValueError("the model computed cross-attention K/V in a decode step, whose K/V are in the paged pool "
                             "(it did not honour EncoderDecoderCache.is_updated)")
        for cache, states in ((view.key_caches[self.layer_idx], key_states),
                              (view.value_caches[self.layer_idx], value_states)):
            cache[view._write_blocks, :, view._write_offsets] = states[view._rows, :, view._columns].to(cache.dtype)
        return key_states, value_states

    def get_seq_length(self):
        # EncoderDecoderCache marks a layer "updated" (its K/V reused, not recomputed) when this is > 0.
        return 0 if self.view.writing else self.view.max_seq_len

    def get_mask_sizes(self, query_length):
        return self.get_seq_length(), 0

    def get_max_length(self):
        return -1


class EncoderDecoderPagedCache(EncoderDecoderCache):
    """One encoder-decoder forward over a paged pool: the decoder's self-attention through ``self_attention``
    (a ``PagedKVCache``), its cross-attention through ``cross_attention`` (a ``PagedCrossAttentionCache``). Passed
    to fastpeft's attention under ``PAGED_KWARG`` too, which asks ``for_module`` which view an attention module
    reads."""

    def __init__(self, self_attention, cross_attention):
        super().__init__(self_attention, cross_attention)

    @property
    def fastpeft_attention_kwargs(self):
        return {PAGED_KWARG: self}

    def attention_mask(self):
        """The decoder's self-attention mask (``PagedKVCache.attention_mask``)."""
        return self.self_attention_cache.attention_mask()

    def positions(self):
        return self.self_attention_cache.positions()

    def for_module(self, module):
        """The paged view attention ``module`` reads: the self-attention cache for the decoder's self-attention, the
        cross-attention cache for its cross-attention in a decode step, None otherwise (the encoder; the
        cross-attention of a first step attends over the K/V it just computed)."""
        if is_decoder_self_attention(module):
            return self.self_attention_cache
        if getattr(module, "is_decoder", False) and not self.cross_attention_cache.writing:
            return self.cross_attention_cache
        return None

    def check_consumed(self, model_name):
        self.self_attention_cache.check_consumed(model_name)
        self.cross_attention_cache.check_consumed(model_name)


def _layer_storage(view, layer_idx):
    if layer_idx is None or not 0 <= layer_idx < len(view.key_caches):
        raise ValueError(f"the attention module's layer_idx={layer_idx} has no layer in this paged cache "
                         f"({len(view.key_caches)} layers)")
    view.read_layers.add(layer_idx)
    return view.key_caches[layer_idx], view.value_caches[layer_idx]


def _check_read(view, model_name, what, otherwise):
    missing = sorted(set(range(len(view.key_caches))) - view.read_layers)
    view.read_layers.clear()
    if missing:
        raise ValueError(f"the {what} of {model_name}'s layers {missing} did not read the paged KV cache (fastpeft's "
                         f"attention with the {PAGED_KWARG} keyword does): their outputs {otherwise}")
