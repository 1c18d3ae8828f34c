"""fastpeft as a transformers attention implementation.

``register()`` adds an attention function and its mask function under the name ``"fastpeft"`` to
transformers' ``AttentionInterface`` / ``AttentionMaskInterface``; a model opts in per instance with
``model.set_attn_implementation("fastpeft")`` (see ``use_fastpeft_attention``), which is undone by setting the
previous implementation back. No model class or module is patched.

How the prefix reaches the kernels: the caller passes ``fastpeft_prefix=PrefixSpec(...)`` as a keyword argument
to the model's ``forward`` (or ``generate``). transformers forwards unknown keyword arguments of a forward down to
every attention call, so each layer's attention function picks its own K/V out of the spec by
``module.layer_idx`` (an encoder-decoder's spec, ``DecoderSelfAttentionPrefix``, gives K/V to the decoder's
self-attention only). Keyword arguments (rather than state on the modules) survive gradient checkpointing, whose
recomputation runs after the forward has returned, and concurrent models sharing one backbone.

Every layer whose attention takes a prefix records it in the spec (``PrefixSpec.consumed``), and the caller checks
after each forward or generation step that every layer did (``PrefixSpec.check_consumed``): a layer whose attention
bypasses the interface or drops keyword arguments on some transformers release would otherwise run without its
prefix and give silently different numbers. A Python set per call; no device work.

The mask function hands the attention function the key padding mask ``[B, 1, 1, S]`` (bool, broadcast over heads and
queries; None when the model got no attention mask) instead of a causal 4-D mask: causality and padding are applied
inside the kernels. It is 4-D so that models which slice their masks along the query axis (Gemma 4 before its
KV-sharing layers, transformers >= 5.24) can; a 2-D ``[B, S]`` mask is taken too. T5's relative
position bias (the ``position_bias`` keyword, which does not hold the mask) reaches the kernels as their additive
``attn_bias``.

A decode step over a paged KV pool (the serving engine's; ``paged_cache.PagedKVCache``) passes its cache as the
``fastpeft_paged`` keyword too: the cache's layers write the new token into the pool and hand attention that token
alone, and the attention function reads each row's keys through its block table (``fastpeft.ops.paged_prefix_decode``).
An encoder-decoder's step passes ``paged_cache.EncoderDecoderPagedCache``, whose ``for_module`` says which view an
attention module reads: a decode step's cross-attention reads each row's encoder positions from the pool that way
(with no prefix; T5's zero bias over the model's empty placeholder keys adds nothing), and a decoder self-attention
over keys gathered right-aligned from the pool gets T5's prefix columns for each row's own context length.
"""

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..ops import environment
from ..ops.paged_decode import paged_prefix_decode_prevalidated
from ..ops.prefix_attention import prefix_attention_prevalidated
from ..ops.reference import reference_prefix_attention

ATTN_IMPLEMENTATION = "fastpeft"
PREFIX_KWARG = "fastpeft_prefix"
PAGED_KWARG = "fastpeft_paged"


class _CallTracking:
    """What the attention calls of one forward share through a ``PrefixSpec``: the plan (``plan_cache``) and the layers
    that read their prefix (``consumed``). Deliberately not a container or a dataclass: FSDP2 (``fully_shard``)
    rebuilds every dataclass among a sharded layer's inputs (``dataclasses.replace``, to hook the tensors needing
    gradients) and, under a ``MixedPrecisionPolicy``, copies every dict, set, list and tuple inside while casting their
    floating tensors; an object of its own kind passes through both untouched, so each layer reads and records through
    the spec the forward was given."""

    __slots__ = ("plan_cache", "consumed")

    def __init__(self):
        self.plan_cache = {}
        self.consumed = set()


