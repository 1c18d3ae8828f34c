"""Per-layer prefix tables: many adapters' prefix K/V in one tensor, one entry per adapter, read per row.

``PrefixTables`` is the storage ``AdapterBank`` serves from (and the serving engine through it):
``[2, num_layers, T, Hkv, P_max, head_dim]`` (keys, values) on one device, in the model's dtype. Layer i's tables are
the views ``[T, Hkv, P_max, head_dim]`` the fused attention reads through ``prefix_index`` (one table entry per row)
and ``prefix_lengths`` (``[T]``, each entry's number of virtual tokens; entries past it are invisible). Entry 0 is
permanently empty (length 0): rows without an adapter point at it. ``T`` grows by doubling, ``P_max`` to the longest
entry ever stored (it never shrinks; the kernels read only each entry's valid length); a freed entry is zeroed and
reused by the next ``store``.

Positions. Two rules, PEFT's two numberings of a row whose entry holds P virtual tokens:

- ``pad_aware_positions`` (serving, PEFT's ``generate``): real tokens at ``P + cumsum(mask) - 1``, a row without an
  entry at ``cumsum(mask) - 1``. That is what PEFT does for one unpadded row (prefix tuning: real tokens at
  ``P .. P+L-1``; prompt tuning: the same over the concatenation), so each padded row of a mixed batch gets what
  PEFT gives it alone.
- ``offset_positions`` (training, PEFT's ``forward``): ``P .. P+L-1`` whatever the padding, ``arange(L) + P``, as
  PEFT's prefix-tuning forward numbers every row of a batch (its cache of P prefix tokens precedes each row).

An encoder-decoder's prompt-tuning and p-tuning rows put their virtual tokens in front of the encoder's input
instead: ``pack_encoder_rows`` lays each row out as ``[its virtual tokens ; its real tokens ; padding]`` (the real
tokens at ``pad_aware_positions``), which the encoder-decoder bank (serving) and the encoder-decoder multi-prefix
model (training) both run.
"""

from typing import NamedTuple

import torch

from .integration.attention import PrefixSpec

NO_ADAPTER_SLOT = 0


class Routing(NamedTuple):
    """Where each row of a batch reads its prefix: ``prefix_index [B]`` int32 (table entries) and
    ``position_offsets [B]`` int64 (each row's number of virtual tokens, where its real tokens start)."""

    prefix_index: torch.Tensor
    position_offsets: torch.Tensor

    def repeat_interleave(self, copies):
        """Each row ``copies`` times in a row (beams, return sequences, n continuations of one prompt)."""
        return Routing(self.prefix_index.repeat_interleave(copies), self.position_offsets.repeat_interleave(copies))


def pad_aware_positions(attention_mask, position_offsets):
    """Position ids ``[B, L]``: real tokens at ``offset + cumsum(mask) - 1``; padding at 0 (its keys are masked and
    its outputs unused, it only needs a valid position)."""
    positions = position_offsets.unsqueeze(1) + attention_mask.cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def offset_positions(sequence_length, position_offsets):
    """Position ids ``[B, L]``: ``offset + arange(L)`` per row, padding included (PEFT's forward numbering, not
    pad-aware)."""
    steps = torch.arange(sequence_length, device=position_offsets.device)
    return position_offsets.to(torch.long).unsqueeze(1) + steps.unsqueeze(0)


def pack_encoder_rows(embeddings, attention_mask, prompts, prompt_lengths):
    """An encoder's batch with each row's virtual tokens in front of its real tokens, as PEFT runs the row alone.

    Arguments: ``embeddings [B, L, hidden]`` of the input tokens, ``attention_mask [B, L]`` (rows padded on either
    side, or anywhere), ``prompts [B, P, hidden]`` and ``prompt_lengths [B]`` (``EncoderPrompts.gather``).

    Returns ``(packed [B, W, hidden], mask [B, W])``: row b holds its ``n_b`` virtual tokens, then its real tokens in
    order (at ``pad_aware_positions``), then padding; ``W = max_b(n_b + L_b)``, the longest row."""
    B, L, hidden = embeddings.shape
    lengths = prompt_lengths + attention_mask.sum(-1)
    width = int(lengths.max())
    # One column more, which takes the padding's embeddings and is cut off.
    packed = embeddings.new_zeros(B, width + 1, hidden)
    if prompts.shape[1]:
        packed[:, :prompts.shape[1]] = prompts
    target = pad_aware_positions(attention_mask, prompt_lengths).masked_fill(attention_mask == 0, width)
    packed.scatter_(1, target.unsqueeze(-1).expand(B, L, hidden), embeddings)
    mask = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    return packed[:, :width], mask.long()


