"""fastpeft.accelerate on PEFT prompt-learning models: forward/backward parity with PEFT for every family and
method (left-padded rows), PEFT's position rules, restore, saved adapters, and the refusals."""

import json
import warnings

import pytest
import torch

import fastpeft
from fastpeft.integration import attention
from tests.accelerate_helpers import (METHODS, NUM_VIRTUAL_TOKENS, assert_same_step, assert_within_own_error,
                                      batch_and_labels, forbid_framework_attention, greedy, interpreted_triton,
                                      make_peft_model, peft_config, randomize_prompt_parameters, reference_greedy,
                                      training_step)
from tests.models import ALL_FAMILIES, tiny_model
from tests.reference import assert_close


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_forward_backward_match_peft(family, method):
    peft_model = make_peft_model(family, method)
    ids, mask, labels = batch_and_labels(family)
    expected = training_step(peft_model, ids, mask, labels)

    assert fastpeft.accelerate(peft_model) is peft_model
    assert peft_model.get_base_model().config._attn_implementation == attention.ATTN_IMPLEMENTATION
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what=f"{family}/{method}")


def _spy_attention_calls(monkeypatch):
    """Record (key length, attention mask, prefix spec) of every fastpeft attention call."""
    calls = []
    original = attention.fastpeft_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((key.shape[2], attention_mask, kwargs.get(attention.PREFIX_KWARG)))
        return original(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.ATTN_IMPLEMENTATION, spy)
    return calls


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_prefix_is_fused_not_expanded(family, monkeypatch):
    """The encoder runs once per step; every layer gets shared [Hkv, P, D] prefix K/V; keys are the real tokens
    only; the mask is the key padding mask [B, 1, 1, L], no 4-D causal mask."""
    peft_model = fastpeft.accelerate(make_peft_model(family, "prefix_projection"))
    ids, mask, labels = batch_and_labels(family)
    calls = _spy_attention_calls(monkeypatch)
    encoder_inputs = []
    peft_model.prompt_encoder["default"].register_forward_hook(
        lambda module, args, output: encoder_inputs.append(args[0]))
    training_step(peft_model, ids, mask, labels)

    # The prompt encoder ran once, on arange(P), not on (B, P) ids.
    assert len(encoder_inputs) == 1 and torch.equal(encoder_inputs[0], torch.arange(NUM_VIRTUAL_TOKENS))
    config = peft_model.active_peft_config
    head_dim = config.token_dim // config.num_attention_heads
    assert len(calls) == config.num_layers
    for key_length, attention_mask, spec in calls:
        assert key_length == ids.shape[1]
        assert attention_mask is not None and attention_mask.shape == (ids.shape[0], 1, 1, ids.shape[1])
        assert torch.equal(attention_mask[:, 0, 0], mask.bool())
        assert all(k.shape == (config.num_attention_heads, NUM_VIRTUAL_TOKENS, head_dim) for k in spec.keys)
        assert spec.prefix_index is None


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_prompt_learning_attention_gets_a_key_padding_mask(method, monkeypatch):
    """Virtual tokens are part of the sequence: keys cover P + L, padding arrives as a [B, 1, 1, P + L] key padding
    mask."""
    peft_model = fastpeft.accelerate(make_peft_model("qwen2", method))
    ids, mask, labels = batch_and_labels("qwen2")
    calls = _spy_attention_calls(monkeypatch)
    training_step(peft_model, ids, mask, labels)
    assert len(calls) == peft_model.get_base_model().config.num_hidden_layers
    for key_length, attention_mask, spec in calls:
        assert key_length == NUM_VIRTUAL_TOKENS + ids.shape[1]
        assert spec is None
        assert attention_mask.shape == (ids.shape[0], 1, 1, key_length)
        assert attention_mask[:, 0, 0, :NUM_VIRTUAL_TOKENS].all() and torch.equal(
            attention_mask[:, 0, 0, NUM_VIRTUAL_TOKENS:], mask.bool())


