"""``AdapterBank`` on encoder-decoder LMs (T5, MT5, BART): ``fastpeft.AdapterBank(model)`` builds this one for a
model whose config says ``is_encoder_decoder``.

What PEFT's ``PeftModelForSeq2SeqLM`` does with each kind of adapter, and how the bank does it for many adapters in
one batch, each row as PEFT runs it alone:

- Prompt tuning and p-tuning: PEFT puts the P virtual-token embeddings in front of the encoder's input (the encoder's
  mask gets P ones; the decoder sees them only through the encoder's output). The encoder is bidirectional: virtual
  tokens and input attend to each other at every layer, so their keys and values depend on the row and cannot be
  computed once as prefix K/V, as the causal bank does. The bank keeps each adapter's embeddings (``EncoderPrompts``:
  the first P rows of PEFT's, which holds ``P * num_transformer_submodules`` and feeds the encoder the first P) and
  lays every row of a request out as ``[its virtual tokens ; its real tokens ; padding]`` (``pack_encoder_rows``):
  each row carries its own adapter's count, the batch is as wide as its longest row (not the longest adapter plus the
  longest input), and every row's tokens sit at ``0 .. P+L-1`` as in PEFT alone, for BART's absolute positions and
  T5's relative ones, whichever side the caller padded.
- Prefix tuning: PEFT hands the decoder's self-attention a prefix cache (decoder layer i reads the adapter's layer
  ``2i mod num_layers``: ``adapters.encoder_decoder_prefix_layers``), the encoder and the cross-attention none, and
  the decoder numbers its tokens after it: BART's position embedding from P (``compat.decoder_positions_shifted``,
  with each row's own P), T5's relative bias over the prefix columns as T5 computes it over a P-token cache
  (``attention.DecoderSelfAttentionPrefix.relative_bias``, for each row's length). The bank stores the decoder
  layers' K/V in its ``PrefixTables`` and the decoder reads them through ``prefix_index``.

The encoder runs once per request (``encode``); ``generate`` hands its output to transformers' own ``generate``,
which then runs the decoder alone at every step, each row's prefix (if any) read from the tables. The serving engine
(``fastpeft.serve``) runs ``route``, ``encode`` and ``forward`` itself, over its paged KV pool
(``decoder_kv_shape``, ``encoder_virtual_tokens`` and ``forward``'s per-row decoder positions are for it).
"""

import contextlib
from typing import NamedTuple

import torch

from .adapters import PREFIX_TUNING, check_compatible, encoder_decoder_prefix_layers, split_prefix
from .bank import AdapterBank, BankOutput
from .integration import compat
from .integration.attention import (PREFIX_KWARG, DecoderSelfAttentionPrefix, generating_with_prefix,
                                    is_decoder_self_attention)
from .integration.peft.checks import (check_decoder_positions_shiftable, check_encoder_decoder_prefix,
                                      decoder_self_attention_layers)
from .prefix_tables import NO_ADAPTER_SLOT, PrefixTables, Routing, pack_encoder_rows
from .sampling import drawing_from

__all__ = ["EncoderDecoderAdapterBank", "EncoderDecoderRouting", "EncoderDecoderSlot", "EncoderPrompts",
           "pack_encoder_rows"]


class EncoderDecoderSlot(NamedTuple):
    """Where an adapter of an encoder-decoder bank lives: ``decoder``, its entry in the decoder's prefix tables
    (prefix tuning), and ``encoder``, its entry in the encoder's prompts (prompt tuning, p-tuning); the other one is
    ``NO_ADAPTER_SLOT``."""

    decoder: int
    encoder: int


class EncoderDecoderRouting(NamedTuple):
    """Where each row of a batch reads its adapter: ``decoder`` (a ``Routing``: the decoder's prefix table entries,
    and as position offsets the prefix lengths the decoder numbers its tokens after), ``prompt_entries`` (each row's
    ``EncoderPrompts`` entry, host ints) and ``reads_prefix`` (whether any row has a decoder prefix)."""

    decoder: Routing
    prompt_entries: tuple
    reads_prefix: bool


