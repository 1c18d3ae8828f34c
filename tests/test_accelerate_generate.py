"""fastpeft.accelerate and generate: greedy, sampling and beam search against PEFT's forward looped without a
cache (PEFT's positions, left padding included), with the prefix outside the KV cache. Never against PEFT's or
transformers' generate: PEFT 0.21.2's generate stopped equalling its own forward with transformers 5.24."""

import warnings

import pytest
import torch

import fastpeft
from fastpeft.integration.compat import cache_of
from fastpeft.integration.reference_generate import generate_without_cache, teacher_forced_logits
from tests.accelerate_helpers import (METHODS, batch_and_labels, forbid_framework_attention, greedy,
                                      interpreted_triton, make_peft_model, reference_greedy)
from tests.models import CAUSAL_FAMILIES, tiny_model

EOS_ID = 2  # the eos id of most tiny configs (Qwen's have none): rows may end early and get padded


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_greedy_tokens_and_step_scores_match_peft_forward(family, method):
    """Every step's scores equal those of PEFT's forward (no cache) on the same tokens, left padding included."""
    from tests.reference import assert_close

    peft_model = make_peft_model(family, method)
    ids, mask, _ = batch_and_labels(family)
    expected, expected_logits = reference_greedy(peft_model, ids, mask)
    fastpeft.accelerate(peft_model)
    out = greedy(peft_model, ids, mask, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, expected)
    assert_close(torch.stack(out.logits), expected_logits, 1e-5, "step logits")


def test_prefix_changes_the_generated_tokens():
    """The parity checks above would pass vacuously if the prefix had no effect on generation."""
    peft_model = make_peft_model("llama", "prefix")
    ids, mask, _ = batch_and_labels("llama")
    with_prefix = greedy(fastpeft.accelerate(peft_model), ids, mask, max_new_tokens=8)
    without = greedy(tiny_model("llama"), ids, mask, max_new_tokens=8)
    assert not torch.equal(with_prefix, without)


@pytest.mark.parametrize("family,method", [("llama", "prefix"), ("gpt2", "prefix_projection"), ("qwen2", "prompt")])
def test_sampling_matches_peft_forward(family, method):
    """The same seed draws the same tokens as sampling from PEFT's forward with transformers' warpers, and every
    step's logits equal PEFT's forward on the tokens drawn."""
    from tests.reference import assert_close

    peft_model = make_peft_model(family, method)
    ids, mask, _ = batch_and_labels(family)
    settings = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=1.3)
    torch.manual_seed(7)
    expected, _ = generate_without_cache(peft_model, ids, mask, eos_token_id=EOS_ID, pad_token_id=0, **settings)
    fastpeft.accelerate(peft_model)
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, eos_token_id=EOS_ID,
                                  return_dict_in_generate=True, output_logits=True, **settings)
    fastpeft.restore(peft_model)
    forced = teacher_forced_logits(peft_model, out.sequences, mask, ids.shape[1])
    assert_close(torch.stack(out.logits), forced, 1e-5, "step logits on the sampled tokens")
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("family,method", [("llama", "prefix"), ("qwen3", "prefix_projection"), ("gpt2", "p_tuning")])
def test_beam_search_scores_match_peft_forward(family, method):
    """Each returned beam's per-token log-probabilities equal PEFT's forward on that beam's tokens, and the best
    beam scores at least as high as the greedy sequence (under PEFT's forward)."""
    from tests.reference import assert_close

    peft_model = make_peft_model(family, method)
    ids, mask, _ = batch_and_labels(family)
    fastpeft.accelerate(peft_model)
    beams = 3
    out = greedy(peft_model, ids, mask, num_beams=beams, num_return_sequences=2, return_dict_in_generate=True,
                 output_scores=True, length_penalty=0.0, eos_token_id=EOS_ID)
    transition = peft_model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    fastpeft.restore(peft_model)
    row_of_sequence = torch.arange(out.sequences.shape[0]) // 2
    forced = teacher_forced_logits(peft_model, out.sequences, mask[row_of_sequence], ids.shape[1])
    new_tokens = out.sequences[:, ids.shape[1]:]
    log_probs = forced.log_softmax(-1).gather(-1, new_tokens.T.unsqueeze(-1)).squeeze(-1).T
    steps = out.beam_indices[:, :new_tokens.shape[1]] >= 0
    assert steps.any()
    assert_close(transition[steps], log_probs[steps], 1e-5, "beam token log-probabilities")
    greedy_sequences, greedy_logits = reference_greedy(peft_model, ids, mask)
    greedy_tokens = greedy_sequences[:, ids.shape[1]:]
    greedy_score = greedy_logits.log_softmax(-1).gather(-1, greedy_tokens.T.unsqueeze(-1)).squeeze(-1).sum(0)
    best_beam_score = (log_probs * steps)[::2].sum(-1)
    assert (best_beam_score >= greedy_score - 1e-4).all()


