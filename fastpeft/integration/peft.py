"""``fastpeft.accelerate`` / ``fastpeft.restore``: PEFT prompt-learning models on fastpeft's fused attention.

``accelerate(peft_model)`` makes instance-level, undoable changes only (no class or module is patched):

* the backbone's ``attn_implementation`` becomes ``"fastpeft"`` (see ``fastpeft.integration.attention``), so
  attention runs through ``fastpeft.prefix_attention`` with the 2-D key padding mask handled in the kernels;
* for prefix tuning, the instance gets its own ``forward`` and (causal LMs) ``generate``. The prompt encoder runs
  once per call on ``arange(P)`` (not once per row), its output is split into per-layer ``[Hkv, P, D]`` prefix K/V
  and handed to every attention call as the ``fastpeft_prefix`` keyword. Nothing is expanded per row, nothing is
  copied into a KV cache, no 4-D mask is built, and gradients flow from the kernels' prefix gradient (the sum over
  the batch) back into the prompt encoder;
* prompt tuning and p-tuning keep PEFT's own forward (the virtual tokens are input embeddings there, so PEFT's
  semantics come for free; only attention changes); their ``generate`` runs the virtual tokens through the
  backbone once and serves their K/V as a shared prefix, like prefix tuning's;
* hand-written attention of a family in ``handwritten`` (DeBERTa's disentangled attention; GPT-J's on transformers
  5.17) is computed through an instance patch of its attention modules (``handwritten.patch``), which ``restore``
  undoes;
* a backbone whose attention fastpeft cannot compute (other hand-written attention such as Falcon's up to
  transformers 5.24, or a feature the kernels lack) is left untouched on PEFT's own path with a ``FallbackWarning``
  naming why (``strict=True`` raises); a layer whose attention turns out not to take its prefix at a call (it drops
  keyword arguments although its class declares that it passes them) makes that call raise
  (``attention.PrefixSpec.check_consumed``);
* PEFT's refusal of prefix tuning under gradient checkpointing (``_setup_prompt_encoder``, peft#869/#2191) is
  lifted for this instance: with the prefix outside the cache, checkpoint recomputation is correct.

PEFT's semantics are reproduced exactly (``/work/shared/PEFT_NOTES.md``): prefix keys per KV head and never
rotated; in ``forward`` the real tokens get the positions the backbone gives them after a cache of P tokens
(``P .. P+L-1`` whatever the padding for most models; OPT and RoBERTa count pad-aware, see
``_prefix_position_ids``; user ``position_ids`` get ``+P``); in ``generate`` positions are pad-aware,
``cumsum(mask) - 1 + P``.
"""

import dataclasses
import functools
import warnings

import torch

from ..adapters import BaseGeometry, split_prefix
from . import attention, compat, handwritten

STATE_ATTR = "_fastpeft_acceleration"
# Set instead of STATE_ATTR when accelerate() left the model on PEFT's path: the reason, as the warning gave it.
FALLBACK_ATTR = "_fastpeft_fallback"
# Instance attributes accelerate() sets on the PeftModel; restore() deletes exactly these.
_OVERRIDDEN_METHODS = ("forward", "generate", "_setup_prompt_encoder")


class _AccelerationState:
    """What ``restore`` needs: the backbone's previous attention implementation."""

    def __init__(self, previous_attn_implementation, undo_handwritten):
        self.previous_attn_implementation = previous_attn_implementation
        self.undo_handwritten = undo_handwritten  # handwritten.patch's undo (hand-written attention)
        self.position_scheme = None  # compat.position_scheme of the backbone, found at the first forward
        self.decoder_layers = None  # an encoder-decoder's decoder layer count, found at the first prefix forward
        self.checkpointable = None  # the backbone's modules with a gradient_checkpointing flag, ditto
        self.kv_sharing_sources = None  # compat.kv_sharing_sources of the backbone, ditto


def _peft_types():
    """PREFIX_TUNING, then the types whose virtual tokens are input embeddings (PEFT's own forward runs them)."""
    from peft import PeftType

    return PeftType.PREFIX_TUNING, PeftType.PROMPT_TUNING, PeftType.P_TUNING, PeftType.CPT


def _supported_peft_classes():
    from peft import (PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForSeq2SeqLM,
                      PeftModelForSequenceClassification)

    return (PeftModelForCausalLM, PeftModelForSequenceClassification, PeftModelForFeatureExtraction,
            PeftModelForSeq2SeqLM)


def _check_adapter_type(peft_model, adapter_name):
    types = _peft_types()
    config = peft_model.peft_config[adapter_name]
    if config.peft_type not in types:
        raise ValueError(f"fastpeft.accelerate supports {', '.join(t.value for t in types)} adapters; "
                         f"adapter {adapter_name!r} is {config.peft_type.value}")