@dataclass(frozen=True)
class PrefixSpec:
    """Per-layer prefix K/V for one forward call.

    keys, values: one tensor per decoder layer (indexed by the attention module's ``layer_idx``), either
        ``[Hkv, P, D]`` shared by every row or ``[T, Hkv, P, D]`` a table read through ``prefix_index``; or None for
        a layer that sees no prefix (PEFT's prefix tuning of Gemma models skips layers whose KV shape the prefix does
        not fit). Layers may differ in Hkv and D (Gemma 4).
    prefix_index: ``[B]`` integer, the table entry of each row (required for tables).
    prefix_lengths: ``[T]`` integer, valid length of each entry (ragged tables); default P.
    query_positions: ``[1 or B, L]`` integer, where the call's queries sit in the cache of the computation fastpeft
        reproduces, the prefix at ``0 .. P-1`` first: PEFT's padded cache indices in ``forward``, the pad-aware
        positions of ``generate`` (each row as PEFT runs it alone). Only sliding-window layers read it (transformers'
        sliding cache layers evict tokens, so the keys' count does not say it); None: a window that cuts into
        prefix + sequence is refused.

    Build it with ``PrefixSpec.build``, which checks the index values once, so that the per-layer attention calls
    can skip that (device-synchronizing) check. Callers whose indices are valid by construction (``AdapterBank``,
    ``MultiPrefixTrainer``) pass ``check_values=False``: the checks cost a device sync per forward.
    """

    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]
    prefix_index: Optional[torch.Tensor] = None
    prefix_lengths: Optional[torch.Tensor] = None
    query_positions: Optional[torch.Tensor] = None
    # What the layers' attention calls of one forward share (``_CallTracking``): an init field, so that the copies
    # FSDP2 makes of a sharded layer's inputs carry the same object (see ``_CallTracking``).
    tracking: _CallTracking = field(default_factory=_CallTracking, compare=False, repr=False, kw_only=True)

    @property
    def plan_cache(self):
        """One plan for the layers' attention calls (``prefix_attention_prevalidated``'s ``plan_cache``): validated
        and planned by the first layer, reused by the others. Per forward call (``at_positions`` starts a new one);
        the index, lengths and mask tensors must keep their values while the spec is in use."""
        return self.tracking.plan_cache

    @property
    def consumed(self):
        """The layer_idx of every attention call that took its entry (``layer``) since the spec was made or last
        checked: ``check_consumed`` compares it with the layers the spec covers."""
        return self.tracking.consumed

    @classmethod
    def build(cls, keys, values, prefix_index=None, prefix_lengths=None, check_values=True):
        """Check the per-layer structure (always) and, with ``check_values``, that ``prefix_index`` lies in
        ``[0, T)`` and ``prefix_lengths`` in ``[0, P]`` (four device syncs). Raises ValueError / IndexError."""
        keys, values = tuple(keys), tuple(values)
        if len(keys) != len(values) or not keys:
            raise ValueError(f"keys and values must hold one tensor per layer, got {len(keys)} and {len(values)}")
        if any((k is None) != (v is None) for k, v in zip(keys, values)):
            raise ValueError("a layer without a prefix has None for both its keys and its values")
        present = [k for k in keys if k is not None]
        if not present:
            raise ValueError("a PrefixSpec needs a prefix for at least one layer")
        table = present[0].dim() == 4
        if any(k.dim() != present[0].dim() for k in present):
            raise ValueError("every layer's prefix must be shared [Hkv, P, D], or every layer's a table [T, Hkv, P, D]")
        if table:
            if prefix_index is None:
                raise ValueError("prefix_index is required with per-layer prefix tables [T, Hkv, P, D]")
            T, P = present[0].shape[0], present[0].shape[2]
            if check_values and prefix_index.numel() and (
                    int(prefix_index.min()) < 0 or int(prefix_index.max()) >= T):
                raise IndexError(f"prefix_index values must lie in [0, T={T})")
            if check_values and prefix_lengths is not None and prefix_lengths.numel() and (
                    int(prefix_lengths.min()) < 0 or int(prefix_lengths.max()) > P):
                raise ValueError(f"prefix_lengths values must lie in [0, P={P}]")
        return cls(keys, values, prefix_index, prefix_lengths)

    def at_positions(self, query_positions):
        """This spec for another call: ``query_positions`` set, a fresh plan and a fresh count of the layers that
        read it."""
        return dataclasses.replace(self, query_positions=query_positions, tracking=_CallTracking())

    def layer(self, layer_idx):
        """``(keys, values)`` of layer ``layer_idx`` (``(None, None)``: that layer sees no prefix), recorded in
        ``consumed``. Raises ValueError for a layer the spec does not cover."""
        if layer_idx is None or not 0 <= layer_idx < len(self.keys):
            raise ValueError(f"the attention module's layer_idx={layer_idx} has no prefix in this PrefixSpec "
                             f"({len(self.keys)} layers)")
        self.consumed.add(layer_idx)
        return self.keys[layer_idx], self.values[layer_idx]

    def check_consumed(self, model_name, what="the prefix"):
        """Raise ValueError unless the attention of every layer the spec covers took its entry since the spec was
        made or last checked, then start counting afresh (a spec reused over generation steps is checked per step).
        ``model_name`` and ``what`` name the model and the K/V in the message."""
        consumed, expected = self.consumed, len(self.keys)
        if len(consumed) == expected:
            consumed.clear()
            return
        missing = sorted(set(range(expected)) - consumed)
        consumed.clear()
        raise ValueError(f"{what} reached the attention of {expected - len(missing)} of {model_name}'s {expected} "
                         f"layers in this call, not layers {missing}: their attention does not take fastpeft's "
                         f"{PREFIX_KWARG} keyword on this transformers release (it bypasses the attention interface "
                         "or drops keyword arguments), so the output would silently lack their prefix. fastpeft "
                         "cannot run this model (fastpeft.restore gives PEFT's own path back)")

    def for_module(self, module):
        """The spec that applies to attention ``module``: this one, whole (every attention layer of a decoder-only
        model or an encoder reads its prefix by ``layer_idx``)."""
        return self


class GenerationStepChecks:
    """``PrefixSpec.check_consumed`` for every step of a ``generate``: each step's model inputs get their spec
    through ``next`` (in the generation-step hook, before the step's forward), which first checks the spec of the
    step before; ``finish`` checks the last one after ``generate`` returned. transformers runs one forward per
    prepared step."""

    def __init__(self, model_name, what="the prefix"):
        self.model_name, self.what = model_name, what
        self.pending = None

    def next(self, spec):
        self.finish()
        self.pending = spec
        return spec

    def finish(self):
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.check_consumed(self.model_name, self.what)


