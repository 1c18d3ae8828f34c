"""The vLLM ``prompt_embeds`` request for a PEFT prompt-tuning adapter: the payload decodes to the sequence PEFT's
forward feeds the model (the base model run on it gives PEFT's logits). Running it in vLLM is GPU work."""

import json

import pytest
import torch

from fastpeft import tiny


def _small_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tiny.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tiny.PAD_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def test_prompt_embeds_payload_gives_peft_logits(tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    from fastpeft.serve.vllm import decode_tensor, prompt_embeds_request

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        peft_model = get_peft_model(_small_model(), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                       num_virtual_tokens=5)).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    tokenizer = tiny.build_tokenizer()
    body = prompt_embeds_request(_small_model(), tokenizer, str(tmp_path / "adapter"), "hello", "my-model",
                                 max_tokens=8, temperature=0)
    body = json.loads(json.dumps(body))  # JSON-serializable as sent
    assert body["model"] == "my-model" and body["max_tokens"] == 8 and body["temperature"] == 0
    embeds = decode_tensor(body["prompt_embeds"])
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    assert embeds.shape == (5 + ids.shape[1], 64)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits[0, -ids.shape[1]:]
        actual = _small_model()(inputs_embeds=embeds.unsqueeze(0)).logits[0, -ids.shape[1]:]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_prefix_tuning_is_refused(tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    from fastpeft.serve.vllm import prompt_embeds

    get_peft_model(_small_model(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)) \
        .save_pretrained(str(tmp_path / "prefix"))
    with pytest.raises(ValueError, match="prompt tuning and p-tuning only"):
        prompt_embeds(_small_model(), tiny.build_tokenizer(), str(tmp_path / "prefix"), "hi")