def _check_peft_config(peft_model, adapter_name):
    """Raise ValueError for an adapter configuration fastpeft cannot run with PEFT's exact numbers on this
    backbone."""
    _check_adapter_type(peft_model, adapter_name)
    prefix_tuning = _peft_types()[0]
    config = peft_model.peft_config[adapter_name]
    encoder_decoder = getattr(peft_model.get_base_model().config, "is_encoder_decoder", False)
    if config.peft_type != prefix_tuning:
        if not encoder_decoder and getattr(config, "num_transformer_submodules", 1) not in (None, 1):
            raise ValueError(f"adapter {adapter_name!r} has num_transformer_submodules="
                             f"{config.num_transformer_submodules}, for an encoder-decoder; the backbone has one")
        return
    if encoder_decoder:
        _check_encoder_decoder_prefix_config(peft_model, adapter_name)
    base = peft_model.get_base_model()
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    num_layers = compat.config_attribute(text_config, "num_hidden_layers")
    if config.num_layers != num_layers:
        raise ValueError(f"prefix-tuning adapter {adapter_name!r} has num_layers={config.num_layers} but the "
                         f"backbone has {num_layers} attention layers")
    if config.token_dim % config.num_attention_heads:
        raise ValueError(f"prefix-tuning adapter {adapter_name!r} has token_dim={config.token_dim}, not a multiple "
                         f"of num_attention_heads={config.num_attention_heads}")
    if _peft_sizes_prefix_per_layer(base):
        return  # each layer's share of the prefix is sized at every call, as PEFT does: _gemma_layer_prefixes
    geometry = BaseGeometry.of(text_config)
    geometry.require_uniform(f"prefix-tuning adapter {adapter_name!r} (PEFT slices a prefix per layer only for "
                             "Gemma models)")
    kv_heads, head_dim = geometry.num_kv_heads, geometry.head_dim
    if config.num_attention_heads != kv_heads or config.token_dim != kv_heads * head_dim:
        raise ValueError(
            f"prefix-tuning adapter {adapter_name!r} stores its prefix as num_attention_heads="
            f"{config.num_attention_heads} x head size {config.token_dim // config.num_attention_heads}, but the "
            f"backbone's attention has {kv_heads} KV heads of size {head_dim}: the prefix cannot be split into "
            "per-KV-head keys and values")


def _check_encoder_decoder_prefix_config(peft_model, adapter_name):
    """The encoder-decoder prefix-tuning configurations PEFT runs (``encoder_decoder_prefix_spec``): its cache has
    ``num_transformer_submodules=2`` (self- and cross-attention halves), ``num_layers`` self-attention layers of
    ``num_attention_heads`` heads, which the decoder's layers must not outnumber (PEFT fails with an IndexError) and
    whose head count the decoder's self-attention must have (PEFT fails concatenating the cache). Raise ValueError
    naming the mismatch."""
    config = peft_model.peft_config[adapter_name]
    base = peft_model.get_base_model()
    if config.num_transformer_submodules != 2:
        raise ValueError(f"prefix-tuning adapter {adapter_name!r} of the encoder-decoder {type(base).__name__} has "
                         f"num_transformer_submodules={config.num_transformer_submodules}; PEFT's encoder-decoder "
                         "prefix (a self- and a cross-attention cache) has 2")
    decoder_layers = getattr(base.config, "decoder_layers", None) or getattr(base.config, "num_decoder_layers", None)
    if decoder_layers is not None and decoder_layers > config.num_layers:
        raise ValueError(f"prefix-tuning adapter {adapter_name!r} has num_layers={config.num_layers} but the decoder "
                         f"of {type(base).__name__} has {decoder_layers} layers: PEFT's prefix covers num_layers "
                         "decoder layers (it fails on the others)")
    decoder_heads = getattr(base.config, "decoder_attention_heads", None)
    if decoder_heads is not None and decoder_heads != config.num_attention_heads:
        raise ValueError(f"prefix-tuning adapter {adapter_name!r} stores its prefix in num_attention_heads="
                         f"{config.num_attention_heads} heads but the decoder of {type(base).__name__} has "
                         f"{decoder_heads} (PEFT fails on that too)")


def _decoder_self_attention_layers(base):
    """The ``layer_idx`` of every decoder self-attention module of the encoder-decoder ``base``, in order
    (``attention.is_decoder_self_attention``). Raises ``attention.UnsupportedModelError`` unless they number the
    decoder's layers ``0 .. n-1`` once each and no module outside the decoder passes for one: else the prefix could
    reach the wrong attention."""
    decoder = base.get_decoder()
    inside = {id(module) for module in decoder.modules()}
    found, stray = [], []
    for name, module in base.named_modules():
        if attention.is_decoder_self_attention(module):
            (found if id(module) in inside else stray).append((name, getattr(module, "layer_idx", None)))
    layers = [layer_idx for _, layer_idx in found]
    if stray or not layers or layers != list(range(len(layers))):
        raise attention.UnsupportedModelError(
            f"fastpeft cannot tell {type(base).__name__}'s decoder self-attention modules apart (by is_decoder and "
            f"is_causal): found {found} in the decoder and {stray} outside it, expected one per decoder layer "
            "numbered 0, 1, ... by layer_idx")
    return layers


def _check_backbone(peft_model):
    """The backbone checks of ``attention.check_supported_model``; the keyword-passing requirement only where an
    adapter is prefix tuning (prompt tuning, p-tuning and CPT hand attention nothing but the sequence)."""
    base = peft_model.get_base_model()
    prefix = any(config.peft_type == _peft_types()[0] for config in peft_model.peft_config.values())
    encoder_decoder = getattr(base.config, "is_encoder_decoder", False)
    # Encoder-decoders (BART, T5) hand keyword arguments to attention without declaring it: the prefix's arrival at
    # every decoder self-attention is checked at every call instead (PrefixSpec.check_consumed).
    attention.check_supported_model(base, "fastpeft.accelerate", prefix_kwargs=prefix and not encoder_decoder,
                                    handwritten_families=True)
    for name in ("layerdrop", "decoder_layerdrop") if prefix else ():
        rate = compat.config_attribute(base.config, name)
        if rate:
            raise attention.UnsupportedModelError(
                f"fastpeft.accelerate cannot run prefix tuning on {type(base).__name__} with LayerDrop "
                f"(config.{name}={rate}): a layer skipped at random in training takes no prefix, which the check "
                "that every layer's attention received its prefix cannot tell from a layer that drops it")
    if prefix and encoder_decoder:
        if compat.decoder_position_embedding(base) is None and compat.decoder_relative_bias(base) is None:
            raise attention.UnsupportedModelError(
                f"fastpeft.accelerate cannot run prefix tuning on {type(base).__name__}: PEFT numbers the decoder's "
                "positions after its prefix cache, and this decoder has no position embedding "
                "(decoder.embed_positions) or relative attention bias (T5's) fastpeft can shift without one")
        _decoder_self_attention_layers(base)