class PrefixTables:
    """Growable per-layer prefix tables (see the module docstring), with room for ``capacity`` entries besides the
    empty one. The tensors are only ever touched under inference mode."""

    def __init__(self, num_layers, num_kv_heads, head_dim, capacity, device, dtype):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"initial_capacity must be a positive integer, got {capacity!r}")
        # P_max starts at 1, not 0, so that the tables never have a zero-size prefix axis (an entry's length, not
        # P_max, decides what is visible; no backend has to handle an empty axis).
        with torch.inference_mode():
            self._kv = torch.zeros(2, num_layers, capacity + 1, num_kv_heads, 1, head_dim, device=device, dtype=dtype)
            self._lengths = torch.zeros(capacity + 1, dtype=torch.int32, device=device)
        self._lengths_host = [0] * (capacity + 1)
        self._free = set(range(1, capacity + 1))
        self._refresh_layer_views()

    @property
    def capacity(self):
        """How many entries fit before the tables grow."""
        return self._kv.shape[2] - 1

    @property
    def nbytes(self):
        """Bytes held by the tables (keys, values and lengths)."""
        return self._kv.numel() * self._kv.element_size() + self._lengths.numel() * self._lengths.element_size()

    def length(self, entry):
        """The number of virtual tokens stored in ``entry`` (0 for the empty one); read on the host."""
        return self._lengths_host[entry]

    def store(self, keys, values):
        """Store one prefix, ``keys``/``values`` ``[num_layers, Hkv, P, D]``, in a free entry (growing the tables
        if needed) and return the entry."""
        P = keys.shape[2]
        with torch.inference_mode():
            entry = self._allocate(P)
            self._kv[0, :, entry, :, :P] = keys.to(self._kv.device, self._kv.dtype)
            self._kv[1, :, entry, :, :P] = values.to(self._kv.device, self._kv.dtype)
            self._lengths[entry] = P
        self._lengths_host[entry] = P
        return entry

    def free(self, entry):
        """Zero ``entry`` and hand it to later ``store`` calls."""
        with torch.inference_mode():
            self._kv[:, :, entry].zero_()
            self._lengths[entry] = 0
        self._lengths_host[entry] = 0
        self._free.add(entry)

    def routing(self, entries):
        """The ``Routing`` of rows reading ``entries`` (host ints, each a stored entry or ``NO_ADAPTER_SLOT``)."""
        device = self._kv.device
        return Routing(torch.tensor(entries, dtype=torch.int32, device=device),
                       torch.tensor([self._lengths_host[e] for e in entries], dtype=torch.long, device=device))

    def spec(self, prefix_index):
        """The tables as a ``PrefixSpec`` for the rows' entries ``prefix_index [B]``. Built without the spec's
        value checks (device syncs on every forward and decode step): indices come from ``routing`` of live entries
        and the lengths never exceed ``P_max``, by construction."""
        return PrefixSpec.build(self._layer_keys, self._layer_values, prefix_index, self._lengths, check_values=False)

    def _allocate(self, num_virtual_tokens):
        """A free entry, after growing the tables (T by doubling, P_max to fit) when needed."""
        _, _, T, _, P_max, _ = self._kv.shape
        new_T = T if self._free else 2 * T
        new_P = max(P_max, num_virtual_tokens)
        if (new_T, new_P) != (T, P_max):
            grown = self._kv.new_zeros(*self._kv.shape[:2], new_T, self._kv.shape[3], new_P, self._kv.shape[5])
            grown[:, :, :T, :, :P_max] = self._kv
            self._kv = grown
            lengths = self._lengths.new_zeros(new_T)
            lengths[:T] = self._lengths
            self._lengths = lengths
            self._lengths_host += [0] * (new_T - T)
            self._free.update(range(T, new_T))
            self._refresh_layer_views()
        entry = min(self._free)
        self._free.remove(entry)
        return entry

    def _refresh_layer_views(self):
        self._layer_keys = tuple(self._kv[0].unbind(0))
        self._layer_values = tuple(self._kv[1].unbind(0))
