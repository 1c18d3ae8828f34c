"""The accelerated ``forward`` of ``PeftModelForSeq2SeqLM``: prefix tuning's prefix goes to the decoder's
self-attention as a keyword, the decoder's positions shifted after it, as PEFT numbers them.
"""

import torch

from .. import attention, compat
from .checks import (active_is_prefix_tuning, check_no_reentrant_checkpointing, check_prefix_consumed,
                     check_prefix_not_passed)
from .prefix import encoder_decoder_prefix_spec
from .state import checkpointable_modules


def accelerated_seq2seq_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                                decoder_input_ids=None, decoder_attention_mask=None, decoder_inputs_embeds=None,
                                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                                task_ids=None, **kwargs):
    """``PeftModelForSeq2SeqLM.forward`` (same signature) with a prefix-tuning adapter's prefix fused into the
    decoder's self-attention; other adapter types run PEFT's own forward over fastpeft attention.

    PEFT's semantics (it passes the prefix as an ``EncoderDecoderCache``): the decoder's self-attention sees the
    prefix (``prefix.encoder_decoder_prefix_spec``) before its tokens, always (PEFT puts ones in front of a
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
    if not active_is_prefix_tuning(self):
        return type(self).forward(self, **arguments, task_ids=task_ids, **kwargs)
    check_prefix_not_passed(kwargs)
    for name in self.special_peft_forward_args:  # PEFT ignores these for prompt learning
        kwargs.pop(name, None)
    config = self.active_peft_config
    self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
    base = self.get_base_model()
    if self.training and torch.is_grad_enabled():
        check_no_reentrant_checkpointing(base, checkpointable_modules(self))
    spec = encoder_decoder_prefix_spec(self)
    with compat.decoder_positions_shifted(base, config.num_virtual_tokens):
        output = base(**arguments, **{attention.PREFIX_KWARG: spec}, **kwargs)
    check_prefix_consumed(spec, base)
    return output