class FallbackWarning(UserWarning):
    """``fastpeft.accelerate`` left a model on PEFT's own path (its backbone's attention is one fastpeft cannot
    compute); the message names why. ``accelerate(model, strict=True)`` raises instead."""


def accelerate(peft_model, *, strict=False):
    """Run a PEFT prompt-learning model's attention through fastpeft's fused prefix attention.

    Arguments:
        peft_model: a ``peft.PeftModelForCausalLM``, ``PeftModelForSequenceClassification`` or
            ``PeftModelForFeatureExtraction`` whose backbone computes attention through transformers' attention
            interface with plain softmax attention (Llama, Mistral, Qwen2/3, GPT-2, OPT, GPT-J, Gemma 3, Gemma 4,
            Phi, GPT-NeoX, BERT, RoBERTa, ...; see ``attention.check_supported_model``) or by hand in a family fastpeft
            patches per instance (``handwritten_gptj``: GPT-J on transformers 5.17), and whose adapters are
            PREFIX_TUNING (with or without ``prefix_projection``), PROMPT_TUNING, P_TUNING or CPT; or a
            ``PeftModelForSeq2SeqLM`` with PROMPT_TUNING / P_TUNING adapters (BART; T5 and MT5, whose relative
            position bias the kernels add as their ``attn_bias``) or PREFIX_TUNING adapters (BART, T5, MT5). The
            backbone may be loaded in 4-bit or 8-bit through bitsandbytes. DeBERTa / DeBERTa-v2 backbones run
            PROMPT_TUNING and P_TUNING on fastpeft's kernels through an instance patch of their hand-written
            disentangled attention (``handwritten_deberta``); PEFT's prefix tuning never reaches their attention
            (they take no KV cache), so such adapters fall back.
        strict: what to do with a backbone whose attention fastpeft cannot compute (hand-written attention that
            bypasses the attention interface outside the ``handwritten`` families, such as Falcon's up to
            transformers 5.24, or a feature the kernels lack, named in the message). False (default): warn once with
            a ``FallbackWarning`` naming why and leave the model on PEFT's own path, untouched (same numbers, PEFT's
            speed; ``is_accelerated`` is False, ``restore`` is a no-op). True: raise ``ValueError`` instead.

    Returns:
        the same object, accelerated in place: forward outputs (logits, loss), prompt-parameter gradients,
        ``generate`` tokens and saved adapter files equal PEFT's. Calling it twice is a no-op.

    Raises:
        ValueError: for another PEFT model class or adapter type, a prefix-tuning configuration whose prefix does
            not split into the backbone's KV heads (or, on an encoder-decoder, one PEFT itself fails on), and, with
            ``strict=True``, a backbone fastpeft cannot compute (``attention.UnsupportedModelError``).
    """
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"fastpeft.accelerate takes a peft.PeftModel, got {type(peft_model).__name__}")
    if hasattr(peft_model, STATE_ATTR) or (hasattr(peft_model, FALLBACK_ATTR) and not strict):
        return peft_model
    compat.warn_if_untested("fastpeft.accelerate")
    if not isinstance(peft_model, _supported_peft_classes()):
        raise ValueError(f"fastpeft.accelerate supports "
                         f"{', '.join(cls.__name__ for cls in _supported_peft_classes())}, "
                         f"got {type(peft_model).__name__}")
    for adapter_name in peft_model.peft_config:
        _check_adapter_type(peft_model, adapter_name)
    # The backbone before the adapters' shapes: those are read from a transformers config, which a backbone
    # fastpeft leaves to PEFT (any nn.Module with a config) need not have.
    try:
        _check_backbone(peft_model)
    except attention.UnsupportedModelError as error:
        if strict:
            raise
        # A drop-in should not break a script over a model it cannot speed up: PEFT's own path gives PEFT's numbers.
        warnings.warn(f"{error}. The model stays on PEFT's own path (fastpeft.accelerate(model, strict=True) "
                      "raises instead)", FallbackWarning, stacklevel=2)
        setattr(peft_model, FALLBACK_ATTR, str(error))
        return peft_model
    for adapter_name in peft_model.peft_config:
        _check_peft_config(peft_model, adapter_name)

    previous = attention.use_fastpeft_attention(peft_model.get_base_model())
    undo_handwritten = handwritten.patch(peft_model.get_base_model())
    setattr(peft_model, STATE_ATTR, _AccelerationState(previous, undo_handwritten))
    # functools.partial rather than bound methods: a partial pickles and deep-copies by value (a bound method
    # pickles as getattr(model, function name), which the unpickled model would not have).
    from peft import PeftModelForCausalLM, PeftModelForSeq2SeqLM

    seq2seq = isinstance(peft_model, PeftModelForSeq2SeqLM)
    peft_model.forward = functools.partial(_accelerated_seq2seq_forward if seq2seq else _accelerated_forward,
                                           peft_model)
    peft_model._setup_prompt_encoder = functools.partial(_setup_prompt_encoder_allowing_checkpointing, peft_model)
    if isinstance(peft_model, PeftModelForCausalLM):
        peft_model.generate = functools.partial(_accelerated_generate, peft_model)
    elif seq2seq:
        peft_model.generate = functools.partial(_accelerated_seq2seq_generate, peft_model)
    return peft_model


def restore(peft_model):
    """Undo ``accelerate``: PEFT's own forward/generate and the backbone's previous attention implementation
    come back. Returns the same object (a model ``accelerate`` left on PEFT's path comes back as it was). Raises
    ValueError for a model ``accelerate`` was not applied to."""
    if hasattr(peft_model, FALLBACK_ATTR):
        delattr(peft_model, FALLBACK_ATTR)
        return peft_model
    state = getattr(peft_model, STATE_ATTR, None)
    if state is None:
        raise ValueError("fastpeft.restore: this model was not accelerated by fastpeft.accelerate")
    for name in _OVERRIDDEN_METHODS:
        peft_model.__dict__.pop(name, None)
    state.undo_handwritten()
    base = peft_model.get_base_model()
    if compat.uses_attention_interface(base):
        compat.set_attn_implementation(base, state.previous_attn_implementation)
    delattr(peft_model, STATE_ATTR)
    return peft_model


