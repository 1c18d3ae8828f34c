"""The ``attention.PrefixSpec`` an accelerated model hands its attention: prefix tuning's per-layer K/V straight from
the prompt encoder (decoder-only and encoder-decoder layouts, Gemma's per-layer sizing), and for generation the
virtual tokens' K/V of prompt tuning / p-tuning.
"""

import warnings

from ...adapters import split_prefix
from ..geometry import BaseGeometry
from .. import attention, compat
from ..virtual_tokens import virtual_token_key_values
from .checks import decoder_self_attention_layers, peft_sizes_prefix_per_layer, peft_types
from .state import STATE_ATTR, kv_sharing_sources


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
    if peft_sizes_prefix_per_layer(peft_model.get_base_model()):
        keys, values = _gemma_layer_prefixes(peft_model, keys, values)
    return attention.PrefixSpec.build(keys, values)


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
    for layer, source in kv_sharing_sources(peft_model).items():
        if layer < num_layers:
            layer_keys[layer], layer_values[layer] = layer_keys[source], layer_values[source]
    return layer_keys, layer_values


def prefix_positions(spec, num_virtual_tokens):
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
        state.decoder_layers = len(decoder_self_attention_layers(peft_model.get_base_model()))
    num_layers = len(full.keys)
    order = [2 * i % num_layers for i in range(state.decoder_layers)]
    prefix = attention.PrefixSpec.build([full.keys[j] for j in order], [full.values[j] for j in order])
    return attention.DecoderSelfAttentionPrefix(prefix,
                                                relative_bias=compat.decoder_relative_bias(peft_model.get_base_model()))


def virtual_token_prefix_spec(peft_model):
    """Prompt tuning / p-tuning for generation: the virtual tokens sit first and see only each other, so their
    keys and values never depend on the row. Run them through the backbone once, as one row at positions
    ``0 .. P-1`` (PEFT runs them B times, once per row, and keeps B copies in the cache), and return every layer's
    ``[Hkv, P, D]`` K/V (rotated at those positions, as PEFT's cache holds them) as a shared ``PrefixSpec``.

    The prompts are PEFT's: ``embedding.weight`` in inference mode, else the encoder over the ``(1, P)`` ids (the
    p-tuning MLP/LSTM reads the whole sequence), cast to the word embeddings' dtype.
    """
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    encoder = peft_model.prompt_encoder[adapter]
    if config.peft_type == peft_types()[3]:  # CPT: embedding + projected delta, PEFT's own get_prompt
        prompts = peft_model.get_prompt(batch_size=1)
    elif config.inference_mode:
        prompts = encoder.embedding.weight.unsqueeze(0)
    else:
        tokens = peft_model.prompt_tokens[adapter].unsqueeze(0).to(encoder.embedding.weight.device)
        prompts = encoder(tokens)
    prompts = prompts.to(peft_model.word_embeddings.weight.dtype)
    # Layers that reuse another layer's K/V (Gemma 4) keep no cache of their own: they see their source's.
    keys, values = virtual_token_key_values(peft_model.get_base_model(), prompts, kv_sharing_sources(peft_model))
    return attention.PrefixSpec.build(keys, values)
