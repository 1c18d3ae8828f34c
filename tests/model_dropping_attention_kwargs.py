"""A tiny causal LM whose class declares ``_supports_attention_backend`` (that keyword arguments of its forward reach
its attention functions) while some of its layers' attention hands the attention function only the standard
arguments: the failure a transformers release brings when a model's attention stops passing ``**kwargs`` on. fastpeft
hands each layer its prefix as such a keyword, so those layers would run without it; the per-call count
(``PrefixSpec.check_consumed``) must turn that into an error.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, eager_attention_forward

from fastpeft.integration import compat


class KeywordDroppingAttention(LlamaAttention):
    """Llama's attention through the attention interface, but the forward's other keyword arguments stop here."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        cache = compat.cache_in(kwargs)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                   eager_attention_forward)
        out, weights = attention_function(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class KeywordDroppingLlamaForCausalLM(LlamaForCausalLM):
    """Llama whose layers listed in ``config.keyword_dropping_layers`` use ``KeywordDroppingAttention``; the class
    still declares ``_supports_attention_backend`` (inherited from Llama)."""

    def __init__(self, config):
        super().__init__(config)
        for index in getattr(config, "keyword_dropping_layers", ()):
            self.model.layers[index].self_attn = KeywordDroppingAttention(config, index)


def tiny_keyword_dropping_model(dropping_layers, seed=0, vocab_size=128):
    """A 2-layer ``KeywordDroppingLlamaForCausalLM`` (hidden 128, 4 query heads, 2 KV heads) whose layers
    ``dropping_layers`` drop keyword arguments, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, max_position_embeddings=256, pad_token_id=0)
    config.keyword_dropping_layers = tuple(dropping_layers)
    return KeywordDroppingLlamaForCausalLM(config).eval()