def fallback_reason(peft_model):
    """Why ``accelerate`` left this model on PEFT's own path, or None (accelerated, or never given to it)."""
    return getattr(peft_model, FALLBACK_ATTR, None)


def is_accelerated(peft_model):
    return hasattr(peft_model, STATE_ATTR)


# ---------------------------------------------------------------------------------------------------------------
# Prefix K/V straight from the prompt encoder


def prefix_spec(peft_model):
    """The active prefix-tuning adapter's per-layer K/V as a ``PrefixSpec`` of shared ``[Hkv, P, D]`` tensors.

    The encoder runs once on ``arange(P)`` (PEFT runs it on ``(B, P)`` ids, B identical rows); in inference mode
    PEFT reads ``embedding.weight`` directly, and so does this. The output is cast to the backbone's dtype like
    PEFT's and laid out ``[2 * num_layers, Hkv, P, D]`` in one copy, so every layer's K (slot ``2i``) and V (slot
    ``2i + 1``) is a contiguous view. Differentiable: the kernels' prefix gradients reach the encoder.
    """
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    encoder = peft_model.prompt_encoder[adapter]
    P, kv_heads = config.num_virtual_tokens, config.num_attention_heads
    if config.inference_mode:
        flat = encoder.embedding.weight
    else:
        tokens = peft_model.prompt_tokens[adapter][:P].to(encoder.embedding.weight.device)
        flat = encoder(tokens)
    dtype = peft_model.base_model_torch_dtype
    if dtype is not None:
        flat = flat.to(dtype)
    keys, values = split_prefix(flat, config.num_layers, kv_heads, config.token_dim // kv_heads)
    if _peft_sizes_prefix_per_layer(peft_model.get_base_model()):
        keys, values = _gemma_layer_prefixes(peft_model, keys, values)
    return attention.PrefixSpec.build(keys, values)


# The model types whose prefix PEFT 0.21 (get_prompt, peft#3205) fits to each layer: a substring of the backbone's
# config.model_type, as PEFT tests it.
_PER_LAYER_PREFIX_MODEL_TYPES = ("gemma2", "gemma3_text", "gemma4")


def _peft_sizes_prefix_per_layer(base):
    """Whether PEFT's prefix tuning fits the prefix to each layer of the backbone ``base`` (``_gemma_layer_prefixes``)
    rather than handing every layer the whole of its slot."""
    model_type = getattr(base.config, "model_type", None) or ""
    return any(name in model_type for name in _PER_LAYER_PREFIX_MODEL_TYPES)


def _gemma_layer_prefixes(peft_model, keys, values):
    """Each layer's prefix as PEFT 0.21's ``get_prompt`` hands it to a Gemma model, from the per-layer slots ``keys`` /
    ``values`` (``[Hkv, P, D]`` sized by the adapter's ``num_attention_heads`` x ``token_dim / num_attention_heads``,
    which PEFT provisions for the largest layer). Returns the per-layer ``(keys, values)`` for ``PrefixSpec.build``,
    None for a layer that sees no prefix.

    As PEFT, read from the configuration at every call: the last ``num_kv_shared_layers`` layers get no prefix of
    their own; another layer whose KV heads or head size (``per_layer_config``: Gemma 4's sliding and full-attention
    layers differ) exceed the slot's gets none either; the others get the first heads and the first dimensions of
    each head of their slot. PEFT warns, with its own message, when it skips any layer and raises ValueError when it
    skips every one. A layer that reuses another layer's keys and values (``compat.kv_sharing_sources``) attends over
    that layer's prefix: PEFT's prefix reaches it through that layer's cache.
    """
    config = peft_model.active_peft_config
    base = peft_model.get_base_model()
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    heads, head_dim = config.num_attention_heads, config.token_dim // config.num_attention_heads
    num_layers = len(keys)
    shared = compat.config_attribute(text_config, "num_kv_shared_layers", 0) or 0
    first_shared = (compat.config_attribute(text_config, "num_hidden_layers", config.num_layers) or 0) - shared
    # PEFT sizes layers only where the configuration has layer types (Gemma 2 to 4 do).
    shapes = None
    if compat.config_attribute(text_config, "layer_types"):
        geometry = BaseGeometry.of(base.config)
        shapes = geometry.layer_kv_shapes or [(geometry.num_kv_heads, geometry.head_dim)] * geometry.num_layers
    layer_keys, layer_values = [None] * num_layers, [None] * num_layers
    injected, skipped = [], []
    for layer in range(num_layers):
        if shared > 0 and layer >= first_shared:
            skipped.append(layer)
            continue
        layer_k, layer_v = keys[layer], values[layer]
        if shapes is not None:
            layer_heads, layer_dim = shapes[layer]
            if layer_heads > heads or layer_dim > head_dim:
                skipped.append(layer)
                continue
            if (layer_heads, layer_dim) != (heads, head_dim):
                # One copy per call (differentiable), so that the kernels read a contiguous prefix.
                layer_k = layer_k[:layer_heads, :, :layer_dim].contiguous()
                layer_v = layer_v[:layer_heads, :, :layer_dim].contiguous()
        layer_keys[layer], layer_values[layer] = layer_k, layer_v
        injected.append(layer)
    if not injected:
        raise ValueError(
            "Prefix tuning skipped every layer because no layer's KV shape matched the provisioned prefix "
            f"(num_attention_heads={config.num_attention_heads}, head_dim={head_dim}). Override `token_dim` and "
            "`num_attention_heads` in `PrefixTuningConfig` to match a layer that should receive the prefix.")
    if skipped:
        warnings.warn(f"Prefix tuning injected into layers {injected}; skipped {skipped} due to KV shape mismatch or "
                      "shared-KV layers.")
    for layer, source in _kv_sharing_sources(peft_model).items():
        if layer < num_layers:
            layer_keys[layer], layer_values[layer] = layer_keys[source], layer_values[source]
    return layer_keys, layer_values


def _kv_sharing_sources(peft_model):
    """The backbone's ``compat.kv_sharing_sources``, found once per accelerated model (the modules keep it)."""
    state = getattr(peft_model, STATE_ATTR)
    if state.kv_sharing_sources is None:
        state.kv_sharing_sources = compat.kv_sharing_sources(peft_model.get_base_model())
    return state.kv_sharing_sources


def _check_padding_with_prefixless_layers(spec, attention_mask, model_name):
    """Raise ValueError for a padded batch (``attention_mask`` ``[B, S]`` with a 0) when some layer sees no prefix
    (``_gemma_layer_prefixes``). PEFT extends the attention mask by P ones for its prefix cache, but transformers
    builds such a layer's mask for its own, prefix-less keys from the first columns of that extended mask: in PEFT
    its padding is read shifted by P, which fastpeft does not reproduce. Costs one read of the mask (a device sync)
    per call, for these layouts only."""
    if attention_mask is None or all(keys is not None for keys in spec.keys) or bool(attention_mask.all()):
        return
    skipped = [layer for layer, keys in enumerate(spec.keys) if keys is None]
    raise ValueError(f"PEFT's prefix skips layers {skipped} of {model_name} (their KV shape does not fit the "
                     "prefix); in PEFT those layers then read a padded batch's attention mask shifted by the prefix "
                     "length, which fastpeft does not reproduce. Pass batches without padding, or size the prefix "
                     "for every layer (PrefixTuningConfig's token_dim and num_attention_heads)")


def _prefix_positions(spec, num_virtual_tokens):
    """How many tokens PEFT's prefix cache puts before the real ones where the backbone counts its positions: its
    first layer's cache length (transformers numbers tokens after ``cache.get_seq_length()``, which reads layer 0).
    That is P, except for a Gemma model whose first layer PEFT gave no prefix (``_gemma_layer_prefixes``): 0."""
    return num_virtual_tokens if spec.keys[0] is not None else 0


def encoder_decoder_prefix_spec(peft_model):
    """The active prefix-tuning adapter of a ``PeftModelForSeq2SeqLM`` as PEFT applies it: a
    ``DecoderSelfAttentionPrefix`` whose decoder layer i reads ``[Hkv, P, D]`` K/V, differentiably.

    PEFT's ``get_prompt`` (``num_transformer_submodules=2``) views the encoder output as ``[P, 2 NL, H, D]``,
    concatenates that slot axis with itself (``4 NL`` slots) and splits it in groups of 4, each layer's (self K,
    self V, cross K, cross V) of an ``EncoderDecoderCache``, whose cross-attention half it then replaces by an empty
    cache. Decoder layer i therefore reads slots ``4i mod 2NL`` and ``4i+1 mod 2NL``: PEFT layer ``2i mod NL``'s K/V
    in the decoder-only layout of ``prefix_spec`` (with NL=2 both decoder layers read layer 0's and layer 1's half
    of the prefix is never used: its gradient is zero in PEFT too). Encoder and cross-attention get no prefix.
    """
    full = prefix_spec(peft_model)
    state = getattr(peft_model, STATE_ATTR)
    if state.decoder_layers is None:
        state.decoder_layers = len(_decoder_self_attention_layers(peft_model.get_base_model()))
    num_layers = len(full.keys)
    order = [2 * i % num_layers for i in range(state.decoder_layers)]
    prefix = attention.PrefixSpec.build([full.keys[j] for j in order], [full.values[j] for j in order])
    return attention.DecoderSelfAttentionPrefix(prefix,
                                                relative_bias=compat.decoder_relative_bias(peft_model.get_base_model()))


def _position_scheme(peft_model):
    """The backbone's ``compat.position_scheme``, found once per accelerated model."""
    state = getattr(peft_model, STATE_ATTR)
    if state.position_scheme is None:
        state.position_scheme = compat.position_scheme(peft_model.get_base_model())
    return state.position_scheme


def _prefix_position_ids(scheme, position_ids, num_virtual_tokens, past_length, input_ids, attention_mask, reference,
                         cached_prefix_length=None):
    """PEFT's forward positions: user ``position_ids + P``; else the positions the backbone gives its tokens when a
    cache of ``P + past`` tokens precedes them (PEFT hands the prefix over as that cache; ``cached_prefix_length``,
    default P, is how many of the P the backbone counts, ``_prefix_positions``), by the backbone's
    ``compat.position_scheme``:

    * ``cache`` (most models): ``P + past .. P + past + L - 1`` for every row, not pad-aware;
    * ``mask`` (OPT): counted over ``[ones(P) ; attention_mask]``, pad-aware, as the model counts PEFT's mask;
    * ``input_ids`` (RoBERTa): ``padding_idx + P + past + (running count of non-pad ids)``, ``padding_idx`` at pads.

    Returns None where the backbone's own numbering already equals PEFT's (RoBERTa from ``inputs_embeds``, which
    ignores the cache)."""
    if position_ids is not None:
        return position_ids + num_virtual_tokens
    kind, padding_idx = scheme
    start = (num_virtual_tokens if cached_prefix_length is None else cached_prefix_length) + past_length
    (batch, length), device = reference.shape[:2], reference.device
    if kind == "mask":
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, device=device, dtype=torch.long)
        full = torch.cat([attention_mask.new_ones(attention_mask.shape[0], num_virtual_tokens), attention_mask], 1)
        full = full.long()
        return (full.cumsum(1) * full - 1)[:, num_virtual_tokens + past_length:]
    if kind == "input_ids":
        if input_ids is None:
            return None
        real = input_ids.ne(padding_idx).long()
        return (real.cumsum(1) + start) * real + padding_idx
    return torch.arange(start, start + length, device=device).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------------
