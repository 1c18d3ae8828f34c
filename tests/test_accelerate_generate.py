"""fastpeft.accelerate and generate: greedy, sampling and beam search tokens equal PEFT's, left padding
included (PEFT's pad-aware generate positions), with the prefix outside the KV cache."""

import warnings

import pytest
import torch

import fastpeft
from tests.accelerate_helpers import (METHODS, NUM_VIRTUAL_TOKENS, batch_and_labels, forbid_framework_attention,
                                      greedy, interpreted_triton, make_peft_model)
from tests.models import CAUSAL_FAMILIES, tiny_model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_greedy_tokens_match_peft(family, method):
    peft_model = make_peft_model(family, method)
    ids, mask, _ = batch_and_labels(family)
    expected = greedy(peft_model, ids, mask)
    fastpeft.accelerate(peft_model)
    assert torch.equal(greedy(peft_model, ids, mask), expected)


def test_prefix_changes_the_generated_tokens():
    """The parity checks above would pass vacuously if the prefix had no effect on generation."""
    peft_model = make_peft_model("llama", "prefix")
    ids, mask, _ = batch_and_labels("llama")
    with_prefix = greedy(fastpeft.accelerate(peft_model), ids, mask, max_new_tokens=8)
    without = greedy(tiny_model("llama"), ids, mask, max_new_tokens=8)
    assert not torch.equal(with_prefix, without)


@pytest.mark.parametrize("family,method", [("llama", "prefix"), ("gpt2", "prefix_projection"), ("qwen2", "prompt")])
def test_sampling_matches_peft(family, method):
    peft_model = make_peft_model(family, method)
    ids, mask, _ = batch_and_labels(family)

    def sample():
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                       top_k=20, temperature=1.3, pad_token_id=0)

    expected = sample()
    fastpeft.accelerate(peft_model)
    assert torch.equal(sample(), expected)


@pytest.mark.parametrize("family,method", [("llama", "prefix"), ("qwen3", "prefix_projection"), ("gpt2", "p_tuning")])
def test_beam_search_matches_peft(family, method):
    peft_model = make_peft_model(family, method)
    ids, mask, _ = batch_and_labels(family)
    expected = greedy(peft_model, ids, mask, num_beams=3, num_return_sequences=2)
    fastpeft.accelerate(peft_model)
    assert torch.equal(greedy(peft_model, ids, mask, num_beams=3, num_return_sequences=2), expected)


@pytest.mark.parametrize("family,method", [("llama", "prefix"), ("gpt2", "prefix"), ("qwen2", "prompt"),
                                           ("gpt2", "p_tuning")])
def test_step_scores_match_and_prefix_is_not_in_the_cache(family, method):
    """Every step's logits equal PEFT's (PEFT's positions on the left-padded rows), and PEFT's cache holds P
    extra entries per layer and row (the prefix or the virtual tokens, per row) while the accelerated model's
    cache holds the real tokens only; the backbone's prepare_inputs_for_generation is put back after."""
    from tests.reference import assert_close

    peft_model = make_peft_model(family, method)
    ids, mask, _ = batch_and_labels(family)
    base = peft_model.get_base_model()
    peft_out = greedy(peft_model, ids, mask, return_dict_in_generate=True, output_scores=True)
    fastpeft.accelerate(peft_model)
    prepare_before = vars(base).get("prepare_inputs_for_generation")
    out = greedy(peft_model, ids, mask, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, peft_out.sequences)
    assert_close(torch.stack(out.scores), torch.stack(peft_out.scores), 1e-5, "step scores")
    cached = out.sequences.shape[1] - 1
    assert out.past_key_values.get_seq_length() == cached
    assert peft_out.past_key_values.get_seq_length() == cached + NUM_VIRTUAL_TOKENS
    assert vars(base).get("prepare_inputs_for_generation") == prepare_before


def test_generate_without_cache_and_from_embeddings():
    """Two generate modes PEFT's prefix tuning cannot run (use_cache=False fails on its mask; inputs_embeds is
    refused by its prepare_inputs_for_generation) give PEFT's cached tokens."""
    peft_model = make_peft_model("llama", "prefix")
    ids, mask, _ = batch_and_labels("llama")
    expected = greedy(peft_model, ids, mask, max_new_tokens=4)
    fastpeft.accelerate(peft_model)
    assert torch.equal(greedy(peft_model, ids, mask, max_new_tokens=4, use_cache=False), expected)
    embeddings = peft_model.get_base_model().get_input_embeddings()(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new_tokens = peft_model.generate(inputs_embeds=embeddings, attention_mask=mask, max_new_tokens=4,
                                         do_sample=False, pad_token_id=0)
    assert torch.equal(new_tokens, expected[:, ids.shape[1]:])


def test_generate_after_restore_is_peft():
    peft_model = make_peft_model("qwen2", "prefix")
    ids, mask, _ = batch_and_labels("qwen2")
    expected = greedy(peft_model, ids, mask)
    fastpeft.restore(fastpeft.accelerate(peft_model))
    assert torch.equal(greedy(peft_model, ids, mask), expected)


@pytest.mark.parametrize("method", ["prefix", "p_tuning"])
def test_interpreted_triton_generate_matches_peft(method, monkeypatch, interpreted_triton):
    """Prefill through the Triton attention kernel and decoding through the split-KV decode kernel (interpreted
    on CPU); neither SDPA nor eager attention may run."""
    peft_model = make_peft_model("llama", method)
    ids, mask, _ = batch_and_labels("llama")
    expected = greedy(peft_model, ids, mask, max_new_tokens=3)
    fastpeft.accelerate(peft_model)
    forbid_framework_attention(monkeypatch, peft_model)
    assert torch.equal(greedy(peft_model, ids, mask, max_new_tokens=3), expected)
