"""Tiny randomly initialised models of each supported family, built from configs (no downloads).

Every model has GQA where its family supports it, hidden sizes divisible by 64 (so bitsandbytes 4-bit works on
them), attention/hidden dropout off (so PEFT and fastpeft can be compared in train mode too), float32, eval mode.
"""

import torch

VOCAB = 128
CAUSAL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
ALL_FAMILIES = CAUSAL_FAMILIES + ("bert",)


def tiny_config(family, layers=2, hidden=128, heads=4, kv_heads=2):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, max_position_embeddings=256, pad_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=kv_heads, **common)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=kv_heads, sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=kv_heads, use_sliding_window=False, **common)
    if family == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=kv_heads, head_dim=hidden // heads, use_sliding_window=False,
                              **common)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return tf.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=256,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
                             pad_token_id=0)
    raise ValueError(f"unknown family {family!r}")


def tiny_model(family, seed=0, attn_implementation="eager", **config_overrides):
    """A tiny model of ``family``: a causal LM, or a sequence classifier for BERT."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(family, **config_overrides)
    cls = tf.BertForSequenceClassification if family == "bert" else tf.AutoModelForCausalLM
    if cls is tf.AutoModelForCausalLM:
        model = cls.from_config(config, attn_implementation=attn_implementation)
    else:
        model = cls(config)
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def padded_batch(seed=0, batch=3, length=7, left_pad=(0, 3, 1)):
    """input_ids [batch, length] with ids in [1, VOCAB) and an attention mask left-padded by ``left_pad[b]``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, pad in enumerate(left_pad[:batch]):
        mask[b, :pad] = 0
        ids[b, :pad] = 0
    return ids, mask
