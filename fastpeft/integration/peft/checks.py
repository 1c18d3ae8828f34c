"""What ``accelerate`` and the accelerated methods check: the PEFT model class and adapter types fastpeft runs, the
adapter configurations whose prefix fits the backbone, the backbones whose attention fastpeft computes, and at every
call the conditions under which fastpeft's numbers are PEFT's (prefix consumed by every layer, no reentrant
checkpointing, no padding with prefix-less layers).
"""

from ..geometry import BaseGeometry
from .. import attention, compat


def peft_types():
    """PREFIX_TUNING, then the types whose virtual tokens are input embeddings (PEFT's own forward runs them)."""
    from peft import PeftType

    return PeftType.PREFIX_TUNING, PeftType.PROMPT_TUNING, PeftType.P_TUNING, PeftType.CPT


def supported_peft_classes():
    from peft import (PeftModelForCausalLM, PeftModelForFeatureExtraction, PeftModelForSeq2SeqLM,
                      PeftModelForSequenceClassification)

    return (PeftModelForCausalLM, PeftModelForSequenceClassification, PeftModelForFeatureExtraction,
            PeftModelForSeq2SeqLM)


def check_adapter_type(peft_model, adapter_name):
    types = peft_types()
    config = peft_model.peft_config[adapter_name]
    if config.peft_type not in types:
        raise ValueError(f"fastpeft.accelerate supports {', '.join(t.value for t in types)} adapters; "
                         f"adapter {adapter_name!r} is {config.peft_type.value}")


def check_peft_config(peft_model, adapter_name):
    """Raise ValueError for an adapter configuration fastpeft cannot run with PEFT's exact numbers on this
    backbone."""
    check_adapter_type(peft_model, adapter_name)
    prefix_tuning = peft_types()[0]
    config = peft_model.peft_config[adapter_name]
    encoder_decoder = getattr(peft_model.get_base_model().config, "is_encoder_decoder", False)
    if config.peft_type != prefix_tuning:
        if not encoder_decoder and getattr(config, "num_transformer_submodules", 1) not in (None, 1):
            raise ValueError(f"adapter {adapter_name!r} has num_transformer_submodules="
                             f"{config.num_transformer_submodules}, for an encoder-decoder; the backbone has one")
        return
    if encoder_decoder:
        check_encoder_decoder_prefix(f"prefix-tuning adapter {adapter_name!r}", config.num_transformer_submodules,
                                     config.num_layers, config.num_attention_heads, peft_model.get_base_model())
    base = peft_model.get_base_model()
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    num_layers = compat.config_attribute(text_config, "num_hidden_layers")
    if config.num_layers != num_layers:
        raise ValueError(f"prefix-tuning adapter {adapter_name!r} has num_layers={config.num_layers} but the "
                         f"backbone has {num_layers} attention layers")
    if config.token_dim % config.num_attention_heads:
        raise ValueError(f"prefix-tuning adapter {adapter_name!r} has token_dim={config.token_dim}, not a multiple "
                         f"of num_attention_heads={config.num_attention_heads}")
    if peft_sizes_prefix_per_layer(base):
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


def check_encoder_decoder_prefix(adapter_label, num_transformer_submodules, num_layers, num_attention_heads, base):
    """The encoder-decoder prefix-tuning configurations PEFT runs (``prefix.encoder_decoder_prefix_spec``,
    ``AdapterBank``): its cache has ``num_transformer_submodules=2`` (self- and cross-attention halves),
    ``num_layers`` self-attention layers of ``num_attention_heads`` heads, which the decoder's layers of ``base`` must
    not outnumber (PEFT fails with an IndexError) and whose head count the decoder's self-attention must have (PEFT
    fails concatenating the cache). Raise ValueError naming the mismatch; ``adapter_label`` names the adapter."""
    if num_transformer_submodules != 2:
        raise ValueError(f"{adapter_label} of the encoder-decoder {type(base).__name__} has "
                         f"num_transformer_submodules={num_transformer_submodules}; PEFT's encoder-decoder "
                         "prefix (a self- and a cross-attention cache) has 2")
    decoder_layers = getattr(base.config, "decoder_layers", None) or getattr(base.config, "num_decoder_layers", None)
    if decoder_layers is not None and decoder_layers > num_layers:
        raise ValueError(f"{adapter_label} has num_layers={num_layers} but the decoder of {type(base).__name__} has "
                         f"{decoder_layers} layers: PEFT's prefix covers num_layers decoder layers (it fails on the "
                         "others)")
    decoder_heads = getattr(base.config, "decoder_attention_heads", None)
    if decoder_heads is not None and decoder_heads != num_attention_heads:
        raise ValueError(f"{adapter_label} stores its prefix in num_attention_heads={num_attention_heads} heads but "
                         f"the decoder of {type(base).__name__} has {decoder_heads} (PEFT fails on that too)")


# The model types whose prefix PEFT 0.21 (get_prompt, peft#3205) fits to each layer: a substring of the backbone's
# config.model_type, as PEFT tests it.
_PER_LAYER_PREFIX_MODEL_TYPES = ("gemma2", "gemma3_text", "gemma4")


def peft_sizes_prefix_per_layer(base):
    """Whether PEFT's prefix tuning fits the prefix to each layer of the backbone ``base``
    (``prefix._gemma_layer_prefixes``) rather than handing every layer the whole of its slot."""
    model_type = getattr(base.config, "model_type", None) or ""
    return any(name in model_type for name in _PER_LAYER_PREFIX_MODEL_TYPES)


def decoder_self_attention_layers(base):
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