@contextlib.contextmanager
def generating_with_prefix(model, add_prefix, what="the prefix"):
    """For a ``model.generate`` run inside the block: every step's model inputs (after the model's
    ``prepare_inputs_for_generation``) go through ``add_prefix(model_inputs)``, which may change them (positions)
    and returns the step's ``PrefixSpec``; the step's forward gets that spec under ``PREFIX_KWARG``, and every
    step's spec is checked to have been read by the layers (``what`` names it in the error). The one way fastpeft
    generates with a prefix: ``fastpeft.accelerate``'s generate and ``AdapterBank.generate``."""
    from . import compat

    steps = GenerationStepChecks(type(model).__name__, what)

    def add_spec(model_inputs):
        spec = add_prefix(model_inputs)
        model_inputs[PREFIX_KWARG] = steps.next(spec)
        return model_inputs

    with compat.generation_step_hook(model, add_spec):
        yield
    steps.finish()


def is_decoder_self_attention(module):
    """Whether attention ``module`` is the self-attention of an encoder-decoder's decoder, rather than its encoder's
    self-attention or its cross-attention. BART's and T5's attention modules say it with two attributes: ``is_decoder``
    (False in the encoder) and ``is_causal`` (False for cross-attention, which is a decoder module too)."""
    return bool(getattr(module, "is_decoder", False) and getattr(module, "is_causal", False))


@dataclass(frozen=True)
class DecoderSelfAttentionPrefix:
    """The prefix of an encoder-decoder, PEFT's way: only the decoder's self-attention reads one (``prefix``, indexed
    by the decoder layer's ``layer_idx``); the encoder's self-attention and the cross-attention read none (PEFT hands
    the prefix over as the self-attention half of an ``EncoderDecoderCache`` and empties its cross-attention half).

    Every decoder self-attention call that takes the prefix records its layer in ``prefix.consumed``, which the
    caller checks after the call (``PrefixSpec.check_consumed``): encoder-decoders (BART, T5) do not declare
    ``_supports_attention_backend``, so that the keyword reaches every decoder layer is verified per call rather than
    trusted per class.
    """

    prefix: PrefixSpec
    # The decoder's relative-position-bias module (T5's first decoder self-attention, ``compat.decoder_relative_bias``)
    # or None. PEFT's prefix sits in T5's cache, so T5 computes its position bias over the prefix too; without a cache
    # fastpeft computes those columns with it (``_prefix_position_bias``). A module reference in the keyword, not a
    # patch of the module: checkpoint recomputation, which runs after the forward, sees it too.
    relative_bias: Optional[torch.nn.Module] = field(default=None, compare=False, repr=False)

    def for_module(self, module):
        """``prefix`` for a decoder self-attention module, None for any other."""
        if not is_decoder_self_attention(module):
            return None
        return self.prefix

    @property
    def consumed(self):
        return self.prefix.consumed

    def check_consumed(self, model_name, what="the prefix"):
        self.prefix.check_consumed(model_name, what)


class UnsupportedModelError(ValueError):
    """A backbone whose attention fastpeft cannot compute (hand-written attention, or a feature the kernels lack);
    the message names why. ``fastpeft.accelerate`` turns it into a fallback warning unless ``strict=True``."""


# Keyword arguments transformers passes to attention functions that change the attention math (logit
# soft-capping: Gemma 2; attention sinks: gpt-oss and others; sparse or packed key selections). fastpeft's kernels
# implement none of them: a non-None value is refused, never ignored. (``position_bias`` is handled below.)
UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks", "indices", "block_indices", "cu_seq_lens_q",
                                "cu_seq_lens_k")
# Model types whose attention hands its relative position bias to the attention function as ``position_bias``
# ``[1 or B, H, L, S]`` (the mask apart, not folded in), added to the scaled scores (T5 scales by 1.0) before the
# mask: fastpeft passes it to the kernels as their ``attn_bias``. Checked against T5's own attention on transformers
# 5.17 and 5.24 (MT5's is a copy). Other models that pass a ``position_bias`` (UMT5, LongT5, LayoutLMv3, ...) are
# refused per call until checked, and by ``relative_attention_num_buckets`` in their config where they have it.
POSITION_BIAS_MODEL_TYPES = ("t5", "mt5")
# Model types whose hand-written disentangled relative-position attention (``config.relative_attention``) fastpeft
# computes: ``handwritten_deberta`` patches their attention modules, the disentangled terms as the kernels' attn_bias.
DISENTANGLED_ATTENTION_MODEL_TYPES = ("deberta", "deberta-v2")
# Configuration attributes that switch on attention features the kernels do not compute, with the feature's name:
# a model whose config sets one (to anything but None/False/0) is refused by name before anything runs, except the
# model types listed with the attribute, whose attention fastpeft computes with that feature.
UNSUPPORTED_CONFIG_FEATURES = (
    ("attn_logit_softcapping", "attention logit soft-capping", ()),
    ("relative_attention_num_buckets", "a relative position bias added to the attention scores",
     POSITION_BIAS_MODEL_TYPES),
    ("relative_attention", "disentangled relative-position attention", DISENTANGLED_ATTENTION_MODEL_TYPES),
    ("alibi", "ALiBi position biases", ()),
    ("attention_chunk_size", "chunked attention", ()),
)


