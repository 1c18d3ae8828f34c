"""fastpeft.accelerate on GPT-J where its attention is hand-written (transformers 5.17: ``GPTJAttention._attn``, no
attention interface; fastpeft/integration/handwritten_gptj.py), against PEFT itself on the same model, adapter and
left-padded inputs: loss, logits and every prompt gradient (float32, relative error < 1e-5), greedy tokens and step
logits against PEFT's forward looped without a cache, with GPT-J's own ``_attn`` forbidden so that only the kernels
attend. Then what the patch must keep: ``restore``, pickling and deep copies, gradient checkpointing (the recomputation
sees the prefix), ``output_attentions`` and attention dropout (GPT-J's own math over ``[prefix ; keys]``), and the
refusal of mask patterns the kernels do not compute. Skipped where GPT-J goes through the attention interface
(tests/test_accelerate_families.py covers it there)."""

import copy
import warnings

import pytest
import torch

import fastpeft
from fastpeft.integration import compat, handwritten, handwritten_gptj
from fastpeft.integration.checkpointing import set_checkpointing
from tests.accelerate_helpers import (METHODS, assert_same_step, assert_within_own_error, greedy, reference_greedy,
                                      training_step)
from tests.reference import assert_close
from tests.test_accelerate_families import P, batch, make


def _gptj_is_hand_written():
    import transformers as tf

    return not compat.uses_attention_interface(tf.GPTJForCausalLM)


pytestmark = pytest.mark.skipif(not _gptj_is_hand_written(), reason="GPT-J goes through the attention interface on "
                                "this transformers release (tests/test_accelerate_families.py)")


def _attention_class():
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    return GPTJAttention


def _accelerate(peft_model):
    """accelerate(strict=True): a fallback to PEFT's path would raise."""
    return fastpeft.accelerate(peft_model, strict=True)


def _forbid_gptj_attention(monkeypatch):
    """GPT-J's own ``_attn`` raises: only the instance patch (and so fastpeft's kernels) may attend."""

    def forbidden(*args, **kwargs):
        raise AssertionError("GPT-J's own _attn was called")

    monkeypatch.setattr(_attention_class(), "_attn", forbidden)


def _record_kernel_calls(monkeypatch):
    """Record, per kernel call of the patch, the prefix columns the queries see (0 without a prefix)."""
    calls = []
    original = handwritten_gptj.prefix_attention_prevalidated

    def recording(query, key, value, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None, **kwargs):
        calls.append(prefix_k.shape[-2] if prefix_lengths is None else int(prefix_lengths.max()))
        return original(query, key, value, prefix_k, prefix_v, prefix_index=prefix_index,
                        prefix_lengths=prefix_lengths, **kwargs)

    monkeypatch.setattr(handwritten_gptj, "prefix_attention_prevalidated", recording)
    return calls


def _state(peft_model):
    """The patch's live state, as the backbone's forward pre-hook holds it."""
    hooks = [hook for hook in peft_model.get_base_model()._forward_pre_hooks.values()
             if getattr(hook, "func", None) is handwritten_gptj._enter_call]
    assert len(hooks) == 1
    return hooks[0].args[0]


def _hooked(peft_model):
    """The backbone's modules that hold forward hooks or pre-hooks."""
    return [name for name, module in peft_model.get_base_model().named_modules()
            if module._forward_pre_hooks or module._forward_hooks]


NUM_LAYERS = 2  # tiny_base's n_layer


@pytest.mark.parametrize("method", METHODS + ("cpt",))
def test_forward_backward_match_peft(method, monkeypatch):
    peft_model = make("gptj", method)
    ids, mask, labels = batch("gptj")
    expected = training_step(peft_model, ids, mask, labels)
    _accelerate(peft_model)
    assert handwritten.family_of(peft_model.get_base_model()).name == "GPT-J"
    _forbid_gptj_attention(monkeypatch)
    calls = _record_kernel_calls(monkeypatch)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what=f"gptj/{method}")
    # Prefix tuning: every layer's kernel saw the P prefix columns; the others attend over the sequence alone.
    assert calls == [P if method.startswith("prefix") else 0] * NUM_LAYERS


