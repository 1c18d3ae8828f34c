"""What the serving engine does differently for a decoder-only bank and an encoder-decoder bank, behind one small
seam: ``Engine`` keeps one code path (admission by worst case, continuous batching, continuations, sampling,
log-probabilities, endings, adapter commands) and asks its ``ModelKind`` what a request writes into the KV pool and
how one forward runs.

``DecoderOnly`` (``AdapterBank`` of a causal LM): a request's prompt is prefilled into its blocks, chunk by chunk;
each decode step feeds every row its last token.

``EncoderDecoder`` (``EncoderDecoderAdapterBank``: T5, MT5, BART): a request's prompt is the encoder's input. When
the request is admitted, its first step runs the encoder once (the prompt, behind the adapter's virtual tokens for
prompt tuning and p-tuning: ``bank.encode``) and the decoder's first step from its start token, whose
cross-attention computes the K/V of every encoder position once and writes them into pool blocks listed by the
request's own cross-attention block table; the ``n`` continuations of the prompt share those blocks (forks, never
written again) and the start token's. Each decode step then feeds every row its last token: the decoder's
self-attention K/V go into the row's blocks (a prefix-tuning adapter's prefix read from the bank's tables through
``prefix_index``, never copied) and its cross-attention reads the row's encoder positions from the pool through
``fastpeft.ops.paged_prefix_decode`` with no prefix (``integration.paged_cache.EncoderDecoderPagedCache``). An
encoder pass is not split: the prefill budget counts encoder positions, and the last prompt a step admits may pass
it. The decoder's self-attention reads its keys through the block table too (BART), except where the decoder adds a
relative position bias, which the paged op does not: T5's decode steps gather the keys from the blocks
(right-aligned, with a mask; the bias of every row's keys and prefix columns stays exact). The prompt is not scored
by the decoder, so prompt log-probabilities (``echo``) do not exist here and are refused.
"""

import torch

from ..integration import compat
from ..integration.paged_cache import EncoderDecoderPagedCache, PagedCrossAttentionCache


class DecoderOnly:
    """The seam for an ``AdapterBank`` of a causal LM (see the module docstring)."""

    chunked_prefill = True
    scores_prompt = True

    def __init__(self, bank):
        self.bank = bank

    @property
    def kv_shape(self):
        """``(num_layers, num_kv_heads, head_dim)`` of the pool's blocks."""
        g = self.bank.geometry
        return g.num_layers, g.num_kv_heads, g.head_dim

    def refresh(self):
        """After an adapter command (engine thread): nothing to remember."""

    def decoder_prompt(self, request):
        """The tokens prefilled into the request's blocks before it picks its first token."""
        return request.prompt_ids

    def encoder_tokens(self, request):
        """The request's encoder positions held in the pool (cross-attention K/V): none."""
        return 0

    def forward(self, pool, feeds, every_position, model_name):
        """One forward of ``feeds`` through the bank's serving API: each feed's logits, ``[len(tokens), vocab]`` with
        ``every_position``, else ``[1, vocab]`` at its last token."""
        bank = self.bank
        counts = [len(feed.tokens) for feed in feeds]
        ids = _right_padded([feed.tokens for feed in feeds])   # padding is never written or read
        width = ids.shape[1]
        routing = bank.route([feed.adapter for feed in feeds], len(feeds))
        cache = pool.step_cache([feed.table for feed in feeds], counts)
        # Logits of the last columns only, from the shortest row's last token on (unless every position is asked).
        keep = 0 if every_position else width - min(counts) + 1
        with torch.inference_mode():
            logits = bank.forward(ids.to(bank.device), cache.attention_mask(),
                                  routing.position_offsets[:, None] + cache.positions(), routing.prefix_index, cache,
                                  logits_to_keep=keep)
        cache.check_consumed(model_name)
        first_column = width - logits.shape[1]   # a model that ignores logits_to_keep returns every column
        if every_position:
            return [logits[b, :count] for b, count in enumerate(counts)]
        return [logits[b, count - 1 - first_column].unsqueeze(0) for b, count in enumerate(counts)]


