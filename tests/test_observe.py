"""fastpeft.observe.attention_calls: every attention call counted once, by the backend that ran it."""

import torch

import fastpeft
from fastpeft.observe import attention_calls
from tests.accelerate_helpers import batch_and_labels, make_peft_model


def _inputs(requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=generator)
    k, v = (torch.randn(2, 2, 5, 16, generator=generator) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(2, 3, 16, generator=generator) for _ in range(2))
    for t in (q, k, v, prefix_k, prefix_v):
        t.requires_grad_(requires_grad)
    return q, k, v, prefix_k, prefix_v


def test_counts_each_call_by_backend(backend_env):
    q, k, v, prefix_k, prefix_v = _inputs()
    with attention_calls() as calls:
        fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v)
        fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v, attn_bias=torch.zeros(1, 1, 1, 3 + 5))
        backend_env("reference")
        fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v)
    assert calls == {"sdpa": 2, "reference": 1}


def test_backward_is_not_another_call():
    q, k, v, prefix_k, prefix_v = _inputs(requires_grad=True)
    with attention_calls() as calls:
        fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v).sum().backward()
    assert calls == {"sdpa": 1}
    assert q.grad is not None


def test_blocks_nest_and_stop_counting_when_closed():
    q, k, v, prefix_k, prefix_v = _inputs()
    with attention_calls() as outer:
        fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v)
        with attention_calls() as inner:
            fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v)
        fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v)
    fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v)
    assert outer == {"sdpa": 3}
    assert inner == {"sdpa": 1}


def test_an_accelerated_model_counts_one_call_per_layer():
    peft_model = make_peft_model("llama", "prefix")
    ids, mask, _ = batch_and_labels("llama")
    with attention_calls() as before:
        peft_model(input_ids=ids, attention_mask=mask)
    fastpeft.accelerate(peft_model)
    with attention_calls() as after:
        peft_model(input_ids=ids, attention_mask=mask)
    assert before == {}  # PEFT's own path never calls fastpeft
    assert after == {"sdpa": peft_model.get_base_model().config.num_hidden_layers}
