"""Every prefix fastpeft hands a model is consumed by every attention layer, or the call raises.

fastpeft hands each layer its prefix (or prompt tuning's virtual-token K/V in generate) as a keyword argument of
the model's forward. A model class may declare that keyword arguments reach its attention functions
(``_supports_attention_backend``) while a layer's attention drops them on some transformers release: that layer
would then attend without its prefix and the output would be silently wrong. The spec counts, per call, which
layers' attention took their prefix (``PrefixSpec.check_consumed``); these tests use a tiny model whose chosen
layers drop keyword arguments (tests/model_dropping_attention_kwargs.py) and check that every entry point raises,
and that the same model with no such layer gives PEFT's numbers."""

import warnings

import pytest
import torch

import fastpeft
from fastpeft.integration import attention
from tests.accelerate_helpers import (assert_same_step, batch_and_labels, greedy, make_peft_model, reference_greedy,
                                      training_step)
from tests.model_dropping_attention_kwargs import tiny_keyword_dropping_model
from tests.reference import assert_close

DROPPED = "reached the attention of {} of KeywordDroppingLlamaForCausalLM's 2 layers in this call, not layers {}"


@pytest.mark.parametrize("method", ["prefix", "prefix_projection"])
def test_model_whose_layers_all_take_the_prefix_matches_peft(method):
    """The control: the same model class with no keyword-dropping layer runs accelerated with PEFT's loss, logits,
    prompt gradients and greedy tokens (so the raises below come from the dropped keyword, not from the model)."""
    peft_model = make_peft_model("llama", method, base=tiny_keyword_dropping_model(()))
    ids, mask, labels = batch_and_labels("llama")
    expected = training_step(peft_model, ids, mask, labels)
    reference, _ = reference_greedy(peft_model, ids, mask, max_new_tokens=4)
    fastpeft.accelerate(peft_model, strict=True)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what=method)
    assert torch.equal(greedy(peft_model, ids, mask, max_new_tokens=4), reference)


@pytest.mark.parametrize("dropping", [(1,), (0, 1)])
def test_prefix_tuning_forward_and_generate_raise_when_a_layer_drops_the_prefix(dropping):
    peft_model = make_peft_model("llama", "prefix", base=tiny_keyword_dropping_model(dropping))
    ids, mask, labels = batch_and_labels("llama")
    fastpeft.accelerate(peft_model, strict=True)  # the class declares _supports_attention_backend: not detectable
    message = DROPPED.format(2 - len(dropping), list(dropping)).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ValueError, match="the prefix " + message):
        peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    with pytest.raises(ValueError, match="the prefix " + message):
        greedy(peft_model, ids, mask, max_new_tokens=3)


def test_forward_replaced_by_a_test_double_is_not_checked_unless_a_layer_took_the_prefix(monkeypatch):
    """PEFT's own suite replaces the backbone's forward on the instance by a stub that records the position ids it
    gets and runs no attention (``test_prefix_tuning_offsets_position_ids_in_forward``): the accelerated forward
    hands it PEFT's ids (offset by the prefix) and does not raise. A replacement that runs the model's layers is
    checked as usual: one of them dropping the prefix raises."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    peft_model = make_peft_model("llama", "prefix", base=tiny_keyword_dropping_model((1,)))
    fastpeft.accelerate(peft_model, strict=True)
    base = peft_model.get_base_model()
    ids, mask, _ = batch_and_labels("llama")
    positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    class_forward = base.forward
    received = {}

    def stub(*args, **kwargs):
        received["position_ids"] = kwargs["position_ids"]
        return CausalLMOutputWithPast(logits=torch.zeros(*ids.shape, base.config.vocab_size))

    monkeypatch.setattr(base, "forward", stub)
    peft_model(input_ids=ids, position_ids=positions)
    assert torch.equal(received["position_ids"], positions + peft_model.active_peft_config.num_virtual_tokens)

    monkeypatch.setattr(base, "forward", lambda *args, **kwargs: class_forward(*args, **kwargs))
    with pytest.raises(ValueError, match="the prefix " + DROPPED.format(1, r"\[1\]")):
        peft_model(input_ids=ids, attention_mask=mask)


def test_prompt_tuning_generate_raises_when_a_layer_drops_the_virtual_tokens():
    """Prompt tuning's forward hands attention nothing but the sequence (PEFT's own forward: it runs and equals
    PEFT); its generate serves the virtual tokens' K/V as a prefix, which layer 1 would drop: it raises."""
    peft_model = make_peft_model("llama", "prompt", base=tiny_keyword_dropping_model((1,)))
    ids, mask, labels = batch_and_labels("llama")
    expected = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model, strict=True)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what="prompt")
    with pytest.raises(ValueError, match=r"the virtual tokens' keys and values " + DROPPED.format(1, r"\[1\]")):
        greedy(peft_model, ids, mask, max_new_tokens=3)


