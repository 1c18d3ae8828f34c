"""Randomly initialized Llama-style models (and a T5 for the encoder-decoder serving case) built from a config, for
the training and serving suites.

No weights are downloaded: speed and memory depend on the shapes, not on the values. The GPU model has the
shape of TinyLlama-1.1B (hidden 2048, 22 layers, 32 query / 4 kv heads of size 64, vocabulary 32000); the
CPU smoke runs use the built-in small model of ``fastpeft.tiny``.
"""

import torch

LLAMA_1B_CONFIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def build_causal_lm(device, dtype, seed=0):
    """(model, description): the ~1.1B model on CUDA, the built-in small model on CPU; eval mode, frozen.

    The generation config has no end-of-sequence token, so every ``generate`` call produces exactly
    ``max_new_tokens`` tokens per row and throughput compares like with like.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from .. import tiny

    if device.type == "cuda":
        config = LlamaConfig(**LLAMA_1B_CONFIG)
        description = "Llama-style 1.1B (TinyLlama shape), random init"
    else:
        config = LlamaConfig(**tiny.TINY_CONFIG)
        description = "fastpeft.tiny (hidden 256, 4 layers), random init"
    config.eos_token_id = None
    config.pad_token_id = 0
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    parameters = sum(p.numel() for p in model.parameters())
    return model, f"{description}, {parameters / 1e6:,.0f}M parameters"


# t5-base's shape (on CUDA); the CPU runs use the built-in small T5 of ``fastpeft.tiny``.
T5_BASE_CONFIG = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                      num_heads=12, pad_token_id=0, decoder_start_token_id=0)


def build_seq2seq_lm(device, dtype, seed=0):
    """(model, description): a random T5 (``tiny.build_t5_model``: matrices drawn so that greedy tokens depend on
    the input), of t5-base's shape on CUDA, the built-in small one on CPU; eval mode, frozen, no end-of-sequence
    token (every row generates ``max_new_tokens``)."""
    from .. import tiny

    overrides = T5_BASE_CONFIG if device.type == "cuda" else {}
    model = tiny.build_t5_model(seed, dtype, eos_token_id=None, **overrides).to(device).requires_grad_(False)
    model.generation_config.eos_token_id = None
    description = ("T5 (t5-base shape)" if device.type == "cuda" else "fastpeft.tiny's T5 (d_model 256, 2+2 layers)")
    parameters = sum(p.numel() for p in model.parameters())
    return model, f"{description}, random init, {parameters / 1e6:,.0f}M parameters"


def random_batch(vocab_size, B, L, device, seed=0):
    """``input_ids`` ``[B, L]`` drawn uniformly from the vocabulary (no special tokens) and an all-ones mask."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (B, L), generator=g).to(device)
    return input_ids, torch.ones_like(input_ids)