def test_prefix_keys_values_are_peft_layout():
    """Layer i's K is slot 2i of PEFT's (P, 2*layers, Hkv, D) view, V slot 2i+1, never rotated."""
    peft_model = make_peft_model("llama", "prefix")
    config = peft_model.active_peft_config
    spec = fastpeft.integration.peft.prefix_spec(peft_model)
    weight = peft_model.prompt_encoder["default"].embedding.weight
    view = weight.view(NUM_VIRTUAL_TOKENS, 2 * config.num_layers, config.num_attention_heads, -1)
    for layer in range(config.num_layers):
        assert torch.equal(spec.keys[layer], view[:, 2 * layer].transpose(0, 1))
        assert torch.equal(spec.values[layer], view[:, 2 * layer + 1].transpose(0, 1))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_user_position_ids_are_shifted_like_peft(family):
    peft_model = make_peft_model(family, "prefix")
    ids, mask, labels = batch_and_labels(family)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # pad-aware positions chosen by the user
    expected = training_step(peft_model, ids, mask, labels, position_ids=position_ids)
    fastpeft.accelerate(peft_model)
    assert_same_step(training_step(peft_model, ids, mask, labels, position_ids=position_ids), expected)


def test_inference_mode_adapter_matches_peft(tmp_path):
    """A saved adapter loaded for inference keeps only the MLP's output: the prefix comes from the weights."""
    from peft import PeftModel

    trained = make_peft_model("qwen3", "prefix_projection")
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("qwen3", attn_implementation="sdpa"), tmp_path)
    ids, mask, _ = batch_and_labels("qwen3")
    with torch.no_grad():
        expected = loaded(input_ids=ids, attention_mask=mask).logits
        fastpeft.accelerate(loaded)
        actual = loaded(input_ids=ids, attention_mask=mask).logits
    assert_close(actual[mask.bool()], expected[mask.bool()], 1e-5, "logits")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_restore_round_trip(method):
    peft_model = make_peft_model("mistral", method, attn_implementation="eager")
    ids, mask, labels = batch_and_labels("mistral")
    expected = training_step(peft_model, ids, mask, labels)

    fastpeft.accelerate(peft_model)
    assert fastpeft.accelerate(peft_model) is peft_model  # idempotent
    assert "forward" in vars(peft_model)
    assert fastpeft.restore(peft_model) is peft_model
    assert peft_model.get_base_model().config._attn_implementation == "eager"
    assert not {"forward", "generate", "_setup_prompt_encoder"} & set(vars(peft_model))
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="not accelerated"):
        fastpeft.restore(peft_model)


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_is_peft_and_loads_in_plain_peft(method, tmp_path):
    from peft import PeftModel

    peft_model = make_peft_model("llama", method)
    peft_model.save_pretrained(tmp_path / "peft")
    fastpeft.accelerate(peft_model)
    peft_model.save_pretrained(tmp_path / "fastpeft")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "peft" / name).read_bytes() == (tmp_path / "fastpeft" / name).read_bytes(), name
    assert json.loads((tmp_path / "fastpeft" / "adapter_config.json").read_text())["peft_type"] in (
        "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")

    ids, mask, _ = batch_and_labels("llama")
    plain = PeftModel.from_pretrained(tiny_model("llama", attn_implementation="sdpa"), tmp_path / "fastpeft")
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        actual = peft_model(input_ids=ids, attention_mask=mask).logits
    assert_close(actual, expected, 1e-5, "logits of the adapter reloaded in plain PEFT")


def test_add_adapter_with_gradient_checkpointing_is_allowed():
    """PEFT refuses a prefix-tuning adapter while gradient checkpointing is on; an accelerated model accepts it."""
    peft_model = make_peft_model("llama", "prefix")
    peft_model.get_base_model().gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft_model.add_adapter("second", peft_config("prefix", "llama"))
    fastpeft.accelerate(peft_model)
    peft_model.add_adapter("second", peft_config("prefix", "llama"))
    assert "second" in peft_model.prompt_encoder
    assert peft_model.get_base_model().model.gradient_checkpointing


# ------------------------------------------------------------------------------------------------- refusals


def test_refuses_non_peft_and_non_prompt_learning():
    with pytest.raises(ValueError, match="peft.PeftModel"):
        fastpeft.accelerate(tiny_model("llama"))
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_model("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LORA"):
        fastpeft.accelerate(lora)