def check_supported_model(model, user, prefix_kwargs=True, handwritten_families=False):
    """Raise ``UnsupportedModelError`` (a ValueError) unless ``model`` (a transformers ``PreTrainedModel``) computes
    its attention through transformers' attention interface with plain softmax attention, which fastpeft's kernels
    reproduce.

    The test is by mechanism, not by family: every ``PreTrainedModel`` in ``model`` must route attention through
    ``ALL_ATTENTION_FUNCTIONS`` (``compat.uses_attention_interface``) and, with ``prefix_kwargs`` (prefix tuning,
    ``AdapterBank``, ``MultiPrefixTrainer``: the prefix travels as a keyword argument), hand keyword arguments down
    to it (``compat.passes_kwargs_to_attention``); the config must switch on none of ``UNSUPPORTED_CONFIG_FEATURES``;
    attention sinks are refused by their parameters. What only shows per call (a sliding window shorter than prefix +
    sequence, soft-capping or sinks passed as keyword arguments, a ``position_bias`` from a model type not in
    ``POSITION_BIAS_MODEL_TYPES``, 4-D or custom masks) is refused by ``fastpeft_attention_forward`` /
    ``fastpeft_mask``. ``user`` names the caller in the message. With ``handwritten_families`` (``accelerate``, which
    patches them: ``handwritten.patch``), hand-written attention of a family in ``handwritten`` passes too, where
    its family takes the prefix (or ``prefix_kwargs`` is False)."""
    from . import compat, handwritten

    if not any(compat.is_pretrained_model(module) for module in model.modules()):
        # PEFT runs prompt learning on any nn.Module with a config; fastpeft computes attention only where
        # transformers' attention interface hands it over.
        raise UnsupportedModelError(f"{user} cannot run {type(model).__name__}: it holds no transformers "
                                    "PreTrainedModel, whose attention interface fastpeft replaces")
    for module in model.modules():
        if not compat.is_pretrained_model(module):
            continue
        if not compat.uses_attention_interface(module):
            family = handwritten.family_of(module) if handwritten_families else None
            if family is None:
                raise UnsupportedModelError(
                    f"{user} cannot run {type(module).__name__}: its attention does not go through transformers' "
                    "attention interface on this transformers release (hand-written attention), so fastpeft cannot "
                    "replace it")
            refusal = family.prefix_refusal(module) if prefix_kwargs else None
            if refusal:
                raise UnsupportedModelError(f"{user} cannot hand a prefix to {type(module).__name__}: {refusal}")
            continue
        if prefix_kwargs and not compat.passes_kwargs_to_attention(module):
            raise UnsupportedModelError(
                f"{user} cannot hand a prefix to {type(module).__name__}: the class does not declare "
                "_supports_attention_backend on this transformers release, i.e. that keyword arguments reach its "
                "attention functions, which is how fastpeft hands each layer its prefix")
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        for attribute, feature, computed_for in UNSUPPORTED_CONFIG_FEATURES:
            value = _feature_setting(config, attribute)
            if value and getattr(config, "model_type", None) not in computed_for:
                raise UnsupportedModelError(
                    f"{user} cannot run {type(model).__name__} (model type {getattr(config, 'model_type', None)!r}): "
                    f"its attention uses {feature} (config.{attribute}={value!r}), which fastpeft's kernels do not "
                    "compute")
    for name, _ in model.named_parameters():
        if name.rsplit(".", 1)[-1] in ("sinks", "s_aux"):
            raise UnsupportedModelError(f"{user} cannot run {type(model).__name__}: its attention has attention "
                                        f"sinks ({name}), which fastpeft's kernels do not compute")


def _feature_setting(config, attribute):
    """``config.<attribute>``, or, where it differs between layers (``compat.config_attribute``), the layers' values
    that switch it on (a tuple, empty when no layer does). A configuration that cannot give it at all is refused."""
    from . import compat

    try:
        return compat.config_attribute(config, attribute)
    except compat.ConfigReadError as error:
        values = compat.layer_attribute_values(config, attribute) if error.per_layer else None
        if values is None:
            raise UnsupportedModelError(f"fastpeft cannot read the model configuration's {attribute}, which decides "
                                        f"whether its attention is one the kernels compute: {error}") from None
        return tuple(value for value in values if value)


def _no_prefix(key, columns=1):
    """A one-entry prefix of valid length 0 (``prefix_lengths = [0]``): attention over the sequence alone, through
    the same kernels. The entry has one (invisible) column rather than none, so that no backend has to handle a
    zero-size prefix axis; ``columns=0`` for calls with a position bias, which run on the sdpa/reference paths (they
    take an empty prefix) and whose bias then needs no prefix column. Returns prefix_k, prefix_v
    ``[1, Hkv, columns, D]``, prefix_index ``[B]`` and prefix_lengths ``[1]``."""
    B, Hkv, _, D = key.shape
    empty = key.new_zeros(1, Hkv, columns, D)
    index = torch.zeros(B, dtype=torch.int32, device=key.device)
    lengths = torch.zeros(1, dtype=torch.int32, device=key.device)
    return empty, empty, index, lengths


