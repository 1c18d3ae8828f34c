"""fastpeft.AdapterBank on a bitsandbytes-quantized backbone (4-bit NF4 and 8-bit, both run on CPU): every row of a
mixed batch equals PEFT on the same quantized model, that row alone, with its own adapter."""

import pytest
import torch

from fastpeft.bank import AdapterBank
from tests.bank_fixtures import (ADAPTER_KINDS, assert_rows_match_reference, make_peft_model, make_rows, pad_rows,
                                 peft_reference)
from tests.models import tiny_model

NEW_TOKENS = 3
ROW_ADAPTERS = ("prefix", None, "prompt", "p-tuning", "prefix-proj", None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama checkpoint (hidden size divisible by 64, as bitsandbytes needs) and one adapter of every kind."""
    root = tmp_path_factory.mktemp("quantized")
    tiny_model("llama").save_pretrained(str(root / "base"))
    dirs = {}
    for i, kind in enumerate(ADAPTER_KINDS):
        dirs[kind] = str(root / kind)
        make_peft_model(lambda: tiny_model("llama"), kind, seed=200 + i).save_pretrained(dirs[kind])
    return str(root / "base"), dirs


def _load_quantized(path, bits):
    import transformers

    if bits == 4:
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    else:
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_mixed_batch_on_quantized_backbone_equals_peft_per_row(checkpoints, bits):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    base_path, dirs = checkpoints
    reference_base = _load_quantized(base_path, bits)
    quantized_layer = type(reference_base.model.layers[0].self_attn.q_proj).__name__
    assert quantized_layer == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    # Prompt learning leaves the base model untouched, so one quantized base serves every PEFT reference.
    reference_of = {kind: PeftModel.from_pretrained(reference_base, dirs[kind]).eval() for kind in ADAPTER_KINDS}
    reference_of[None] = reference_base
    rows = make_rows(seed=3, lengths=(4, 6, 2, 5, 3, 6))
    references = [peft_reference(reference_of[name], row, NEW_TOKENS) for row, name in zip(rows, ROW_ADAPTERS)]

    with AdapterBank(_load_quantized(base_path, bits)) as bank:
        for kind, directory in dirs.items():
            bank.add(kind, directory)
        ids, mask = pad_rows(rows, "left")
        logits = bank(ids, attention_mask=mask, adapters=ROW_ADAPTERS).logits
        generated = bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS, max_new_tokens=NEW_TOKENS)
    assert_rows_match_reference(logits, generated, mask, rows, ROW_ADAPTERS, references)