@pytest.mark.parametrize("family,method", [("llama", "prefix"), ("gpt2", "prefix"), ("qwen2", "prompt"),
                                           ("gpt2", "p_tuning")])
def test_prefix_is_not_in_the_cache(family, method):
    """The accelerated model's cache holds the real tokens only (PEFT's holds P more per layer and row: the prefix
    or the virtual tokens), and the backbone's prepare_inputs_for_generation is put back after."""
    peft_model = make_peft_model(family, method)
    ids, mask, _ = batch_and_labels(family)
    base = peft_model.get_base_model()
    fastpeft.accelerate(peft_model)
    prepare_before = vars(base).get("prepare_inputs_for_generation")
    out = greedy(peft_model, ids, mask, return_dict_in_generate=True, eos_token_id=[])
    assert cache_of(out).get_seq_length() == out.sequences.shape[1] - 1
    assert vars(base).get("prepare_inputs_for_generation") == prepare_before


@pytest.mark.parametrize("method", METHODS)
def test_generate_inside_disable_adapter_is_the_base_model(method):
    """``with model.disable_adapter():`` generate gives the base model's scores (PEFT's own generate does)."""
    from tests.reference import assert_close

    peft_model = make_peft_model("llama", method)
    ids, mask, _ = batch_and_labels("llama")
    _, base_logits = reference_greedy(tiny_model("llama"), ids, mask, max_new_tokens=3)
    fastpeft.accelerate(peft_model)
    with peft_model.disable_adapter():
        out = greedy(peft_model, ids, mask, max_new_tokens=3, return_dict_in_generate=True, output_logits=True,
                     eos_token_id=[])
    assert_close(torch.stack(out.logits), base_logits, 1e-5, "step logits with the adapter disabled")
    enabled = greedy(peft_model, ids, mask, max_new_tokens=3, return_dict_in_generate=True, output_logits=True,
                     eos_token_id=[])
    assert (torch.stack(enabled.logits) - base_logits).abs().max() > 1e-2


def test_generate_without_cache_and_from_embeddings():
    """Two generate modes PEFT's prefix tuning cannot run (use_cache=False fails on its mask; inputs_embeds is
    refused by its prepare_inputs_for_generation) give the tokens of PEFT's forward."""
    peft_model = make_peft_model("llama", "prefix")
    ids, mask, _ = batch_and_labels("llama")
    expected, _ = reference_greedy(peft_model, ids, mask, max_new_tokens=4)
    fastpeft.accelerate(peft_model)
    assert torch.equal(greedy(peft_model, ids, mask, max_new_tokens=4, use_cache=False), expected)
    embeddings = peft_model.get_base_model().get_input_embeddings()(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new_tokens = peft_model.generate(inputs_embeds=embeddings, attention_mask=mask, max_new_tokens=4,
                                         do_sample=False, pad_token_id=0)
    assert torch.equal(new_tokens, expected[:, ids.shape[1]:])


def test_generate_after_restore_is_peft():
    """restore gives PEFT's own generate back, whatever it computes (an identity check, not an oracle)."""
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
    expected, _ = reference_greedy(peft_model, ids, mask, max_new_tokens=3)
    fastpeft.accelerate(peft_model)
    forbid_framework_attention(monkeypatch, peft_model)
    assert torch.equal(greedy(peft_model, ids, mask, max_new_tokens=3), expected)


QUIET_SCRIPT = r"""
import io, logging, sys, warnings
warnings.simplefilter("always")
import transformers
stream = io.StringIO()
transformers.logging.get_logger("transformers").addHandler(logging.StreamHandler(stream))
import fastpeft
from tests.accelerate_helpers import batch_and_labels, greedy, make_peft_model
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for method in ("prefix", "prompt"):
        model = fastpeft.accelerate(make_peft_model("llama", method))
        ids, mask, _ = batch_and_labels("llama")
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        model(input_ids=ids, attention_mask=mask)
messages = [str(w.message) for w in caught] + stream.getvalue().splitlines()
print("\n".join(m for m in messages if "past_key_values" in m or "cache_params" in m))
"""


def test_accelerated_generate_logs_no_deprecation():
    """No transformers deprecation message (the cache under its old name) from fastpeft's forward and generate;
    a fresh process, since transformers logs each message once per process."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", QUIET_SCRIPT], cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", result.stdout