def _prefix_position_bias(relative, query_length, key_length, prefix_length, row_lengths=None, row_contexts=None):
    """The position bias ``[1, H, L, P]`` of the P prefix columns as T5 computes it when the prefix is a cache of P
    tokens before the ``key_length`` keys (PEFT's prefix tuning): its own ``compute_bias`` with the prefix entries at
    positions ``0 .. P-1`` and query i (of the L last keys' positions) at ``P + key_length - L + i``.

    ``row_lengths`` ``[B]``: each row's own prefix length ``n <= P`` (a ragged prefix table read through
    ``prefix_index``: ``AdapterBank``), a cache of n tokens in PEFT. Row b's entry p then sits ``n - p`` before its
    keys, as column ``p + P - n`` of the P-token cache does: its columns are those, shifted (the ones past n, hidden by
    the row's length, repeat the last). Returns ``[B, H, L, P]`` then.

    ``row_contexts`` ``[B]``: each row's own tokens before its queries, where rows differ (keys gathered right-aligned
    from a paged pool: ``key_length - query_length`` is the longest row's). Row b's entry p then sits
    ``n + row_contexts[b] + i - p`` before query i: its column of a bias computed over ``M = P + max(contexts)``
    memory positions with the queries at ``M + i``."""
    if row_contexts is not None:
        rows = row_contexts.shape[0]
        lengths = (row_lengths if row_lengths is not None else
                   torch.full((rows,), prefix_length, device=row_contexts.device)).to(row_contexts.device).long()
        memory = prefix_length + key_length - query_length   # >= n + context of every row
        columns = relative.compute_bias(query_length, memory, past_seen_tokens=memory)
        shifted = torch.arange(prefix_length, device=row_contexts.device) + (memory - lengths - row_contexts)[:, None]
        index = shifted.clamp(max=memory - 1).to(columns.device)[:, None, None, :].expand(rows, columns.shape[1],
                                                                                          query_length, prefix_length)
        return columns.expand(rows, *columns.shape[1:]).gather(3, index)
    columns = relative.compute_bias(query_length, prefix_length,
                                    past_seen_tokens=prefix_length + key_length - query_length)
    if row_lengths is None:
        return columns
    rows = row_lengths.shape[0]
    shifted = torch.arange(prefix_length, device=columns.device) + (prefix_length - row_lengths.to(columns.device)
                                                                     .long())[:, None]
    index = shifted.clamp(max=prefix_length - 1)[:, None, None, :].expand(rows, *columns.shape[1:])
    return columns.expand(rows, *columns.shape[1:]).gather(3, index)


def _attention_bias(module, position_bias, query, key, prefix_columns, relative=None, row_lengths=None,
                    row_contexts=None):
    """T5's ``position_bias`` ``[1 or B, H, L, S]`` as the kernels' ``attn_bias`` over ``[prefix ; keys]``, in the
    query's dtype (differentiably: a model that trains its relative attention bias gets its gradient), or None.

    T5 computes it over the keys it sees. A prefix outside the cache (fastpeft's prefix tuning) needs its columns too,
    as T5 computes them over a cache of P tokens: from ``relative`` (``DecoderSelfAttentionPrefix.relative_bias``)
    where given, for each row's own prefix length ``row_lengths`` ``[B]`` where the prefix is a ragged table; a bias
    without them is refused otherwise."""
    if position_bias is None:
        return None
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    if model_type not in POSITION_BIAS_MODEL_TYPES:
        raise ValueError(f"{type(module).__name__} (model type {model_type!r}) passes position_bias to its attention "
                         "function; fastpeft attention computes it only for "
                         f"{', '.join(POSITION_BIAS_MODEL_TYPES)} models, whose semantics it was checked against")
    S = key.shape[2]
    if not isinstance(position_bias, torch.Tensor) or position_bias.dim() != 4 or \
            position_bias.shape[-1] not in (S, prefix_columns + S):
        raise ValueError(f"{type(module).__name__} passes a position_bias of shape "
                         f"{tuple(getattr(position_bias, 'shape', ()))}; fastpeft attention takes one "
                         f"[1 or B, H, L, S={S}] over the keys")
    if position_bias.shape[-1] != prefix_columns + S and relative is not None:
        columns = _prefix_position_bias(relative, query.shape[2], S, prefix_columns, row_lengths,
                                        row_contexts).to(position_bias.dtype)
        rows = max(columns.shape[0], position_bias.shape[0])
        position_bias = torch.cat([columns.expand(rows, *columns.shape[1:]),
                                   position_bias.expand(rows, *position_bias.shape[1:])], dim=-1)
    if position_bias.shape[-1] != prefix_columns + S:
        raise ValueError(f"{type(module).__name__}'s position_bias covers its {S} keys but not the {prefix_columns} "
                         "prefix columns: a relative position bias over a prefix held outside the cache is not "
                         "supported by fastpeft attention")
    return position_bias.to(query.dtype)