# Instance methods installed by accelerate()


def _active_is_prefix_tuning(peft_model):
    config = peft_model.active_peft_config
    _check_peft_config(peft_model, peft_model.active_adapter)
    return config.peft_type == _peft_types()[0]


def _accelerated_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                         output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                         **kwargs):
    """PeftModel forward with the prefix fused into attention (prefix tuning) or PEFT's own forward (prompt
    tuning, p-tuning) over fastpeft attention. Outputs are PEFT's, except that a prefix-tuning output's
    ``past_key_values`` holds only the real tokens (the prefix is never in a cache); passing such a cache back in
    continues the sequence (positions follow it)."""
    if not _active_is_prefix_tuning(self):
        if labels is not None or compat.takes_argument(type(self).forward, "labels"):
            kwargs["labels"] = labels  # PEFT's feature-extraction forward has no labels parameter
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                                  output_hidden_states=output_hidden_states, return_dict=return_dict,
                                  task_ids=task_ids, **kwargs)
    from peft import PeftModelForSequenceClassification

    for name in self.special_peft_forward_args:  # PEFT ignores these for prompt learning
        kwargs.pop(name, None)
    if kwargs.get("token_type_ids") is not None and not isinstance(self, PeftModelForSequenceClassification):
        # As PEFT's causal-LM and feature-extraction forwards (_adjust_prompt_learning_kwargs).
        warnings.warn("Token type ids are not supported for parameter efficient tuning. Ignoring token type ids")
        kwargs["token_type_ids"] = None
    if attention.PREFIX_KWARG in kwargs:
        raise ValueError(f"{attention.PREFIX_KWARG} is set by the accelerated model itself; do not pass it")
    if isinstance(self, PeftModelForSequenceClassification) and return_dict is None:
        # PEFT's sequence-classification forward resolves the default itself: the config's return_dict, never
        # in torchscript mode.
        return_dict = getattr(self.config, "return_dict", True) and not getattr(self.config, "torchscript", False)
    if self.training and torch.is_grad_enabled():
        _check_no_reentrant_checkpointing(self.get_base_model(), _checkpointable_modules(self))
    config = self.active_peft_config
    reference = input_ids if input_ids is not None else inputs_embeds
    past_length = compat.cache_length(compat.cache_in(kwargs))
    base = self.get_base_model()
    # For sliding-window layers: the queries' indices in PEFT's cache (prefix, earlier tokens, padding included).
    start = config.num_virtual_tokens + past_length
    queries = torch.arange(start, start + reference.shape[1], device=reference.device)[None]
    spec = dataclasses.replace(prefix_spec(self), query_positions=queries)
    _check_padding_with_prefixless_layers(spec, attention_mask, type(base).__name__)
    scheme, user_positions = _position_scheme(self), kwargs.get("position_ids")
    kwargs["position_ids"] = _prefix_position_ids(scheme, user_positions, config.num_virtual_tokens, past_length,
                                                  input_ids, attention_mask, reference,
                                                  _prefix_positions(spec, config.num_virtual_tokens))
    if attention_mask is None and user_positions is None and scheme[0] == "input_ids" and \
            kwargs["position_ids"] is not None:
        # RoBERTa-style positions restart at padding_idx on every pad. transformers >= 5.25 reads position ids that
        # restart, given without an attention mask, as packed sequences and masks each apart; PEFT hands the backbone
        # no position ids here, so its attention sees every key. A mask of ones says so.
        attention_mask = torch.ones(reference.shape[0], past_length + reference.shape[1], dtype=torch.long,
                                    device=reference.device)
    kwargs[attention.PREFIX_KWARG] = spec
    if labels is not None or compat.takes_argument(type(self).forward, "labels"):
        kwargs["labels"] = labels  # a feature-extraction backbone takes none (PEFT's forward passes none)
    output = base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                  output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                  return_dict=return_dict, **kwargs)
    _check_prefix_consumed(spec, base)
    return output


