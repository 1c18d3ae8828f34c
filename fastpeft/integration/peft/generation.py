"""The accelerated ``generate`` of ``PeftModelForCausalLM`` (prefix tuning, prompt tuning, p-tuning, CPT) and of
``PeftModelForSeq2SeqLM`` (prefix tuning): the prefix is computed once per call and added to every step's model
inputs, never to the KV cache.
"""


import torch

from .. import attention, compat
from .checks import active_is_prefix_tuning, check_padding_with_prefixless_layers, check_prefix_not_passed
from .prefix import encoder_decoder_prefix_spec, prefix_positions, prefix_spec, virtual_token_prefix_spec
from .state import position_scheme


def accelerated_generate(self, *args, **kwargs):
    """PeftModelForCausalLM.generate with the prefix held once and read by the kernels at every step.

    Prefix tuning: the prefix is the prompt encoder's output. Prompt tuning / p-tuning: the virtual tokens' K/V,
    computed once (``prefix.virtual_token_prefix_spec``), so prefill and cache cover the real tokens only. The
    backbone's ``generate`` runs with every step's model inputs extended (``compat.generation_step_hook``, an
    instance attribute for the call, as PEFT's own generate does: ``attention.generating_with_prefix``) by
    ``fastpeft_prefix``; the cache holds only real
    tokens, so beam search reorders nothing of the prefix. Positions are PEFT's: prefix tuning takes each step's
    pad-aware position_ids (``cumsum(mask) - 1`` from transformers) ``+ P``; prompt tuning and p-tuning number the
    concatenation, not pad-aware: ``P + cached tokens + arange(new tokens)``. Inside ``disable_adapter()`` it is the
    backbone's own generate (through fastpeft attention, without a prefix), as PEFT's.
    """
    check_prefix_not_passed(kwargs)
    base = self.get_base_model()
    # As PEFT's generate: the PeftModel's generation config drives the backbone's generate.
    if hasattr(base, "model"):
        base.model.generation_config = self.generation_config
    else:
        base.generation_config = self.generation_config
    if compat.adapters_disabled(self):
        return base.generate(*args, **kwargs)

    prefix_tuning = active_is_prefix_tuning(self)
    num_virtual_tokens = self.active_peft_config.num_virtual_tokens
    scheme = position_scheme(self)
    with torch.no_grad():
        spec = prefix_spec(self) if prefix_tuning else virtual_token_prefix_spec(self)
    check_padding_with_prefixless_layers(spec, kwargs.get("attention_mask"), type(base).__name__)
    cached_prefix = prefix_positions(spec, num_virtual_tokens)

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
        return spec.at_positions(queries)

    what = "the prefix" if prefix_tuning else "the virtual tokens' keys and values"
    with attention.generating_with_prefix(base, add_prefix, what):
        return base.generate(*args, **kwargs)


def accelerated_seq2seq_generate(self, **kwargs):
    """``PeftModelForSeq2SeqLM.generate`` with a prefix-tuning adapter's prefix held once and read by the decoder's
    self-attention at every step; never in the KV cache, which holds the real tokens only (beam search reorders
    nothing of the prefix). Positions as in ``seq2seq.accelerated_seq2seq_forward``: the decoder's token t sits at
    ``P + t``, as in PEFT's forward looped without a cache. Other adapter types and ``disable_adapter()`` run PEFT's
    own generate (over fastpeft attention)."""
    if compat.adapters_disabled(self) or not active_is_prefix_tuning(self):
        return type(self).generate(self, **kwargs)
    if "input_ids" not in kwargs:  # as PEFT's generate
        raise ValueError("input_ids must be provided for Peft model generation")
    check_prefix_not_passed(kwargs)
    config = self.active_peft_config
    self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
    base = self.get_base_model()
    with torch.no_grad():
        spec = encoder_decoder_prefix_spec(self)

    with attention.generating_with_prefix(base, lambda model_inputs: spec), \
            compat.decoder_positions_shifted(base, config.num_virtual_tokens):
        return base.generate(**kwargs)
