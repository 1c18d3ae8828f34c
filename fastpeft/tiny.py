"""The built-in small models: a seeded Llama-style causal LM (and a T5 encoder-decoder, ``build_t5_model``) and a
byte-level tokenizer, built locally.

Every CLI subcommand runs without network access; without ``--model`` it uses this model. It has the
features the kernels care about (grouped-query attention, rotary positions, several layers) at a size that
trains a few steps on a laptop CPU in seconds:

    hidden 256, 4 layers, 8 query heads and 2 kv heads of size 32, MLP 688, vocabulary 259
    (the 256 byte values, then <pad>, <s>, </s>), tied input/output embeddings.

The weights are random (seeded): the model exists to exercise training, saving, loading and serving of
adapters, not to produce meaningful text. The tokenizer is a ``tokenizers``-backed fast tokenizer whose
token id is the byte value, so it saves to and loads from a model directory like any Hub tokenizer
(``AutoTokenizer.from_pretrained(dir)``), pads on the left for generation and has a pad token.

transformers and tokenizers are imported inside the functions: ``import fastpeft`` must stay light.
"""

import json
import os

import torch

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
NUM_BYTES = 256
PAD_ID, BOS_ID, EOS_ID = NUM_BYTES, NUM_BYTES + 1, NUM_BYTES + 2
VOCAB_SIZE = NUM_BYTES + 3

TINY_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)
"""Keyword arguments of the ``LlamaConfig`` of the built-in model."""


def _byte_to_unicode():
    """The reversible byte -> printable character map of byte-level BPE (GPT-2's): the ``ByteLevel``
    pre-tokenizer turns each input byte into this character, so a vocabulary keyed by these characters
    with id = byte value encodes any UTF-8 text without an unknown token."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, shift = {}, 0
    for byte in range(NUM_BYTES):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:  # control and whitespace bytes move above 255, in byte order, as in GPT-2's table
            mapping[byte] = chr(NUM_BYTES + shift)
            shift += 1
    return mapping


def build_tokenizer():
    """A byte-level fast tokenizer: id = byte value, then ``<pad>`` 256, ``<s>`` 257, ``</s>`` 258.

    Encoding prepends ``<s>`` (``add_special_tokens=True``); padding is on the left (generation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    vocab.update({PAD_TOKEN: PAD_ID, BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
                                   eos_token=EOS_TOKEN, padding_side="left",
                                   model_max_length=TINY_CONFIG["max_position_embeddings"])


def build_model(seed=0, dtype=torch.float32):
    """The built-in ``LlamaForCausalLM`` with weights drawn from ``seed`` (the global RNG is left untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # No name: PEFT looks a named base model up on the Hub when saving an adapter; an unnamed one it skips.
    config = LlamaConfig(**TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = PAD_ID
    return model.to(dtype).eval()


TINY_T5_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    d_model=256,
    d_kv=64,
    d_ff=688,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    dropout_rate=0.0,
    pad_token_id=PAD_ID,
    eos_token_id=EOS_ID,
    decoder_start_token_id=PAD_ID,
)
"""Keyword arguments of the ``T5Config`` of the built-in encoder-decoder (the byte tokenizer's vocabulary; its pad
token starts the decoder, as T5's does)."""


def build_t5_model(seed=0, dtype=torch.float32, **config_overrides):
    """A ``T5ForConditionalGeneration`` of ``TINY_T5_CONFIG`` (``config_overrides`` replace entries: another shape)
    with weights drawn from ``seed`` (the global RNG is left untouched). Its matrices are drawn from N(0, 1/d_model)
    rather than T5's init, under which a random T5 greedily repeats one token (its pad) whatever its input."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(**{**TINY_T5_CONFIG, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() > 1:
                    parameter.normal_(0, config.d_model ** -0.5)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.to(dtype).eval()


def save_tiny(directory, seed=0, encoder_decoder=False):
    """Write the built-in model and its tokenizer to ``directory`` (config, safetensors weights, tokenizer
    files), loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``; with ``encoder_decoder`` the built-in T5
    (``build_t5_model``, loadable with ``AutoModelForSeq2SeqLM``) instead. Returns the directory."""
    os.makedirs(directory, exist_ok=True)
    (build_t5_model(seed) if encoder_decoder else build_model(seed)).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    # Name the generic fast-tokenizer class: transformers 4.x does not know v5's "TokenizersBackend" alias.
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path) as f:
        tokenizer_config = json.load(f)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    return directory