def _accelerated_seq2seq_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                                 decoder_input_ids=None, decoder_attention_mask=None, decoder_inputs_embeds=None,
                                 labels=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                                 task_ids=None, **kwargs):
    """``PeftModelForSeq2SeqLM.forward`` (same signature) with a prefix-tuning adapter's prefix fused into the
    decoder's self-attention; other adapter types run PEFT's own forward over fastpeft attention.

    PEFT's semantics (it passes the prefix as an ``EncoderDecoderCache``): the decoder's self-attention sees the
    prefix (``encoder_decoder_prefix_spec``) before its tokens, always (PEFT puts ones in front of a
    ``decoder_attention_mask``); the encoder and the cross-attention see none; the decoder numbers its tokens after
    the prefix, ``P + cached + arange(L)`` (``compat.decoder_positions_shifted``); ``position_ids`` get ``+P`` and
    ``token_type_ids`` are dropped with a warning (PEFT's ``_adjust_prompt_learning_kwargs``); ``labels`` make the
    backbone build ``decoder_input_ids`` as usual. The output's cache, as on the causal-LM path, holds only the real
    tokens (None with ``labels``, where the backbone turns its cache off); passed back in, it continues the sequence.
    """
    arguments = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                     decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                     decoder_inputs_embeds=decoder_inputs_embeds, labels=labels,
                     output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                     return_dict=return_dict)
    if not _active_is_prefix_tuning(self):
        return type(self).forward(self, **arguments, task_ids=task_ids, **kwargs)
    if attention.PREFIX_KWARG in kwargs:
        raise ValueError(f"{attention.PREFIX_KWARG} is set by the accelerated model itself; do not pass it")
    for name in self.special_peft_forward_args:  # PEFT ignores these for prompt learning
        kwargs.pop(name, None)
    config = self.active_peft_config
    self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
    base = self.get_base_model()
    if self.training and torch.is_grad_enabled():
        _check_no_reentrant_checkpointing(base, _checkpointable_modules(self))
    spec = encoder_decoder_prefix_spec(self)
    with compat.decoder_positions_shifted(base, config.num_virtual_tokens):
        output = base(**arguments, **{attention.PREFIX_KWARG: spec}, **kwargs)
    _check_prefix_consumed(spec, base)
    return output