def test_strict_refuses_unsupported_family():
    """A model whose attention is hand-written (it bypasses transformers' attention interface, as Falcon's did up to
    transformers 5.24): with strict=True refused, untouched (the default fallback is tested in
    test_accelerate_families.py)."""
    from peft import get_peft_model

    from tests.model_bypassing_attention_interface import tiny_handwritten_attention_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_handwritten_attention_model(), peft_config("prompt", "llama"))
    with pytest.raises(ValueError, match="attention interface"):
        fastpeft.accelerate(peft_model, strict=True)
    assert peft_model.config._attn_implementation != attention.ATTN_IMPLEMENTATION


def test_backbone_outside_transformers_falls_back_before_reading_its_config(tmp_path):
    """PEFT runs prefix tuning on any nn.Module with a config (its own suite saves and loads one whose config has
    only vocab_size). accelerate cannot compute such a module's attention: a FallbackWarning, decided before any
    transformers attribute is read, leaves PEFT's path untouched (saving and loading included); strict raises."""
    from peft import PeftModel, PrefixTuningConfig, get_peft_model

    from fastpeft.integration.peft import fallback_reason

    class DictConfig(dict):
        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

    class NotATransformersModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = DictConfig(vocab_size=10)
            self.device = "cpu"
            self.layers = torch.nn.ModuleList([torch.nn.Linear(10, 10) for _ in range(2)])

        def prepare_inputs_for_generation(self):
            pass

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, num_layers=2, token_dim=10,
                                num_attention_heads=2)
    peft_model = get_peft_model(NotATransformersModel(), config)
    with pytest.raises(attention.UnsupportedModelError, match="no transformers PreTrainedModel"):
        fastpeft.accelerate(peft_model, strict=True)
    with pytest.warns(fastpeft.FallbackWarning, match="NotATransformersModel: it holds no transformers"):
        fastpeft.accelerate(peft_model)
    assert "no transformers PreTrainedModel" in fallback_reason(peft_model)
    peft_model.prompt_encoder.default.embedding.weight.data.fill_(1.0)
    peft_model.save_pretrained(tmp_path)
    loaded = fastpeft.accelerate(PeftModel.from_pretrained(NotATransformersModel(), tmp_path))
    assert torch.equal(loaded.prompt_encoder.default.embedding.weight, torch.ones(5, 2 * 2 * 10))