class EncoderDecoder:
    """The seam for an ``EncoderDecoderAdapterBank`` (see the module docstring)."""

    chunked_prefill = False
    scores_prompt = False

    def __init__(self, bank):
        self.bank = bank
        start = bank.model.config.decoder_start_token_id
        if start is None:
            raise ValueError(f"{type(bank.model).__name__}'s config has no decoder_start_token_id: the engine starts "
                             "every request's decoder from it")
        self.start_token = start
        # The paged op adds no position bias: a decoder with a relative one (T5) gathers its keys at decode steps.
        self._gather_decode = compat.decoder_relative_bias(bank.model) is not None
        self._virtual_tokens = {}
        self.refresh()

    @property
    def kv_shape(self):
        return self.bank.decoder_kv_shape

    def refresh(self):
        # A snapshot for submit (HTTP threads): the encoder's virtual tokens of each adapter.
        self._virtual_tokens = {name: self.bank.encoder_virtual_tokens(name) for name in self.bank.names}

    def decoder_prompt(self, request):
        return [self.start_token]

    def encoder_tokens(self, request):
        """The request's encoder positions: its prompt, behind its adapter's virtual tokens (prompt tuning, p-tuning).
        An adapter the bank no longer has counts none (its request ends when its turn comes)."""
        return len(request.prompt_ids) + self._virtual_tokens.get(request.adapter, 0)

    def forward(self, pool, feeds, every_position, model_name):
        """One decoder step of ``feeds`` (one token each): the requests' first (feeds with ``encoder_ids``: the
        encoder runs, the cross-attention K/V are written into their blocks) or a decode step (every feed's
        cross-attention read from its blocks). Each feed's logits ``[1, vocab]``."""
        bank = self.bank
        B = len(feeds)
        ids = _right_padded([feed.tokens for feed in feeds]).to(bank.device)
        routing = bank.route([feed.adapter for feed in feeds], B)
        self_attention = pool.step_cache([feed.table for feed in feeds], [1] * B, gather_decode=self._gather_decode,
                                         model_mask_redundant=True)
        cross_tables = pool.block_table_tensor([feed.cross_table for feed in feeds])
        first = feeds[0].encoder_ids is not None
        with torch.inference_mode():
            if first:
                encoder_ids = _right_padded([feed.encoder_ids for feed in feeds]).to(bank.device)
                encoder_mask = _right_padded([[1] * len(feed.encoder_ids) for feed in feeds]).to(bank.device)
                encoder_outputs, encoder_mask = bank.encode(encoder_ids, encoder_mask, routing)
                lengths = [feed.cross_table.num_tokens for feed in feeds]
                if encoder_mask.shape[1] != max(lengths):
                    raise ValueError(f"the encoder's packed rows ({encoder_mask.shape[1]} positions) do not match the "
                                     f"blocks the engine reserved ({max(lengths)}): an adapter changed under a request")
            else:
                hidden = bank.geometry.hidden_size
                # The decoder's cross-attention reads the pool; the model still wants encoder states to run it.
                encoder_outputs = (torch.zeros(B, 0, hidden, device=bank.device, dtype=bank.dtype),)
                encoder_mask, lengths = None, [feed.cross_table.num_tokens for feed in feeds]
            cross_attention = PagedCrossAttentionCache(pool.key_caches, pool.value_caches, cross_tables, lengths,
                                                       writing=first)
            cache = EncoderDecoderPagedCache(self_attention, cross_attention)
            logits = bank.forward(encoder_outputs, encoder_mask, ids, routing, cache,
                                  decoder_attention_mask=cache.attention_mask(),
                                  decoder_start_positions=self_attention.context_lens_tensor)
        cache.check_consumed(model_name)
        return [logits[b, -1:] for b in range(B)]


def model_kind(bank):
    """The seam for ``bank``: ``EncoderDecoder`` for an ``EncoderDecoderAdapterBank``, else ``DecoderOnly``."""
    from ..bank_seq2seq import EncoderDecoderAdapterBank

    return EncoderDecoder(bank) if isinstance(bank, EncoderDecoderAdapterBank) else DecoderOnly(bank)


def _right_padded(rows):
    """``[len(rows), longest]`` long tensor of the rows of ints, right-padded with 0."""
    ids = torch.zeros(len(rows), max(len(row) for row in rows), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
    return ids