def _sliding_window_bias(window, spec, prefix_k, query, key):
    """Sliding-window attention as an additive bias ``[1 or B, 1, L, P + S]`` (0 inside the window, -inf outside), in
    transformers' terms: key ``kv`` is visible to query ``q`` iff ``kv > q - window``, counted in the cache of the
    computation fastpeft reproduces, the prefix first (``PrefixSpec.query_positions``). A sequence key's distance to
    a query is ``S - L + i - j`` (real tokens are contiguous, also after the cache evicted old ones); prefix entry
    ``p`` sits ``query_positions[i] - p`` before query ``i``. Tables (``AdapterBank``, ``MultiPrefixTrainer``) and a
    prefix keyword without positions are refused."""
    L, S, P = query.shape[2], key.shape[2], prefix_k.shape[-2]
    device = query.device
    rows = torch.arange(L, device=device)[:, None]
    seq_visible = ((S - L + rows) - torch.arange(S, device=device)[None, :] < window)[None]
    if spec is None:  # no prefix: its one placeholder column is invisible anyway
        prefix_visible = torch.ones(1, L, P, dtype=torch.bool, device=device)
    elif prefix_k.dim() == 4 or spec.query_positions is None:
        raise ValueError(f"sliding-window attention (window {window}) over prefix + sequence length {P + S} is "
                         "supported for accelerate's shared prefix, not for prefix tables (AdapterBank, "
                         "MultiPrefixTrainer: per-row positions)")
    else:
        positions = spec.query_positions.to(device)[:, -L:, None]
        prefix_visible = positions - torch.arange(P, device=device)[None, None, :] < window
    visible = torch.cat([prefix_visible, seq_visible.expand(prefix_visible.shape[0], L, S)], dim=2)
    zero = torch.zeros((), dtype=query.dtype, device=device)
    return torch.where(visible, zero, torch.tensor(float("-inf"), dtype=query.dtype, device=device))[:, None]


def _pad_keys_to_queries(key, value, attention_mask, attn_bias, length):
    """Cross-attention can have fewer keys than queries (a decoder input longer than the encoder's), which the
    kernels' bottom-right alignment does not allow (S >= L). Without causality the alignment means nothing, so append
    ``length - S`` masked-out zero keys: invisible, they change no score. Returns key/value ``[B, Hkv, length, D]``,
    the ``[B, length]`` bool key padding mask and ``attn_bias`` (None, or with ``length - S`` zero columns more)."""
    B, _, S, _ = key.shape
    extra = length - S
    if attention_mask is None:
        attention_mask = torch.ones(B, S, dtype=torch.bool, device=key.device)
    padded_mask = torch.cat([attention_mask.to(torch.bool), attention_mask.new_zeros(B, extra, dtype=torch.bool)],
                            dim=1)
    if attn_bias is not None:
        attn_bias = torch.nn.functional.pad(attn_bias, (0, extra))
    pad = (0, 0, 0, extra)
    return torch.nn.functional.pad(key, pad), torch.nn.functional.pad(value, pad), padded_mask, attn_bias