def test_adapter_bank_raises_when_a_layer_drops_the_prefix():
    base = tiny_keyword_dropping_model((1,))
    peft_model = make_peft_model("llama", "prefix", base=tiny_keyword_dropping_model((1,)))
    bank = fastpeft.AdapterBank(base)
    bank.add("tenant", peft_model)
    ids, mask, _ = batch_and_labels("llama")
    message = r"the adapters' prefixes " + DROPPED.format(1, r"\[1\]")
    with pytest.raises(ValueError, match=message):
        bank(ids, attention_mask=mask, adapters=["tenant", None, "tenant"])
    with pytest.raises(ValueError, match=message):
        bank.generate(ids, attention_mask=mask, adapters=["tenant", None, "tenant"], max_new_tokens=2)


def test_multi_prefix_trainer_raises_when_a_layer_drops_the_prefix():
    from peft import PrefixTuningConfig

    trainer = fastpeft.MultiPrefixTrainer(tiny_keyword_dropping_model((0,)))
    trainer.add_adapter("a", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids, mask, labels = batch_and_labels("llama")
    with pytest.raises(ValueError, match=r"the adapters' prefixes " + DROPPED.format(1, r"\[0\]")):
        trainer(ids, ["a"] * ids.shape[0], attention_mask=mask, labels=labels)


def test_check_consumed_counts_per_call_and_per_generation_step():
    """The count is per call: a spec checked after a call starts afresh, so a spec reused over generation steps
    (AdapterBank reuses one) must be consumed by every layer at every step."""
    prefix = torch.zeros(2, 3, 8)
    spec = attention.PrefixSpec.build([prefix] * 3, [prefix] * 3)
    for layer in (0, 2, 1, 2):
        spec.layer(layer)
    spec.check_consumed("M")  # every layer, one twice: fine
    spec.layer(0)
    with pytest.raises(ValueError, match=r"reached the attention of 1 of M's 3 layers in this call, not layers "
                                         r"\[1, 2\]"):
        spec.check_consumed("M")
    steps = attention.GenerationStepChecks("M")
    for _ in range(2):
        step_spec = steps.next(spec)
        for layer in range(3):
            step_spec.layer(layer)
    steps.next(spec).layer(0)  # the third step's forward skipped layers 1 and 2
    with pytest.raises(ValueError, match=r"1 of M's 3 layers"):
        steps.finish()
    steps.finish()  # nothing pending any more


def test_a_layer_without_a_prefix_is_counted_and_attends_to_the_sequence_alone():
    """A spec entry of None (a layer PEFT gives no prefix: Gemma models) still counts as consumed, and that layer's
    attention equals attention without any prefix."""
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 5, 8, generator=g) for _ in range(3))
    prefix = torch.randn(4, 3, 8, generator=g)
    spec = attention.PrefixSpec.build([prefix, None], [prefix, None])
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 1, True
    with_none, _ = attention.fastpeft_attention_forward(module, query, key, value, None,
                                                        **{attention.PREFIX_KWARG: spec})
    without, _ = attention.fastpeft_attention_forward(module, query, key, value, None)
    assert_close(with_none, without, 1e-6, "a layer without a prefix")
    module.layer_idx = 0
    attention.fastpeft_attention_forward(module, query, key, value, None, **{attention.PREFIX_KWARG: spec})
    spec.check_consumed("M")
    with pytest.raises(ValueError, match="at least one layer"):
        attention.PrefixSpec.build([None, None], [None, None])
    with pytest.raises(ValueError, match="None for both"):
        attention.PrefixSpec.build([prefix, None], [prefix, prefix])


def test_layerdrop_prefix_tuning_falls_back_naming_it():
    """LayerDrop skips layers at random in training: a skipped layer takes no prefix, which the per-call count
    cannot tell from a dropped keyword, so accelerate refuses it up front (PEFT's path, FallbackWarning)."""
    from tests.test_accelerate_families import make

    peft_model = make("opt", "prefix", layerdrop=0.5)
    with pytest.warns(fastpeft.FallbackWarning, match="LayerDrop"):
        fastpeft.accelerate(peft_model)
    assert not fastpeft.integration.peft.is_accelerated(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prompt_model = make("opt", "prompt", layerdrop=0.5)
    fastpeft.accelerate(prompt_model, strict=True)  # prompt tuning hands attention no prefix in training