def test_hub_kernels_leave_fastpeft_attention_in_place(tmp_path):
    """transformers >= 5.25 kernelizes models that from_pretrained loads (USE_HUB_KERNELS, on by default): hub
    kernels replace layers such as RMSNorm and rotary embeddings (on CUDA; on CPU none applies), never the attention
    function, which accelerate sets per instance. Switching train/eval re-kernelizes: fastpeft's attention stays, and
    the accelerated step equals PEFT's on the kernelized model."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path)
    if not getattr(base, "use_kernels", False):
        pytest.skip("this transformers release (or its environment) does not kernelize from_pretrained models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, peft_config("prefix", "llama"))
    randomize_prompt_parameters(peft_model, 3)
    ids, mask, labels = batch_and_labels("llama")
    expected = training_step(peft_model, ids, mask, labels)  # switches train -> eval: re-kernelized twice
    fastpeft.accelerate(peft_model, strict=True)
    peft_model.train()
    assert peft_model.get_base_model().config._attn_implementation == attention.ATTN_IMPLEMENTATION
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what="kernelized llama")


def test_encoder_decoder_prefix_tuning_without_shiftable_positions_is_refused_by_name():
    """A decoder with neither a position embedding (BART's) nor a relative attention bias (T5's) that fastpeft can
    number after the prefix (as PEFT's cache numbers it): strict=True raises naming that, the default leaves the
    model on PEFT's path with a FallbackWarning. Here a T5 whose first decoder layer hides its relative bias (the
    runnable cases: tests/test_accelerate_seq2seq.py)."""
    import transformers as tf
    from peft import PrefixTuningConfig, get_peft_model

    from fastpeft.integration.peft import is_accelerated

    config = tf.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tf.T5ForConditionalGeneration(config),
                                    PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2))
    peft_model.get_base_model().decoder.block[0].layer[0].SelfAttention.has_relative_attention_bias = False
    with pytest.raises(ValueError, match="no position embedding"):
        fastpeft.accelerate(peft_model, strict=True)
    with pytest.warns(fastpeft.FallbackWarning, match="no position embedding"):
        fastpeft.accelerate(peft_model)
    assert not is_accelerated(peft_model)


def test_refuses_prefix_that_does_not_split_into_kv_heads():
    """An adapter sized for the query heads (4 x 32 per token) on a backbone with 2 KV heads (peft#1901-style
    shape bugs): refused rather than reinterpreted."""
    peft_model = make_peft_model("llama", "prefix")
    config = peft_model.peft_config["default"]
    config.num_attention_heads, config.token_dim = 4, 128
    with pytest.raises(ValueError, match="KV heads"):
        fastpeft.accelerate(peft_model)


def _mistral_with_window(window):
    base = tiny_model("mistral", attn_implementation="sdpa")
    base.config.sliding_window = window
    return base


@pytest.mark.parametrize("method", ["prefix", "prefix_projection", "prompt"])
@pytest.mark.parametrize("window", [3, 8])
def test_sliding_window_shorter_than_prefix_plus_sequence_matches_peft(method, window, monkeypatch):
    """A window that cuts into prefix + sequence (P + L = 4 + 7 > 8; 3 also cuts into the sequence itself), in a
    left-padded batch, through fastpeft's kernels only: PEFT's loss, logits and prompt gradients (the window counted
    in PEFT's cache indices, prefix first, padding included), and greedy tokens and step logits equal to PEFT's
    forward looped without a cache (pad-aware: each row alone), past the window."""
    peft_model = make_peft_model("mistral", method, base=_mistral_with_window(window))
    ids, mask, labels = batch_and_labels("mistral")
    expected = training_step(peft_model, ids, mask, labels)
    reference, reference_logits = reference_greedy(peft_model, ids, mask, max_new_tokens=5)
    fastpeft.accelerate(peft_model)
    forbid_framework_attention(monkeypatch, peft_model)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what=f"window {window}")
    out = greedy(peft_model, ids, mask, max_new_tokens=5, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, reference)
    assert_close(torch.stack(out.logits), reference_logits, 1e-5, f"window {window} step logits")


def test_sliding_window_with_a_prefix_table_is_refused():
    """AdapterBank rows take per-row positions, which a window counted in PEFT's cache indices does not follow."""
    base = _mistral_with_window(8)
    bank = fastpeft.AdapterBank(base)
    bank.add("a", make_peft_model("mistral", "prefix"))
    ids, mask, _ = batch_and_labels("mistral")
    with pytest.raises(ValueError, match="sliding-window"):
        bank(ids, attention_mask=mask, adapters=["a"] * ids.shape[0])
    bank.close()


def test_window_covering_prefix_plus_sequence_matches_peft():
    peft_model = make_peft_model("mistral", "prefix", base=_mistral_with_window(64))
    ids, mask, labels = batch_and_labels("mistral")
    expected = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected)


def test_fastpeft_prefix_keyword_is_reserved():
    peft_model = fastpeft.accelerate(make_peft_model("llama", "prefix"))
    ids, mask, _ = batch_and_labels("llama")
    spec = fastpeft.integration.peft.prefix_spec(peft_model)
    with pytest.raises(ValueError, match=attention.PREFIX_KWARG):
        peft_model(input_ids=ids, attention_mask=mask, **{attention.PREFIX_KWARG: spec})


@pytest.mark.parametrize("family,method", [("llama", "prefix_projection"), ("gpt2", "prefix"), ("bert", "prompt")])
def test_interpreted_triton_forward_backward_match_peft(family, method, monkeypatch, interpreted_triton):
    """The same parity through the Triton kernels (interpreted on CPU); neither SDPA nor eager attention runs."""
    peft_model = make_peft_model(family, method)
    ids, mask, labels = batch_and_labels(family)
    expected = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model)
    forbid_framework_attention(monkeypatch, peft_model)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what=f"triton {family}/{method}")


def test_accelerated_model_pickles_and_deep_copies(tmp_path):
    import copy

    peft_model = fastpeft.accelerate(make_peft_model("llama", "prefix"))
    ids, mask, _ = batch_and_labels("llama")
    torch.save(peft_model, tmp_path / "model.pt")
    for clone in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(peft_model)):
        assert fastpeft.integration.peft.is_accelerated(clone)
        with torch.no_grad():
            # The clone's forward runs on the clone: changing the original's prefix does not reach it.
            expected = clone(input_ids=ids, attention_mask=mask).logits
            peft_model.prompt_encoder["default"].embedding.weight.add_(1.0)
            assert torch.equal(clone(input_ids=ids, attention_mask=mask).logits, expected)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_causal_family_sequence_classification_matches_peft(method):
    import transformers as tf

    from tests.models import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_labels = 3
    base = tf.LlamaForSequenceClassification(config)
    base.set_attn_implementation("sdpa")
    peft_model = make_peft_model("bert", method, base=base.eval())  # "bert": the SEQ_CLS task type
    ids, mask, _ = batch_and_labels("llama")
    labels = torch.tensor([2, 0, 1])
    expected = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected)