def _key_padding_mask(attention_mask):
    """The ``[B, S]`` bool key padding mask (or None) of what a model hands its attention function: ``fastpeft_mask``'s
    ``[B, 1, 1, S]`` (possibly sliced along its query axis by the model), or ``[B, S]``. A 4-D boolean mask of one
    query row says which keys every query may see, which is what the kernels take with the module's causality;
    anything else (an additive float mask, one row per query: a custom 4-D mask) is refused."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        if attention_mask.dim() == 2:
            return attention_mask
        if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
            return attention_mask[:, 0, 0]
    raise ValueError("fastpeft attention takes a boolean key padding mask [B, 1, 1, S] or [B, S]; this model passed "
                     f"a {getattr(attention_mask, 'dtype', type(attention_mask).__name__)} mask of shape "
                     f"{tuple(getattr(attention_mask, 'shape', ()))} (a custom 4-D mask is not supported)")


def fastpeft_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, **kwargs):
    """transformers attention function. query ``[B, Hq, L, D]``, key/value ``[B, Hkv, S, D]`` (the cache
    included), attention_mask ``[B, 1, 1, S]`` bool or None (from ``fastpeft_mask``; ``[B, S]`` too). Returns
    ``([B, L, Hq, D], None)``.
    ``position_bias`` (T5: ``[1 or B, H, L, S]``, the mask not folded in) is added to the ``scaling``-scaled scores
    before the mask, as T5's own attention does; ``scaling`` None means ``1/sqrt(D)``, T5 passes 1.0.
    """
    attention_mask = _key_padding_mask(attention_mask)
    unsupported = [name for name in UNSUPPORTED_ATTENTION_KWARGS if kwargs.get(name) is not None]
    if unsupported:
        raise ValueError(f"{type(module).__name__} passes {', '.join(unsupported)} to its attention function; "
                         "fastpeft attention does not implement that (it would change the attention scores)")
    spec = kwargs.get(PREFIX_KWARG)
    relative = getattr(spec, "relative_bias", None)
    if spec is not None:
        spec = spec.for_module(module)
    paged = kwargs.get(PAGED_KWARG)
    if paged is not None and hasattr(paged, "for_module"):   # an encoder-decoder's: self- or cross-attention view
        paged = paged.for_module(module)
    position_bias = kwargs.get("position_bias")
    if isinstance(position_bias, torch.Tensor) and key.shape[2] == 0 and position_bias.shape[-1] == 0:
        # T5's cross-attention bias (zeros) over the empty placeholder of a paged decode step: it adds nothing.
        position_bias = None
    if spec is not None:
        prefix_k, prefix_v = spec.layer(getattr(module, "layer_idx", None))
        if prefix_k is None:  # a layer the prefix skips (PEFT's prefix tuning of Gemma models)
            spec = None
    if spec is None:
        prefix_k, prefix_v, prefix_index, prefix_lengths = _no_prefix(key, 0 if position_bias is not None else 1)
    else:
        prefix_index, prefix_lengths = spec.prefix_index, spec.prefix_lengths
        if prefix_k.dtype != query.dtype or prefix_k.device != query.device:
            # The prefix is built once in the model's dtype on its first device; activations can differ (a
            # quantized backbone computing in bnb's compute dtype, layers spread by a device map). Cast/move per
            # layer, differentiably; autocast is handled below.
            prefix_k = prefix_k.to(device=query.device, dtype=query.dtype)
            prefix_v = prefix_v.to(device=query.device, dtype=query.dtype)
            if prefix_index is not None:
                prefix_index = prefix_index.to(query.device)
            if prefix_lengths is not None:
                prefix_lengths = prefix_lengths.to(query.device)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)

    dtype = autocast_dtype(query.device.type)
    if dtype is not None:
        # RoPE's fp32 cos/sin promote q and k to fp32 while v leaves its autocast matmul in bf16/fp16.
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        prefix_k, prefix_v = prefix_k.to(dtype), prefix_v.to(dtype)
    if paged is not None and paged.decode:
        out = _paged_decode(module, paged, query, prefix_k, prefix_v, prefix_index, prefix_lengths, attention_mask,
                            scaling, position_bias, kwargs.get("sliding_window"), dropout)
        return out.transpose(1, 2), None
    # A ragged prefix table (AdapterBank) gives each row its own prefix length, which T5's bias columns depend on.
    row_lengths = None
    if relative is not None and spec is not None and spec.prefix_index is not None and prefix_lengths is not None:
        row_lengths = prefix_lengths[prefix_index.long()]
    # Over a paged pool's gathered keys (right-aligned), each row's queries follow its own context, which the prefix
    # columns' bias depends on too.
    row_contexts = getattr(paged, "context_lens_tensor", None) if spec is not None else None
    attn_bias = _attention_bias(module, position_bias, query, key, prefix_k.shape[-2], relative, row_lengths,
                                row_contexts)
    if not causal and key.shape[2] < query.shape[2]:
        key, value, attention_mask, attn_bias = _pad_keys_to_queries(key, value, attention_mask, attn_bias,
                                                                     query.shape[2])

    sliding_window = kwargs.get("sliding_window")
    if sliding_window is not None and prefix_k.shape[-2] + key.shape[2] > sliding_window:
        window = _sliding_window_bias(sliding_window, spec, prefix_k, query, key)
        attn_bias = window if attn_bias is None else attn_bias + window

    out = prefix_attention_with_dropout(module, query, key, value, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                        attention_mask, bool(causal), scaling, attn_bias,
                                        dropout if module.training else 0.0,
                                        plan_cache=None if spec is None else spec.plan_cache)
    return out.transpose(1, 2), None


def _paged_decode(module, paged, query, prefix_k, prefix_v, prefix_index, prefix_lengths, attention_mask, scaling,
                  position_bias, sliding_window, dropout):
    """One decode step of ``module`` over the paged pool of ``paged`` (a ``PagedKVCache`` whose layer already wrote
    the new token): ``[B, Hq, 1, D]``. The op covers plain softmax attention over the prefix entry and the row's tokens;
    anything that would change the scores is refused rather than dropped."""
    name = type(module).__name__
    if attention_mask is not None and not getattr(paged, "model_mask_redundant", False):
        raise ValueError(f"{name}: a paged decode step takes no attention mask (each row's keys are its seq_lens "
                         "tokens in the pool); pass PagedKVCache.attention_mask(), which is None for decode")
    if position_bias is not None:
        raise ValueError(f"{name} passes a position bias to its attention; fastpeft's paged decode does not add one")
    if sliding_window is not None and prefix_k.shape[-2] + paged.max_seq_len > sliding_window:
        raise ValueError(f"{name}'s sliding window ({sliding_window}) may cut into prefix + sequence (up to "
                         f"{prefix_k.shape[-2]} + {paged.max_seq_len} keys); fastpeft's paged decode does not "
                         "implement sliding-window attention")
    if dropout and module.training:
        raise ValueError(f"{name} is in training mode with attention dropout; paged decode is inference only")
    key_cache, value_cache = paged.layer_storage(getattr(module, "layer_idx", None))
    if key_cache.dtype != query.dtype:
        raise ValueError(f"{name} computes in {query.dtype} but the paged KV pool holds {key_cache.dtype}")
    return paged_prefix_decode_prevalidated(query, key_cache, value_cache, paged.block_table, paged.seq_lens,
                                            prefix_k, prefix_v, prefix_index, prefix_lengths, scaling)


def autocast_dtype(device_type, default=None):
    """The dtype autocast runs matmuls in on ``device_type`` while it is enabled there, else ``default``. Under
    autocast an attention's q, k and v can arrive in different dtypes (fp32 rotary tables or biases promote some of
    them, the projections' autocast matmuls leave the others in bf16/fp16): the fastpeft attention computes in this
    dtype, as SDPA's and eager attention's autocast matmuls do."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def prefix_attention_with_dropout(module, query, key, value, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                  key_padding_mask, causal, softmax_scale, attn_bias, dropout, plan_cache=None):
    """One attention call of ``module`` (a transformers attention module or a hand-written family's) with attention
    dropout ``dropout`` (the probability; 0 outside training). Arguments as ``prefix_attention_prevalidated``'s,
    ``softmax_scale`` None meaning ``1/sqrt(D)``. Returns ``[B, Hq, L, D]``.

    Without dropout, the kernels. The kernels have no attention dropout: with it, the reference path, which applies
    it to the probabilities as eager attention does, so training with dropout stays correct, only unfused (warned
    once per module class and rate)."""
    if not dropout:
        return prefix_attention_prevalidated(query, key, value, prefix_k, prefix_v, prefix_index=prefix_index,
                                             prefix_lengths=prefix_lengths, key_padding_mask=key_padding_mask,
                                             causal=causal, softmax_scale=softmax_scale, attn_bias=attn_bias,
                                             plan_cache=plan_cache)
    environment.warn_once(f"attention dropout p={dropout} is not fused; {type(module).__name__} uses the "
                       "unfused PyTorch path while training (set the model's attention dropout to 0 for speed)")
    if prefix_k.dim() == 3:  # a prefix shared by every row: the reference path takes a one-entry table
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
        prefix_index = None
    B, T, P = query.shape[0], prefix_k.shape[0], prefix_k.shape[2]
    index = prefix_index if prefix_index is not None else torch.zeros(B, dtype=torch.long, device=query.device)
    lengths = prefix_lengths if prefix_lengths is not None else torch.full((T,), P, device=query.device)
    scale = softmax_scale if softmax_scale is not None else query.shape[-1] ** -0.5
    return reference_prefix_attention(query, key, value, prefix_k, prefix_v, index, lengths, key_padding_mask, causal,
                                      scale, dropout_p=dropout, attn_bias=attn_bias)