class EncoderPrompts:
    """The virtual-token embeddings of prompt-tuning and p-tuning adapters, one entry per adapter (entry
    ``NO_ADAPTER_SLOT`` is empty), read per batch as one ``[B, P, hidden]`` block.

    Kept as one ``[entries, P_max, hidden]`` table (zero past each entry's length) in the model's dtype on its
    device, rebuilt when an adapter is added or removed (rare next to requests), so that a request gathers its rows
    with one indexing."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype
        self._by_entry = {}  # entry -> [P, hidden]
        self._table = self._lengths = None  # built by ``gather`` after a change

    @property
    def nbytes(self):
        """Bytes held by the embeddings (the gathered table, when built, holds as many again at most)."""
        return sum(prompts.numel() * prompts.element_size() for prompts in self._by_entry.values())

    def length(self, entry):
        """The number of virtual tokens of ``entry`` (0 for the empty one)."""
        prompts = self._by_entry.get(entry)
        return 0 if prompts is None else prompts.shape[0]

    def store(self, embeddings):
        """Keep ``embeddings`` ``[P, hidden]`` in a free entry; returns the entry."""
        entry = next(e for e in range(NO_ADAPTER_SLOT + 1, len(self._by_entry) + 2) if e not in self._by_entry)
        self._by_entry[entry] = embeddings.to(self.device, self.dtype)
        self._table = self._lengths = None
        return entry

    def free(self, entry):
        del self._by_entry[entry]
        self._table = self._lengths = None

    def gather(self, entries):
        """``(prompts [B, P, hidden], lengths [B])`` of the rows reading ``entries`` (host ints, stored entries or
        ``NO_ADAPTER_SLOT``): row b's virtual tokens first, zeros after its length; P is the longest row's."""
        if self._table is None:
            width = max((prompts.shape[0] for prompts in self._by_entry.values()), default=0)
            hidden = next(iter(self._by_entry.values())).shape[1] if self._by_entry else 0
            self._table = torch.zeros(max(self._by_entry, default=0) + 1, width, hidden, device=self.device,
                                      dtype=self.dtype)
            self._lengths = torch.zeros(self._table.shape[0], dtype=torch.long, device=self.device)
            for entry, prompts in self._by_entry.items():
                self._table[entry, :prompts.shape[0]] = prompts
                self._lengths[entry] = prompts.shape[0]
        width = max(self.length(entry) for entry in entries)
        index = torch.tensor(entries, dtype=torch.long, device=self.device)
        return self._table[index, :width], self._lengths[index]


class EncoderDecoderAdapterBank(AdapterBank):
    """``AdapterBank`` for an encoder-decoder base model (see the module docstring); made by
    ``fastpeft.AdapterBank(model)``. Adapters are PEFT ``SEQ_2_SEQ_LM`` prefix-tuning, prompt-tuning and p-tuning
    adapters of the model's layout; ``slot_of`` gives an ``EncoderDecoderSlot``, ``route`` an
    ``EncoderDecoderRouting``, and the serving step is ``encode`` (once per request) then ``forward`` (the decoder).

    A prefix-tuning adapter whose ``num_layers`` the decoder outnumbers, or whose heads the decoder's
    self-attention does not have, is refused at ``add`` by name, as ``fastpeft.accelerate`` refuses it (PEFT fails
    on it).
    """

    _NO_ADAPTER = EncoderDecoderSlot(NO_ADAPTER_SLOT, NO_ADAPTER_SLOT)

    def __init__(self, base_model, initial_capacity=4):
        self._hold(base_model, initial_capacity, encoder_decoder=True)
        try:
            # The decoder self-attention modules the prefix keyword is meant for, told apart from the others.
            self._decoder_layers = len(decoder_self_attention_layers(base_model))
        except ValueError:
            self._backbone.restore()
            raise
        g = self.geometry
        # PEFT sizes a prefix by the model's heads (the encoder's); add refuses one the decoder does not have.
        self._tables = PrefixTables(self._decoder_layers, g.num_kv_heads, g.head_dim, initial_capacity, self.device,
                                    self.dtype)
        self._prompts = EncoderPrompts(self.device, self.dtype)
        self._relative_bias = compat.decoder_relative_bias(base_model)

    def close(self):
        super().close()
        self._prompts = None

    # ----- adapters --------------------------------------------------------------------------------------------

    def _store(self, loaded):
        check_compatible(loaded, self.geometry, task_type="SEQ_2_SEQ_LM", encoder_decoder=True)
        if loaded.peft_type != PREFIX_TUNING:
            # The encoder reads the first P of PEFT's P * num_transformer_submodules embeddings.
            return EncoderDecoderSlot(NO_ADAPTER_SLOT,
                                      self._prompts.store(loaded.embeddings[:loaded.num_virtual_tokens]))
        g = self.geometry
        check_encoder_decoder_prefix(f"prefix-tuning adapter {loaded.source}",
                                     loaded.config.get("num_transformer_submodules"), g.num_layers,
                                     g.num_kv_heads, self.model)
        check_decoder_positions_shiftable(self.model, "AdapterBank")
        keys, values = split_prefix(loaded.embeddings, g.num_layers, g.num_kv_heads, g.head_dim)
        order = encoder_decoder_prefix_layers(g.num_layers, self._decoder_layers)
        entry = self._tables.store(torch.stack([keys[i] for i in order]), torch.stack([values[i] for i in order]))
        return EncoderDecoderSlot(entry, NO_ADAPTER_SLOT)

    def _free(self, slot):
        if slot.decoder != NO_ADAPTER_SLOT:
            self._tables.free(slot.decoder)
        if slot.encoder != NO_ADAPTER_SLOT:
            self._prompts.free(slot.encoder)

    def num_virtual_tokens(self, name):
        """How many virtual tokens adapter ``name`` has: in front of its rows' encoder input (prompt tuning,
        p-tuning) or before its rows' decoder tokens (prefix tuning)."""
        slot = self.slot_of(name)
        return self._tables.length(slot.decoder) + self._prompts.length(slot.encoder)

    def encoder_virtual_tokens(self, name):
        """How many virtual tokens adapter ``name`` (None: no adapter) puts in front of its rows' encoder input: its
        count for prompt tuning and p-tuning, 0 for prefix tuning and None. ``KeyError`` for an unknown name."""
        if name is None:
            return 0
        slot = self.slot_of(name)
        return self._prompts.length(slot.encoder) if slot.encoder != NO_ADAPTER_SLOT else 0

    @property
    def decoder_kv_shape(self):
        """``(num_layers, num_kv_heads, head_dim)`` of the decoder's attention (its self-attention and its
        cross-attention alike): the layout of a KV cache of the decoder, which may differ from the encoder's
        (``geometry``)."""
        module = next(module for module in self.model.get_decoder().modules()
                      if getattr(module, "layer_idx", None) == 0 and is_decoder_self_attention(module))
        heads = getattr(module, "n_heads", None) or getattr(module, "num_heads")
        head_dim = getattr(module, "key_value_proj_dim", None) or getattr(module, "head_dim")
        return self._decoder_layers, heads, head_dim

    @property
    def storage_bytes(self):
        """Bytes held by the decoder's prefix tables and the encoder's prompts."""
        return 0 if self._closed else self._tables.nbytes + self._prompts.nbytes

    # ----- serving ---------------------------------------------------------------------------------------------

    def __call__(self, input_ids, attention_mask=None, adapters=None, decoder_input_ids=None):
        """Decoder logits of a batch whose rows use different adapters.

        Arguments:
            input_ids: ``[B, L]`` the encoder's input token ids, padded on either side.
            attention_mask: ``[B, L]`` 0/1 (or bool), 1 = real token; None = no padding. Every row needs a real token.
            adapters: one adapter name or None (no adapter) per row; None = no adapter for every row.
            decoder_input_ids: ``[B, T]`` the decoder's input (its start token first); None = the model config's
                ``decoder_start_token_id`` alone. Rows of different lengths are right-padded: the decoder is causal,
                so a row's logits at its own tokens do not see the padding after them.

        Returns ``BankOutput`` with ``logits [B, T, vocab]``. Row b's logits equal those of PEFT running that row
        alone, unpadded, with its adapter (the base model alone for None). Unknown names raise ``KeyError``.
        """
        self._check_open()
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask)
        self._check_rows_not_empty(attention_mask)
        decoder_input_ids = self._check_decoder_inputs(decoder_input_ids, input_ids.shape[0])
        routing = self.route(adapters, input_ids.shape[0])
        with torch.inference_mode():
            encoder_outputs, encoder_mask = self.encode(input_ids, attention_mask, routing)
            logits = self.forward(encoder_outputs, encoder_mask, decoder_input_ids, routing)
        return BankOutput(logits=logits)

    def generate(self, input_ids, attention_mask=None, adapters=None, generator=None, **generate_kwargs):
        """Generate for a batch whose rows use different adapters, through transformers' own ``generate``.

        Arguments: ``input_ids``, ``attention_mask``, ``adapters`` as in ``__call__``; ``generator`` and
        ``generate_kwargs`` as in the causal bank's ``generate`` (``decoder_input_ids`` too: the decoder's start,
        which transformers puts its start token in front of where it lacks it). ``encoder_outputs``,
        ``inputs_embeds``, ``decoder_inputs_embeds``, the cache and fastpeft's prefix keyword are set by the bank
        and refused.

        The encoder runs once, here (``encode``); transformers' ``generate`` then runs the decoder alone at every
        step, each row's prefix read from the bank (the cache holds only the decoder's tokens; beams share their
        row's prefix). Returns what ``model.generate`` returns: the decoder's sequences ``[B * num_return_sequences,
        1 + n]`` (start token first) or its output dataclass. Greedy tokens of each row equal those of PEFT's forward
        looped over that row alone, unpadded (``reference_generate.generate_seq2seq_without_cache``).
        """
        input_ids, attention_mask, routing = self._check_generation(
            input_ids, attention_mask, adapters, generate_kwargs,
            ("encoder_outputs", "inputs_embeds", "decoder_inputs_embeds"))
        B = input_ids.shape[0]
        if generate_kwargs["max_new_tokens"] == 0:  # which transformers refuses: the decoder's start, as it is
            return self._check_decoder_inputs(generate_kwargs.get("decoder_input_ids"), B)
        generate_kwargs = self._eos_list_resolved(generate_kwargs)
        specs = {}  # by the number of rows per input row (beams, return sequences)

        def add_prefixes(model_inputs):
            decoder_input_ids = model_inputs.get("decoder_input_ids")
            if decoder_input_ids is None:
                raise ValueError(f"{type(self.model).__name__}.generate passed no decoder_input_ids; the bank counts "
                                 "each step's rows from them")
            copies = decoder_input_ids.shape[0] // B
            if copies not in specs:
                specs[copies] = self._decoder_prefix(routing.decoder.prefix_index.repeat_interleave(copies))
            return specs[copies]

        with torch.inference_mode(), drawing_from(generator):
            encoder_outputs, encoder_mask = self.encode(input_ids, attention_mask, routing)
            with self._decoder_positions(routing), (
                    generating_with_prefix(self.model, add_prefixes, "the adapters' prefixes")
                    if routing.reads_prefix else contextlib.nullcontext()):
                return self.model.generate(input_ids=input_ids, encoder_outputs=encoder_outputs,
                                           attention_mask=encoder_mask, **generate_kwargs)

    # ----- the serving step ------------------------------------------------------------------------------------

    def route(self, adapters, batch_size):
        """The ``EncoderDecoderRouting`` of ``batch_size`` rows with ``adapters`` (one name or None per row; None =
        no adapter for every row). Raises ``KeyError`` naming unknown adapters."""
        slots = self._row_slots(adapters, batch_size)
        decoder = self._tables.routing([slot.decoder for slot in slots])
        return EncoderDecoderRouting(decoder, tuple(slot.encoder for slot in slots),
                                     any(slot.decoder != NO_ADAPTER_SLOT for slot in slots))

    def encode(self, input_ids, attention_mask, routing):
        """The encoder's output for a batch, once per request: each row as ``[its adapter's virtual tokens ; its real
        tokens]`` (``pack_encoder_rows``). ``input_ids``/``attention_mask`` ``[B, L]`` on the bank's device,
        ``routing`` from ``route``. Returns ``(encoder_outputs, encoder_attention_mask [B, W])``: the encoder's model
        output (``last_hidden_state [B, W, hidden]``) and the mask the decoder's cross-attention reads it with.
        Nothing is checked; call under ``torch.inference_mode()``."""
        self._check_open()
        prompts, prompt_lengths = self._prompts.gather(routing.prompt_entries)
        embeddings = self.model.get_input_embeddings()(input_ids)  # PEFT's word embeddings (BART's scaled ones)
        packed, encoder_mask = pack_encoder_rows(embeddings, attention_mask, prompts, prompt_lengths)
        return self.model.get_encoder()(inputs_embeds=packed, attention_mask=encoder_mask), encoder_mask

    def forward(self, encoder_outputs, encoder_attention_mask, decoder_input_ids, routing, cache=None,
                decoder_attention_mask=None, decoder_start_positions=None):
        """One decoder forward with the bank's prefixes, for callers that run their own decoding: ``encode``'s
        output and mask, ``decoder_input_ids [B, T]`` (the decoder's tokens after ``cache``'s), ``routing`` from
        ``route`` (rows in the order of ``encode``'s), ``cache``: a transformers ``EncoderDecoderCache`` of the
        decoder's own tokens (filled in place) or None. Returns the logits ``[B, T, vocab]``. Nothing is checked;
        call under ``torch.inference_mode()``.

        For a cache whose rows hold different numbers of tokens (the serving engine's paged pool, keys gathered
        right-aligned): ``decoder_attention_mask [B, cache length + T]`` (1 = a key the row sees) and
        ``decoder_start_positions [B]`` integer, each row's first new token's index in its own decoder sequence
        (the decoder would number every row from the cache's length)."""
        self._check_open()
        spec = self._decoder_prefix(routing.decoder.prefix_index) if routing.reads_prefix else None
        positions = self._decoder_positions(routing)
        if decoder_start_positions is not None:
            offsets = routing.decoder.position_offsets + decoder_start_positions.to(self.device) - \
                compat.cache_length(cache)
            positions = compat.decoder_positions_shifted(self.model, offsets)
        with positions:
            out = self.model(encoder_outputs=encoder_outputs, attention_mask=encoder_attention_mask,
                             decoder_input_ids=decoder_input_ids, use_cache=cache is not None,
                             decoder_attention_mask=decoder_attention_mask,
                             **compat.cache_kwargs(self.model, cache), **({PREFIX_KWARG: spec} if spec else {}))
        if spec is not None:
            spec.check_consumed(type(self.model).__name__, "the adapters' prefixes")
        return out.logits

    # ----- helpers ---------------------------------------------------------------------------------------------

    def _decoder_prefix(self, prefix_index):
        """The tables as the decoder's self-attention prefix of rows reading entries ``prefix_index [B]``."""
        return DecoderSelfAttentionPrefix(self._tables.spec(prefix_index), relative_bias=self._relative_bias)

    def _decoder_positions(self, routing):
        """The decoder numbering each row's tokens after its prefix, as PEFT's cache of P tokens numbers them."""
        if not routing.reads_prefix:
            return contextlib.nullcontext()
        return compat.decoder_positions_shifted(self.model, routing.decoder.position_offsets)

    def _check_decoder_inputs(self, decoder_input_ids, batch_size):
        if decoder_input_ids is None:
            start = self.model.config.decoder_start_token_id
            if start is None:
                raise ValueError("decoder_input_ids is required: the model config has no decoder_start_token_id")
            return torch.full((batch_size, 1), start, dtype=torch.long, device=self.device)
        if not isinstance(decoder_input_ids, torch.Tensor) or decoder_input_ids.dim() != 2 or \
                decoder_input_ids.shape[0] != batch_size or decoder_input_ids.shape[1] == 0:
            raise ValueError(f"decoder_input_ids must be a [B={batch_size}, T >= 1] tensor, got "
                             f"{getattr(decoder_input_ids, 'shape', type(decoder_input_ids))}")
        if decoder_input_ids.dtype.is_floating_point or decoder_input_ids.dtype.is_complex or \
                decoder_input_ids.dtype == torch.bool:
            raise ValueError(f"decoder_input_ids must hold integer token ids, got {decoder_input_ids.dtype}")
        return decoder_input_ids.to(self.device, torch.long)