@pytest.mark.parametrize("method", ["prefix", "prefix_projection", "prompt", "cpt"])
def test_greedy_matches_peft_forward(method, monkeypatch):
    peft_model = make("gptj", method)
    ids, mask, _ = batch("gptj")
    expected, expected_logits = reference_greedy(peft_model, ids, mask)
    _accelerate(peft_model)
    _forbid_gptj_attention(monkeypatch)
    calls = _record_kernel_calls(monkeypatch)
    out = greedy(peft_model, ids, mask, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, expected)
    assert_close(torch.stack(out.logits), expected_logits, 1e-5, f"gptj/{method} step logits")
    # Every step's layers read the prefix; prompt tuning serves its virtual tokens' K/V as one too, computed once by a
    # prefix-less forward.
    steps = len(out.logits)
    assert calls == [0] * (NUM_LAYERS if method in ("prompt", "cpt") else 0) + [P] * (NUM_LAYERS * steps)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_sequence_classification_matches_peft(method, monkeypatch):
    peft_model = make("gptj", method, task="seq_cls", num_labels=3)
    ids, mask, labels = batch("gptj", task="seq_cls")
    expected = training_step(peft_model, ids, mask, labels)
    _accelerate(peft_model)
    _forbid_gptj_attention(monkeypatch)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what=f"gptj seq_cls/{method}")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_bfloat16_backbone_matches_peft_within_its_own_error(method):
    """A bfloat16 backbone: GPT-J computes the scores in float32 and so does the patch (its output in v's dtype); the
    error against the float32 step stays within a small multiple of PEFT's own bfloat16 error."""
    peft_model = make("gptj", method)
    ids, mask, labels = batch("gptj")
    exact = training_step(peft_model, ids, mask, labels)
    peft_model.get_base_model().to(torch.bfloat16)
    peft_bf16 = training_step(peft_model, ids, mask, labels)
    _accelerate(peft_model)
    assert_within_own_error(training_step(peft_model, ids, mask, labels), peft_bf16, exact)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["prefix_projection", "prompt"])
def test_cuda_bfloat16_matches_peft_within_its_own_error(method):
    """On the GPU the patch's float32 calls run the compiled kernels: a bfloat16 training step against float32 PEFT,
    bounded by PEFT's own bfloat16 error, and greedy generation through the decode path."""
    peft_model = make("gptj", method).cuda()
    ids, mask, labels = (t.cuda() for t in batch("gptj"))
    exact = training_step(peft_model, ids, mask, labels)
    peft_model.get_base_model().to(torch.bfloat16)
    peft_bf16 = training_step(peft_model, ids, mask, labels)
    _accelerate(peft_model)
    assert_within_own_error(training_step(peft_model, ids, mask, labels), peft_bf16, exact)
    generated = greedy(peft_model, ids, mask, max_new_tokens=4)
    assert generated.shape == (ids.shape[0], ids.shape[1] + 4) and torch.equal(generated[:, :ids.shape[1]], ids)


def test_restore_gives_back_gptj_own_attention():
    peft_model = make("gptj", "prefix")
    ids, mask, labels = batch("gptj")
    expected = training_step(peft_model, ids, mask, labels)
    base = peft_model.get_base_model()
    modules = [module for module in base.modules() if isinstance(module, _attention_class())]
    _accelerate(peft_model)
    assert all("_attn" in vars(module) for module in modules)
    assert _hooked(peft_model) == ["", "transformer"]  # GPTJForCausalLM and its GPTJModel
    fastpeft.restore(peft_model)
    assert not any("_attn" in vars(module) for module in modules)
    assert not _hooked(peft_model)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, rtol=1e-12)  # PEFT's very path


def test_accelerated_model_pickles_and_deep_copies(tmp_path):
    peft_model = _accelerate(make("gptj", "prefix"))
    ids, mask, _ = batch("gptj")
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.save(peft_model, tmp_path / "model.pt")
    clones = (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(peft_model))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.add_(1.0)
    for clone in clones:
        clone_modules = [module for module in clone.get_base_model().modules()
                         if isinstance(module, _attention_class())]
        # The clone's patch reads the clone's modules and its own state, not the original's.
        assert all(module._attn.args[0] is module for module in clone_modules)
        assert _state(clone) is clone_modules[0]._attn.args[1] and _state(clone) is not _state(peft_model)
        with torch.no_grad():
            assert torch.equal(clone(input_ids=ids, attention_mask=mask).logits, expected)
        fastpeft.restore(clone)
        assert not any("_attn" in vars(module) for module in clone_modules)
        assert not _hooked(clone)
    assert fastpeft.integration.peft.is_accelerated(peft_model)
    assert _hooked(peft_model) == ["", "transformer"]


def test_gradient_checkpointing_recomputation_sees_the_prefix(monkeypatch):
    """PEFT refuses prefix tuning under gradient checkpointing; accelerated, the backward's recomputation of each
    block finds the prefix of its forward (filed under the block's mask) and the step equals PEFT's without it."""
    peft_model = make("gptj", "prefix_projection")
    ids, mask, labels = batch("gptj")
    expected = training_step(peft_model, ids, mask, labels)
    _accelerate(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        set_checkpointing(peft_model.get_base_model(), True)
    _forbid_gptj_attention(monkeypatch)
    calls = _record_kernel_calls(monkeypatch)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what="checkpointed")
    # Each layer attended twice, with the prefix both times: in the forward and in the backward's recomputation.
    assert calls == [P] * (2 * NUM_LAYERS)
    assert not _state(peft_model).plans  # the plans died with their masks


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_output_attentions_are_peft_s(method):
    """The kernels return no weights: with output_attentions GPT-J's own math runs over [prefix ; keys], giving
    PEFT's weights (prefix tuning: [B, H, L, P + L]) and logits."""
    peft_model = make("gptj", method)
    ids, mask, _ = batch("gptj")
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, output_attentions=True)
        _accelerate(peft_model)
        out = peft_model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == NUM_LAYERS
    for layer, (weights, expected_weights) in enumerate(zip(out.attentions, expected.attentions)):
        assert weights.shape == expected_weights.shape == (3, 4, ids.shape[1] + (P if method == "prompt" else 0),
                                                           ids.shape[1] + P)
        assert_close(weights, expected_weights, 1e-5, f"layer {layer} weights")
    assert_close(out.logits, expected.logits, 1e-5, "logits")