def _check_prefix_consumed(spec, base):
    """``spec.check_consumed`` after a forward of ``base``, unless ``base.forward`` was replaced on the instance by
    the caller's own function (a test double: PEFT's own suite checks the position ids its forward hands over that
    way) and no layer took the prefix: such a forward runs none of the model's attention through fastpeft, and what
    it computes is the caller's. accelerate's dispatch hooks (``_hf_hook``) replace the forward too, but run the
    class's: checked as usual, as is a replacement in which some layer took the prefix."""
    if not spec.consumed and "forward" in vars(base) and not hasattr(base, "_hf_hook"):
        return
    spec.check_consumed(type(base).__name__)


def _accelerated_seq2seq_generate(self, **kwargs):
    """``PeftModelForSeq2SeqLM.generate`` with a prefix-tuning adapter's prefix held once and read by the decoder's
    self-attention at every step; never in the KV cache, which holds the real tokens only (beam search reorders
    nothing of the prefix). Positions as in ``_accelerated_seq2seq_forward``: the decoder's token t sits at
    ``P + t``, as in PEFT's forward looped without a cache. Other adapter types and ``disable_adapter()`` run PEFT's
    own generate (over fastpeft attention)."""
    if compat.adapters_disabled(self) or not _active_is_prefix_tuning(self):
        return type(self).generate(self, **kwargs)
    if "input_ids" not in kwargs:  # as PEFT's generate
        raise ValueError("input_ids must be provided for Peft model generation")
    if attention.PREFIX_KWARG in kwargs:
        raise ValueError(f"{attention.PREFIX_KWARG} is set by the accelerated model itself; do not pass it")
    config = self.active_peft_config
    self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
    base = self.get_base_model()
    with torch.no_grad():
        spec = encoder_decoder_prefix_spec(self)

    steps = attention.GenerationStepChecks(type(base).__name__)

    def add_prefix(model_inputs):
        model_inputs[attention.PREFIX_KWARG] = steps.next(spec)
        return model_inputs

    with compat.generation_step_hook(base, add_prefix), \
            compat.decoder_positions_shifted(base, config.num_virtual_tokens):
        output = base.generate(**kwargs)
    steps.finish()
    return output


def _checkpointable_modules(peft_model):
    """The backbone's modules that carry a ``gradient_checkpointing`` flag, found once per accelerated model.
    transformers only ever sets the flag (and the checkpoint function) on modules that have it already, so the set
    is fixed; reading their flags costs a few microseconds per forward, walking every module ~0.1 ms."""
    state = getattr(peft_model, STATE_ATTR)
    if state.checkpointable is None:
        state.checkpointable = tuple(module for module in peft_model.get_base_model().modules()
                                     if hasattr(module, "gradient_checkpointing"))
    return state.checkpointable


def _check_no_reentrant_checkpointing(base, modules):
    """Reentrant checkpointing recomputes each layer inside its own ``backward`` call, which would traverse the
    prompt encoder's graph (shared by all layers) once per layer: refuse it with the fix, rather than fail deep in
    autograd. ``use_reentrant=False`` works. ``modules``: ``_checkpointable_modules`` of the model."""
    for module in modules:
        checkpoint_function = compat.checkpoint_function(module)
        # transformers stores functools.partial(checkpoint, **kwargs); torch's checkpoint defaults to reentrant
        # when use_reentrant is not given. Other checkpoint functions are taken as they are.
        keywords = getattr(checkpoint_function, "keywords", None)
        if keywords is not None and keywords.get("use_reentrant", True):
            method, keyword = compat.checkpointing_names(base)
            raise ValueError("prefix tuning under fastpeft does not support reentrant activation checkpointing; "
                             f"enable it non-reentrant: model.{method}({keyword}={{'use_reentrant': False}})")


def _virtual_token_prefix_spec(peft_model):
    """Prompt tuning / p-tuning for generation: the virtual tokens sit first and see only each other, so their
    keys and values never depend on the row. Run them through the backbone once, as one row at positions
    ``0 .. P-1`` (PEFT runs them B times, once per row, and keeps B copies in the cache), and return every layer's
    ``[Hkv, P, D]`` K/V (rotated at those positions, as PEFT's cache holds them) as a shared ``PrefixSpec``.

    The prompts are PEFT's: ``embedding.weight`` in inference mode, else the encoder over the ``(1, P)`` ids (the
    p-tuning MLP/LSTM reads the whole sequence), cast to the word embeddings' dtype.
    """
    from transformers import DynamicCache

    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    encoder = peft_model.prompt_encoder[adapter]
    if config.peft_type == _peft_types()[3]:  # CPT: embedding + projected delta, PEFT's own get_prompt
        prompts = peft_model.get_prompt(batch_size=1)
    elif config.inference_mode:
        prompts = encoder.embedding.weight.unsqueeze(0)
    else:
        tokens = peft_model.prompt_tokens[adapter].unsqueeze(0).to(encoder.embedding.weight.device)
        prompts = encoder(tokens)
    prompts = prompts.to(peft_model.word_embeddings.weight.dtype)
    base = peft_model.get_base_model()
    # A cache of full layers, built without the model's config: a sliding-window layer's own cache would keep only
    # the last window - 1 virtual tokens, and every later query that the window lets see the others needs them all.
    output = base(inputs_embeds=prompts, use_cache=True, **compat.cache_kwargs(base, DynamicCache()))
    cache = compat.cache_of(output)
    if cache is None:  # transformers drops the cache when gradient checkpointing is on in training mode
        raise ValueError("generate with prompt tuning / p-tuning needs the backbone's KV cache for the virtual "
                         "tokens; with gradient checkpointing enabled, call model.eval() before generate")
    # Layers that reuse another layer's K/V (Gemma 4) keep no cache of their own: they see their source's.
    sources = _kv_sharing_sources(peft_model)
    num_layers = max(len(cache), 1 + max(sources, default=-1))
    keys, values = [], []
    for layer in range(num_layers):
        layer_k, layer_v = compat.cache_layer_key_values(cache, sources.get(layer, layer))
        if layer_k is None or layer_k.shape[-2] != config.num_virtual_tokens:
            raise ValueError(f"{type(base).__name__}'s layer {layer} kept no keys for the {config.num_virtual_tokens} "
                             "virtual tokens in its cache; fastpeft cannot serve them to that layer in generate")
        keys.append(layer_k[0])
        values.append(layer_v[0])
    return attention.PrefixSpec.build(keys, values)