def test_autocast_bf16_matches_peft_within_its_own_error():
    """Under CPU autocast the projections run in bfloat16 while the prefix stays float32 (the prompt encoder's
    dtype); the prefix is cast per layer. The error against float32 PEFT stays within a small multiple of PEFT's
    own autocast error."""
    peft_model = make_peft_model("llama", "prefix_projection")
    ids, mask, labels = batch_and_labels("llama")
    exact = training_step(peft_model, ids, mask, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_autocast = training_step(peft_model, ids, mask, labels)
        fastpeft.accelerate(peft_model)
        ours = training_step(peft_model, ids, mask, labels)
    assert_within_own_error(ours, peft_autocast, exact)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_bfloat16_backbone_matches_peft_within_its_own_error(method):
    """A bfloat16 backbone (the prompt parameters stay float32, as PEFT keeps them): the error against the float32
    computation stays within a small multiple of PEFT's own bfloat16 error."""
    peft_model = make_peft_model("qwen2", method)
    ids, mask, labels = batch_and_labels("qwen2")
    exact = training_step(peft_model, ids, mask, labels)
    peft_model.get_base_model().to(torch.bfloat16)
    peft_bf16 = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model)
    ours = training_step(peft_model, ids, mask, labels)
    for name, grad in ours[2].items():
        assert grad.dtype == torch.float32, name
    assert_within_own_error(ours, peft_bf16, exact)


def test_forward_continues_from_its_own_cache():
    """The returned cache holds the real tokens only (the prefix stays outside it); feeding it back continues the
    sequence at the right positions: the split forward equals the whole one."""
    peft_model = fastpeft.accelerate(make_peft_model("llama", "prefix"))
    ids, mask, _ = batch_and_labels("llama")
    split = 4
    with torch.no_grad():
        whole = peft_model(input_ids=ids, attention_mask=mask).logits
        first = peft_model(input_ids=ids[:, :split], attention_mask=mask[:, :split], use_cache=True)
        assert first.past_key_values.get_seq_length() == split
        rest = peft_model(input_ids=ids[:, split:], attention_mask=mask, past_key_values=first.past_key_values).logits
    assert_close(rest[mask[:, split:].bool()], whole[:, split:][mask[:, split:].bool()], 1e-5, "continued logits")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["prefix_projection", "prompt"])
def test_cuda_bfloat16_kernels_match_peft_within_its_own_error(method):
    """On the GPU the default dispatch runs the compiled Triton kernels (and the CUDA decode op): a bfloat16
    training step and greedy generation against float32 PEFT, bounded by PEFT's own bfloat16 error."""
    peft_model = make_peft_model("llama", method).cuda()
    ids, mask, labels = (t.cuda() for t in batch_and_labels("llama"))
    exact = training_step(peft_model, ids, mask, labels)
    peft_model.get_base_model().to(torch.bfloat16)
    peft_bf16 = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model)
    ours = training_step(peft_model, ids, mask, labels)
    assert_within_own_error(ours, peft_bf16, exact)
    generated = greedy(peft_model, ids, mask, max_new_tokens=4)
    assert generated.shape == (ids.shape[0], ids.shape[1] + 4) and torch.equal(generated[:, :ids.shape[1]], ids)


def test_attention_kwargs_that_change_the_scores_are_refused():
    """Gemma 2's soft-capping (``softcap``) and attention sinks (``s_aux``) reach the attention function as keyword
    arguments; ignoring them would give wrong outputs silently."""
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 1, 3, 16, generator=g)
    module = torch.nn.Module()
    module.layer_idx, module.is_causal = 0, True
    output, _ = attention.fastpeft_attention_forward(module, query, key, key, None, softcap=None, s_aux=None)
    assert output.shape == (1, 3, 2, 16)
    with pytest.raises(ValueError, match="softcap"):
        attention.fastpeft_attention_forward(module, query, key, key, None, softcap=50.0)
    with pytest.raises(ValueError, match="s_aux"):
        attention.fastpeft_attention_forward(module, query, key, key, None, s_aux=torch.randn(2, generator=g))


