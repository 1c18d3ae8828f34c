"""A tiny causal LM whose attention is computed by hand, bypassing transformers' attention interface on every
transformers release: what Falcon was up to transformers 5.24, and what any model is that fastpeft cannot replace
the attention of (``fastpeft.accelerate`` leaves it on PEFT's path with a FallbackWarning).

Its own module on purpose: transformers decides whether a model class can switch attention implementations by reading
the source of the module that defines it (``PreTrainedModel._can_set_attn_implementation``: an attention class
derived from ``nn.Module`` and no lookup of the interface's functions), as it reads Falcon's ``modeling_falcon.py``.
This module must therefore never name that lookup.
"""

import torch
from torch import nn
from transformers import GenerationMixin, LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import CausalLMOutput
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fastpeft.integration import compat


class HandwrittenSelfAttention(nn.Module):
    """Llama's attention math (grouped-query softmax attention over rotated queries and keys) written out here,
    with the mask transformers built for the model's own implementation: None (causal, bottom-right aligned), a
    boolean 4-D mask (True = visible) or an additive one."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        cache = compat.cache_in(kwargs)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(-1, -2) * self.head_dim ** -0.5
        if attention_mask is None:
            causal = torch.ones(length, key.shape[2], dtype=torch.bool, device=scores.device)
            scores = scores.masked_fill(~causal.tril(key.shape[2] - length), float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask[..., -key.shape[2]:], float("-inf"))
        else:
            scores = scores + attention_mask[..., -key.shape[2]:]
        out = torch.softmax(scores, dim=-1) @ value
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None


class HandwrittenAttentionLlamaForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    """A causal LM over Llama's decoder with ``HandwrittenSelfAttention`` in every layer, declaring no
    ``_supports_attention_backend``. Not a subclass of ``LlamaForCausalLM``: transformers caches its source heuristic
    on the class it ran for, and a subclass would inherit ``LlamaForCausalLM``'s cached answer."""

    _supports_attention_backend = False

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        for index, layer in enumerate(self.model.layers):
            layer.self_attn = HandwrittenSelfAttention(config, index)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                            **kwargs).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def tiny_handwritten_attention_model(seed=0, vocab_size=128):
    """A 2-layer ``HandwrittenAttentionLlamaForCausalLM`` (hidden 128, 4 query heads, 2 KV heads), eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, max_position_embeddings=256, pad_token_id=0)
    return HandwrittenAttentionLlamaForCausalLM(config).eval()