def _accelerated_generate(self, *args, **kwargs):
    """PeftModelForCausalLM.generate with the prefix held once and read by the kernels at every step.

    Prefix tuning: the prefix is the prompt encoder's output. Prompt tuning / p-tuning: the virtual tokens' K/V,
    computed once (``_virtual_token_prefix_spec``), so prefill and cache cover the real tokens only. The backbone's
    ``generate`` runs with every step's model inputs extended (``compat.generation_step_hook``, an instance
    attribute for the call, as PEFT's own generate does) by ``fastpeft_prefix``; the cache holds only real tokens,
    so beam search reorders nothing of the prefix. Positions are PEFT's: prefix tuning takes each step's pad-aware
    position_ids (``cumsum(mask) - 1`` from transformers) ``+ P``; prompt tuning and p-tuning number the
    concatenation, not pad-aware: ``P + cached tokens + arange(new tokens)``. Inside ``disable_adapter()`` it is the
    backbone's own generate (through fastpeft attention, without a prefix), as PEFT's.
    """
    if attention.PREFIX_KWARG in kwargs:
        raise ValueError(f"{attention.PREFIX_KWARG} is set by the accelerated model itself; do not pass it")
    base = self.get_base_model()
    # As PEFT's generate: the PeftModel's generation config drives the backbone's generate.
    if hasattr(base, "model"):
        base.model.generation_config = self.generation_config
    else:
        base.generation_config = self.generation_config
    if compat.adapters_disabled(self):
        return base.generate(*args, **kwargs)

    prefix_tuning = _active_is_prefix_tuning(self)
    num_virtual_tokens = self.active_peft_config.num_virtual_tokens
    scheme = _position_scheme(self)
    with torch.no_grad():
        spec = prefix_spec(self) if prefix_tuning else _virtual_token_prefix_spec(self)
    _check_padding_with_prefixless_layers(spec, kwargs.get("attention_mask"), type(base).__name__)
    steps = attention.GenerationStepChecks(type(base).__name__, "the prefix" if prefix_tuning
                                           else "the virtual tokens' keys and values")
    cached_prefix = _prefix_positions(spec, num_virtual_tokens)

    def add_prefix(model_inputs):
        if prefix_tuning:
            position_ids = model_inputs.get("position_ids")
            if position_ids is None:
                raise ValueError(f"{type(base).__name__} generate passed no position_ids; fastpeft needs them to "
                                 "place the real tokens after the prefix")
            queries = position_ids + num_virtual_tokens
            position_ids = position_ids + cached_prefix
        else:
            past_length = compat.cache_length(compat.cache_in(model_inputs))
            new_tokens = compat.step_new_tokens(model_inputs)
            mask = model_inputs.get("attention_mask")
            if scheme[0] == "mask" and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                # OPT numbers PEFT's [virtual tokens ; input] over its attention mask: pad-aware.
                full = torch.cat([mask.new_ones(mask.shape[0], num_virtual_tokens), mask], 1).long()
                position_ids = (full.cumsum(1) * full - 1)[:, -new_tokens.shape[1]:]
            else:
                start = num_virtual_tokens + past_length
                position_ids = torch.arange(start, start + new_tokens.shape[1], device=new_tokens.device)[None]
            queries = position_ids
        model_inputs["position_ids"] = position_ids
        # Sliding-window layers count the window over PEFT's positions, prefix first: generate's are pad-aware for
        # prefix tuning (each row as PEFT runs it alone) and number the concatenation for prompt tuning.
        model_inputs[attention.PREFIX_KWARG] = steps.next(dataclasses.replace(spec, query_positions=queries))
        return model_inputs

    with compat.generation_step_hook(base, add_prefix):
        output = base.generate(*args, **kwargs)
    steps.finish()
    return output


def _setup_prompt_encoder_allowing_checkpointing(self, adapter_name):
    """PEFT refuses to set up a prefix-tuning encoder when gradient checkpointing is on, because its prefix lives
    in the KV cache, which checkpoint recomputation corrupts. fastpeft passes the prefix as a keyword argument, so
    the refusal does not apply: hide the flag from PEFT's check for the duration of the setup."""
    checkpointing = [module for module in self.get_base_model().modules()
                     if getattr(module, "gradient_checkpointing", False)]
    for module in checkpointing:
        module.gradient_checkpointing = False
    try:
        type(self)._setup_prompt_encoder(self, adapter_name)
    finally:
        for module in checkpointing:
            module.gradient_checkpointing = True
    _check_peft_config(self, adapter_name)
    _check_backbone(self)  # a prefix-tuning adapter added to a prompt-tuning model needs more of the backbone
