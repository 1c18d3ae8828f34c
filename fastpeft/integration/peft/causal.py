"""The accelerated ``forward`` of a PEFT model with one backbone stack: ``PeftModelForCausalLM`` and, on the same
path, ``PeftModelForSequenceClassification`` and ``PeftModelForFeatureExtraction`` (decoder- or encoder-only
backbones). Prefix tuning's prefix goes to attention as a keyword, at PEFT's positions.
"""

import warnings

import torch

from .. import attention, compat, sharding
from .checks import (active_is_prefix_tuning, check_no_reentrant_checkpointing, check_padding_with_prefixless_layers,
                     check_prefix_consumed, check_prefix_not_passed)
from .prefix import prefix_positions, prefix_spec
from .state import checkpointable_modules, position_scheme


def accelerated_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                        output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None,
                        **kwargs):
    """PeftModel forward with the prefix fused into attention (prefix tuning) or PEFT's own forward (prompt
    tuning, p-tuning) over fastpeft attention. Outputs are PEFT's, except that a prefix-tuning output's
    ``past_key_values`` holds only the real tokens (the prefix is never in a cache); passing such a cache back in
    continues the sequence (positions follow it)."""
    if self.training and torch.is_grad_enabled():
        # Under FSDP2, a prompt parameter outside every fully_shard unit would train on this process's rows alone.
        sharding.check_sharded(self, self.prompt_encoder.named_parameters(prefix="prompt_encoder"))
    if not active_is_prefix_tuning(self):
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
    check_prefix_not_passed(kwargs)
    if isinstance(self, PeftModelForSequenceClassification) and return_dict is None:
        # PEFT's sequence-classification forward resolves the default itself: the config's return_dict, never
        # in torchscript mode.
        return_dict = getattr(self.config, "return_dict", True) and not getattr(self.config, "torchscript", False)
    if self.training and torch.is_grad_enabled():
        check_no_reentrant_checkpointing(self.get_base_model(), checkpointable_modules(self))
    config = self.active_peft_config
    reference = input_ids if input_ids is not None else inputs_embeds
    past_length = compat.cache_length(compat.cache_in(kwargs))
    base = self.get_base_model()
    # For sliding-window layers: the queries' indices in PEFT's cache (prefix, earlier tokens, padding included).
    start = config.num_virtual_tokens + past_length
    queries = torch.arange(start, start + reference.shape[1], device=reference.device)[None]
    spec = prefix_spec(self).at_positions(queries)
    check_padding_with_prefixless_layers(spec, attention_mask, type(base).__name__)
    scheme, user_positions = position_scheme(self), kwargs.get("position_ids")
    kwargs["position_ids"] = _prefix_position_ids(scheme, user_positions, config.num_virtual_tokens, past_length,
                                                  input_ids, attention_mask, reference,
                                                  prefix_positions(spec, config.num_virtual_tokens))
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
    check_prefix_consumed(spec, base)
    return output


def _prefix_position_ids(scheme, position_ids, num_virtual_tokens, past_length, input_ids, attention_mask, reference,
                         cached_prefix_length=None):
    """PEFT's forward positions: user ``position_ids + P``; else the positions the backbone gives its tokens when a
    cache of ``P + past`` tokens precedes them (PEFT hands the prefix over as that cache; ``cached_prefix_length``,
    default P, is how many of the P the backbone counts, ``prefix.prefix_positions``), by the backbone's
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