def test_softcapped_model_on_fastpeft_attention_raises():
    from tests.accelerate_helpers import tiny_softcapped_gemma2

    model = tiny_softcapped_gemma2()
    attention.use_fastpeft_attention(model)
    ids = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="softcap"):
        model(input_ids=ids)


def test_strict_refuses_softcapped_family():
    from peft import get_peft_model

    from tests.accelerate_helpers import tiny_softcapped_gemma2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_softcapped_gemma2(), peft_config("prefix", "gemma2"))
    with pytest.raises(ValueError, match="gemma2"):
        fastpeft.accelerate(peft_model, strict=True)
    with pytest.warns(fastpeft.FallbackWarning, match="gemma2"):
        fastpeft.accelerate(peft_model)


def test_mask_function_accepts_both_transformers_call_styles():
    """Recent transformers call mask functions with q_length/q_offset, older ones with cache_position; either way
    the result is the boolean key padding mask [B, 1, 1, kv_length] over the last kv_length keys."""
    from transformers.masking_utils import causal_mask_function

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    new_style = attention.fastpeft_mask(batch_size=2, q_length=2, kv_length=4, q_offset=2, kv_offset=0,
                                        mask_function=causal_mask_function, attention_mask=mask)
    old_style = attention.fastpeft_mask(batch_size=2, cache_position=torch.arange(2, 4), kv_length=4, kv_offset=0,
                                        mask_function=causal_mask_function, attention_mask=mask)
    for result in (new_style, old_style):
        assert result.dtype == torch.bool and torch.equal(result, mask[:, None, None, -4:].bool())
    assert attention.fastpeft_mask(batch_size=2, cache_position=torch.arange(4), kv_length=4,
                                   mask_function=causal_mask_function, attention_mask=None) is None
    # On CPU a mask without padding among the keys attention sees is no mask (every layer skips its handling).
    assert attention.fastpeft_mask(batch_size=2, q_length=2, kv_length=3, mask_function=causal_mask_function,
                                   attention_mask=mask) is None


def test_prefix_spec_value_checks_and_their_opt_out():
    """PrefixSpec.build checks index/length values (device syncs) unless the caller's values are valid by
    construction (check_values=False, as AdapterBank and MultiPrefixTrainer build it); the structure is always
    checked."""
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(2, 1, 3, 8, generator=g)]
    lengths = torch.tensor([3, 1], dtype=torch.int32)
    with pytest.raises(IndexError, match="prefix_index"):
        attention.PrefixSpec.build(keys, keys, torch.tensor([2], dtype=torch.int32), lengths)
    with pytest.raises(ValueError, match="prefix_lengths"):
        attention.PrefixSpec.build(keys, keys, torch.tensor([1], dtype=torch.int32), lengths + 1)
    unchecked = attention.PrefixSpec.build(keys, keys, torch.tensor([2], dtype=torch.int32), lengths,
                                           check_values=False)
    assert unchecked.prefix_index.tolist() == [2]
    with pytest.raises(ValueError, match="prefix_index is required"):
        attention.PrefixSpec.build(keys, keys, None, lengths, check_values=False)


def test_prefix_classification_reference_is_peft():
    """The step-by-step PEFT algorithm the BERT prefix-tuning tests fall back to where PEFT refuses (transformers
    >= 5.24 names the cache ``cache``) equals PEFT itself where PEFT runs it (transformers 5.17)."""
    from tests.accelerate_helpers import peft_prefix_classification_forward, peft_refuses_prefix_classification

    peft_model = make_peft_model("bert", "prefix")
    if peft_refuses_prefix_classification(peft_model):
        pytest.skip("PEFT refuses prefix tuning for BERT with this transformers; nothing to compare against")
    ids, mask, labels = batch_and_labels("bert")
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
        ours = peft_prefix_classification_forward(peft_model, ids, mask, labels)
    torch.testing.assert_close(ours.logits, expected.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.loss, expected.loss, rtol=1e-6, atol=1e-6)