def fastpeft_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, config=None, cache_position=None, **kwargs):
    """transformers mask function: the key padding mask ``[B, 1, 1, kv_length]`` (bool, broadcast over heads and
    queries), or None when the model got no attention_mask (or, on CPU, one without padding). Causality is the
    kernels' job. Mask patterns the kernels cannot express are refused, never ignored.

    Only ``kv_length``, ``mask_function``, ``attention_mask`` and ``config`` matter. transformers calls mask
    functions by keyword, with ``q_length``/``q_offset`` in recent releases and ``cache_position`` (the query
    positions) in older ones: both are accepted and neither is needed."""
    if kv_length is None:
        raise ValueError("fastpeft_mask needs kv_length (the number of keys attention sees)")
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    plain = mask_function in (None, causal_mask_function, bidirectional_mask_function)
    # Sliding-window layers pass a composed mask function; fastpeft_attention_forward applies the window from its
    # ``sliding_window`` keyword (``_sliding_window_bias``) where it cuts into prefix + sequence.
    if not plain and not _feature_setting(config, "sliding_window"):
        raise ValueError("fastpeft attention supports causal and bidirectional masks with padding; this call "
                         "uses another mask pattern (packed sequences via position_ids, or a custom mask function)")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[1] != kv_length:
        raise ValueError(f"the 2-D attention_mask covers {attention_mask.shape[1]} keys but attention sees "
                         f"{kv_length}; a static cache is not supported by fastpeft attention")
    # On an accelerator the mask is returned even when every key is real: testing that (``mask.all()``) would
    # synchronize with the device on every forward and decode step, while a mask of ones costs the kernels only its
    # reads. On CPU the test is a plain read, once per forward, and spares every layer its mask handling.
    if attention_mask.device.type == "cpu" and bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, :]


def register():
    """Make ``"fastpeft"`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, fastpeft_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fastpeft_mask)


def use_fastpeft_attention(model):
    """Switch ``model`` (a transformers ``PreTrainedModel`` instance) to fastpeft attention. Returns the previous
    ``attn_implementation`` so the caller can restore it with ``compat.set_attn_implementation(model, previous)``."""
    from . import compat

    register()
    previous = model.config._attn_implementation
    if compat.uses_attention_interface(model):
        compat.set_attn_implementation(model, ATTN_IMPLEMENTATION)
    return previous