def test_output_attentions_of_the_inner_model_called_alone():
    """GPTJModel called by itself (not through the patched outer model) still returns GPT-J's weights."""
    peft_model = make("gptj", "prompt")
    transformer = peft_model.get_base_model().transformer
    ids, mask, _ = batch("gptj")
    with torch.no_grad():
        expected = transformer(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        _accelerate(peft_model)
        attentions = transformer(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for weights, expected_weights in zip(attentions, expected):
        assert_close(weights, expected_weights, 1e-6, "weights")


def test_attention_dropout_in_training_matches_peft_draw_for_draw():
    """With attn_pdrop > 0 in training, GPT-J's own _attn runs over [prefix ; keys]: the dropout mask has PEFT's shape,
    so the same seed draws the same mask and the step is PEFT's."""
    peft_model = make("gptj", "prefix", attn_pdrop=0.3)
    ids, mask, labels = batch("gptj")
    torch.manual_seed(7)
    expected = training_step(peft_model, ids, mask, labels)
    _accelerate(peft_model)
    torch.manual_seed(7)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what="attention dropout")


def test_mask_patterns_the_kernels_do_not_compute_are_refused():
    """Packed sequences (position_ids that restart, no attention mask) make transformers build a block-diagonal mask;
    a 4-D mask given to the model reaches attention as it is. Both are refused, never approximated."""
    peft_model = _accelerate(make("gptj", "prompt"))
    base = peft_model.get_base_model()
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad(), pytest.raises(ValueError, match="packed sequences"):
        base(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), use_cache=False)
    with torch.no_grad(), pytest.raises(ValueError, match="2-D attention_mask"):
        base(input_ids=ids, attention_mask=torch.zeros(1, 1, 6, 6))
    assert _state(peft_model).calls() == []  # the refused calls ended, as every call does
    with torch.no_grad():  # the plain causal pattern still runs (and padding: the tests above)
        base(input_ids=ids)


def test_a_second_peft_model_on_the_same_backbone_shares_the_patch():
    """accelerate on a second PEFT model of one backbone keeps the first patch (its restore does nothing); the first
    restore undoes it, as it switches an interface model's attention implementation back for both."""
    from peft import PromptTuningConfig, get_peft_model

    first = _accelerate(make("gptj", "prompt"))
    base = first.get_base_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second = _accelerate(get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)))
    assert _hooked(first) == ["", "transformer"] and len(base._forward_pre_hooks) == 1
    fastpeft.restore(second)
    assert _hooked(first) == ["", "transformer"]
    fastpeft.restore(first)
    assert not _hooked(first)


def test_flash_attention_gptj_is_not_taken_for_the_hand_written_one():
    """GPTJFlashAttention2 computes attention its own way: a model holding one falls back to PEFT's path."""
    from transformers.models.gptj.modeling_gptj import GPTJFlashAttention2

    peft_model = make("gptj", "prompt")
    block = peft_model.get_base_model().transformer.h[0]
    block.attn = GPTJFlashAttention2(block.attn.config, layer_idx=0)
    assert not handwritten_gptj.matches(peft_model.get_base_model())
    with pytest.warns(fastpeft.FallbackWarning, match="attention interface"):
        fastpeft.accelerate(peft_model)


def test_concurrent_calls_in_threads_each_see_their_own_prefix():
    """The call (and its prefix) is held per thread: a prefix-tuning forward and a bare backbone forward (no prefix)
    running concurrently on one model each give what they give alone."""
    import threading

    peft_model = _accelerate(make("gptj", "prefix"))
    base = peft_model.get_base_model()
    ids, mask, _ = batch("gptj")
    with torch.no_grad():
        expected = {"prefix": peft_model(input_ids=ids, attention_mask=mask).logits,
                    "bare": base(input_ids=ids, attention_mask=mask).logits}
    runs = {"prefix": lambda: peft_model(input_ids=ids, attention_mask=mask).logits,
            "bare": lambda: base(input_ids=ids, attention_mask=mask).logits}
    start, mismatches = threading.Barrier(2), []

    def repeat(name):
        start.wait()
        with torch.no_grad():
            for _ in range(20):
                if not torch.equal(runs[name]()[mask.bool()], expected[name][mask.bool()]):
                    mismatches.append(name)

    threads = [threading.Thread(target=repeat, args=(name,)) for name in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches
