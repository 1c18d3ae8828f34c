"""fastpeft.accelerate on bitsandbytes-quantized backbones (CPU): 4-bit nf4 and fp4, and 8-bit (LLM.int8, which
bitsandbytes also runs on CPU): loss, logits, prompt gradients and greedy tokens equal PEFT's (its forward, looped
without a cache, for the tokens) on the same quantized model.

bitsandbytes' CPU 4-bit layers repack their weights for a faster kernel on their first eval-mode call without
gradients (AVX512-BF16 machines); the repacked layers compute slightly different numbers and pass no input
gradient. The tests therefore train first (PEFT, then fastpeft), and generate only after, PEFT then fastpeft, so
that both sides always see the same weights.
"""

import warnings

import pytest
import torch

import fastpeft
from tests.accelerate_helpers import (assert_same_step, batch_and_labels, greedy, make_peft_model, reference_greedy,
                                      training_step)
from tests.models import tiny_model

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def saved_backbones(tmp_path_factory):
    """Tiny fp32 checkpoints to load quantized (bitsandbytes quantizes while loading)."""
    paths = {}

    def path(family):
        if family not in paths:
            paths[family] = tmp_path_factory.mktemp(family)
            tiny_model(family).save_pretrained(paths[family])
        return paths[family]

    return path


def _quantized(path, quantization):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantization == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                    bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, attn_implementation="sdpa",
                                                    device_map="cpu")


@pytest.mark.parametrize("family,method,quantization", [
    ("llama", "prefix", "nf4"),
    ("qwen2", "prefix_projection", "nf4"),
    ("mistral", "prompt", "nf4"),
    ("llama", "prefix", "fp4"),
    ("qwen3", "p_tuning", "fp4"),
    ("llama", "prefix_projection", "int8"),
    ("qwen2", "prompt", "int8"),
])
def test_quantized_backbone_matches_peft(family, method, quantization, saved_backbones):
    base = _quantized(saved_backbones(family), quantization)
    linear = type(base.model.layers[0].self_attn.q_proj).__name__
    assert linear == ("Linear8bitLt" if quantization == "int8" else "Linear4bit")
    peft_model = make_peft_model(family, method, base=base)
    ids, mask, labels = batch_and_labels(family)

    expected = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what=f"{quantization} {family}")

    fastpeft.restore(peft_model)
    expected_tokens, _ = reference_greedy(peft_model, ids, mask)
    fastpeft.accelerate(peft_model)
    assert torch.equal(greedy(peft_model, ids, mask), expected_tokens)