def check_backbone(peft_model):
    """The backbone checks of ``attention.check_supported_model``; the keyword-passing requirement only where an
    adapter is prefix tuning (prompt tuning, p-tuning and CPT hand attention nothing but the sequence)."""
    base = peft_model.get_base_model()
    prefix = any(config.peft_type == peft_types()[0] for config in peft_model.peft_config.values())
    encoder_decoder = getattr(base.config, "is_encoder_decoder", False)
    # Encoder-decoders (BART, T5) hand keyword arguments to attention without declaring it: the prefix's arrival at
    # every decoder self-attention is checked at every call instead (PrefixSpec.check_consumed).
    attention.check_supported_model(base, "fastpeft.accelerate", prefix_kwargs=prefix and not encoder_decoder,
                                    handwritten_families=True)
    if prefix:
        check_no_layerdrop(base, "fastpeft.accelerate")
    if prefix and encoder_decoder:
        check_decoder_positions_shiftable(base, "fastpeft.accelerate")
        decoder_self_attention_layers(base)


def check_no_layerdrop(base, user):
    """Raise ``attention.UnsupportedModelError`` if ``base`` skips layers at random in training (LayerDrop:
    ``config.layerdrop`` / ``decoder_layerdrop``), which a prefix cannot be run with; ``user`` names the caller."""
    for name in ("layerdrop", "decoder_layerdrop"):
        rate = compat.config_attribute(base.config, name)
        if rate:
            raise attention.UnsupportedModelError(
                f"{user} cannot run prefix tuning on {type(base).__name__} with LayerDrop "
                f"(config.{name}={rate}): a layer skipped at random in training takes no prefix, which the check "
                "that every layer's attention received its prefix cannot tell from a layer that drops it")


def check_decoder_positions_shiftable(base, user):
    """Raise ``attention.UnsupportedModelError`` unless fastpeft can number the decoder's tokens of the
    encoder-decoder ``base`` after a prefix held outside the cache, as PEFT's prefix cache numbers them
    (``compat.decoder_positions_shifted``); ``user`` names the caller."""
    if compat.decoder_position_embedding(base) is None and compat.decoder_relative_bias(base) is None:
        raise attention.UnsupportedModelError(
            f"{user} cannot run prefix tuning on {type(base).__name__}: PEFT numbers the decoder's positions after "
            "its prefix cache, and this decoder has no position embedding (decoder.embed_positions) or relative "
            "attention bias (T5's) fastpeft can shift without one")


def active_is_prefix_tuning(peft_model):
    config = peft_model.active_peft_config
    check_peft_config(peft_model, peft_model.active_adapter)
    return config.peft_type == peft_types()[0]


def check_prefix_not_passed(kwargs):
    """Raise ValueError if the caller's keyword arguments ``kwargs`` carry the prefix keyword: an accelerated model
    sets it itself, from its adapter."""
    if attention.PREFIX_KWARG in kwargs:
        raise ValueError(f"{attention.PREFIX_KWARG} is set by the accelerated model itself; do not pass it")


def check_no_reentrant_checkpointing(base, modules):
    """Reentrant checkpointing recomputes each layer inside its own ``backward`` call, which would traverse the
    prompt encoder's graph (shared by all layers) once per layer: refuse it with the fix, rather than fail deep in
    autograd. ``use_reentrant=False`` works. ``modules``: ``state.checkpointable_modules`` of the model."""
    for module in modules:
        checkpoint_function = compat.checkpoint_function(module)
        # transformers stores functools.partial(checkpoint, **kwargs); torch's checkpoint defaults to reentrant
        # when use_reentrant is not given. Other checkpoint functions are taken as they are.
        keywords = getattr(checkpoint_function, "keywords", None)
        if keywords is not None and keywords.get("use_reentrant", True):
            method, keyword = compat.checkpointing_names(base)
            raise ValueError("prefix tuning under fastpeft does not support reentrant activation checkpointing; "
                             f"enable it non-reentrant: model.{method}({keyword}={{'use_reentrant': False}})")


def check_padding_with_prefixless_layers(spec, attention_mask, model_name):
    """Raise ValueError for a padded batch (``attention_mask`` ``[B, S]`` with a 0) when some layer sees no prefix
    (``prefix._gemma_layer_prefixes``). PEFT extends the attention mask by P ones for its prefix cache, but
    transformers builds such a layer's mask for its own, prefix-less keys from the first columns of that extended
    mask: in PEFT its padding is read shifted by P, which fastpeft does not reproduce. Costs one read of the mask (a
    device sync) per call, for these layouts only."""
    if attention_mask is None or all(keys is not None for keys in spec.keys) or bool(attention_mask.all()):
        return
    skipped = [layer for layer, keys in enumerate(spec.keys) if keys is None]
    raise ValueError(f"PEFT's prefix skips layers {skipped} of {model_name} (their KV shape does not fit the "
                     "prefix); in PEFT those layers then read a padded batch's attention mask shifted by the prefix "
                     "length, which fastpeft does not reproduce. Pass batches without padding, or size the prefix "
                     "for every layer (PrefixTuningConfig's token_dim and num_attention_heads)")


def check_prefix_consumed(spec, base):
    """``spec.check_consumed`` after a forward of ``base``, unless ``base.forward`` was replaced on the instance by
    the caller's own function (a test double: PEFT's own suite checks the position ids its forward hands over that
    way) and no layer took the prefix: such a forward runs none of the model's attention through fastpeft, and what
    it computes is the caller's. accelerate's dispatch hooks (``_hf_hook``) replace the forward too, but run the
    class's: checked as usual, as is a replacement in which some layer took the prefix."""
    if not spec.consumed and "forward" in vars(base) and not hasattr(base, "_hf_hook"):
        return
    spec.check_consumed(type(base).__name__)
