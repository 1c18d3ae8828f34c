"""Gemma 4 on fastpeft's kernels, against PEFT on the same tiny models (built from configs, no downloads).

What Gemma 4 brings (transformers 5.17 to 5.25): per-layer head sizes (its configuration raises
``AmbiguousGlobalPerLayerAttributeError`` for ``config.head_dim``), sliding-window layers, query/key norms with
``scaling=1.0``, optional K=V full-attention layers, per-layer input embeddings, and KV-sharing layers that attend over
another layer's keys and values. PEFT 0.21 (peft#3205) sizes the prefix for the largest layer, slices it per layer,
gives KV-sharing layers none of their own (they see their source's through its cache), warns when it skips layers
and raises when it skips all. fastpeft reproduces that (``_gemma_layer_prefixes``).

Precision: in float64 the accelerated step equals PEFT's to 1e-10 (the semantics are PEFT's exactly); in float32
loss and logits equal PEFT's to 1e-5, and the prompt gradients are as close to the float64 truth as PEFT's own
float32 gradients are (twice their error, plus 1e-6). A direct float32 gradient comparison at 1e-5 is not a test of
fastpeft here: PEFT's own float32 prompt gradients on these models differ from float64 by 0.4e-5 to 2.6e-5.
"""

import copy
import warnings

import pytest
import torch

import fastpeft
from tests.accelerate_helpers import (assert_same_step, forbid_framework_attention, greedy, randomize_prompt_parameters,
                                      reference_greedy, training_step)
from tests.reference import assert_close, relative_error

tf = pytest.importorskip("transformers")
if not hasattr(tf, "Gemma4TextConfig"):
    pytest.skip("this transformers release has no Gemma 4", allow_module_level=True)

VOCAB = 128
P = 4
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
               "full_attention"]


def tiny_gemma4(seed=0, **overrides):
    """6 layers (sliding, sliding, full, sliding, sliding, full), the last two sharing KV (with layers 3 and 2);
    sliding layers 2 KV heads of size 16, full layers of size 32 (``global_head_dim``); a sliding window of 6, shorter
    than P + L; per-layer input embeddings of size 8; float32, eval, no dropout."""
    config = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, global_head_dim=32, max_position_embeddings=256,
                  sliding_window=6, num_kv_shared_layers=2, hidden_size_per_layer_input=8,
                  vocab_size_per_layer_input=VOCAB, layer_types=list(LAYER_TYPES), pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, attention_dropout=0.0)
    config.update(overrides)
    torch.manual_seed(seed)
    return tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(**config)).eval()


def peft_model_of(base, method, seed=1):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = {"prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
              "prefix_projection": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                      prefix_projection=True, encoder_hidden_size=32),
              "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, config)
    randomize_prompt_parameters(peft_model, seed)
    return peft_model


def padded_batch(padded=True):
    """Left-padded ids [3, 7] (3 and 1 pads in rows 1 and 2 when ``padded``), mask, next-token labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _skip_unless_gemma4_runs_without_per_layer_inputs():
    """transformers 5.24's Gemma 4 fails in its own forward without per-layer input embeddings (it slices them
    before its KV-sharing layers whether they exist or not); PEFT's prompt tuning needs that configuration (with
    per-layer inputs Gemma 4 must invert ``inputs_embeds`` to token ids, which PEFT's virtual tokens are not)."""
    model = tiny_gemma4(hidden_size_per_layer_input=0)
    try:
        model(input_ids=torch.ones(1, 2, dtype=torch.long))
    except TypeError as error:
        pytest.skip(f"transformers {tf.__version__}'s Gemma 4 without per-layer inputs fails on its own ({error})")


@pytest.mark.parametrize("method", ["prefix", "prefix_projection"])
def test_prefix_tuning_matches_peft(method, monkeypatch):
    """Loss, logits and prompt gradients over a padded batch whose sliding window cuts into prefix + sequence."""
    ids, mask, labels = padded_batch()
    peft_model = peft_model_of(tiny_gemma4(), method)
    exact_model = copy.deepcopy(peft_model).double()
    exact = training_step(exact_model, ids, mask, labels)
    expected = training_step(peft_model, ids, mask, labels)

    fastpeft.accelerate(exact_model, strict=True)
    assert_same_step(training_step(exact_model, ids, mask, labels), exact, rtol=1e-10, what=f"{method} float64")

    fastpeft.accelerate(peft_model, strict=True)
    forbid_framework_attention(monkeypatch, peft_model)
    loss, logits, grads = training_step(peft_model, ids, mask, labels)
    assert_close(loss, expected[0], 1e-5, f"{method} loss")
    assert_close(logits, expected[1], 1e-5, f"{method} logits")
    for name, grad in grads.items():
        peft_error = relative_error(expected[2][name], exact[2][name])
        assert grad.abs().sum() > 0 and relative_error(grad, exact[2][name]) <= 2 * peft_error + 1e-6, name


@pytest.mark.parametrize("method", ["prefix", "prefix_projection"])
def test_prefix_tuning_greedy_matches_peft_forward(method):
    ids, mask, _ = padded_batch()
    peft_model = peft_model_of(tiny_gemma4(), method)
    reference, reference_logits = reference_greedy(peft_model, ids, mask, max_new_tokens=5)
    fastpeft.accelerate(peft_model, strict=True)
    out = greedy(peft_model, ids, mask, max_new_tokens=5, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, reference)
    assert_close(torch.stack(out.logits), reference_logits, 1e-5, f"{method} step logits")


def test_each_layer_gets_peft_share_of_the_prefix():
    """PEFT provisions the prefix for the largest layer (2 KV heads x 32); sliding layers read the first 16 dimensions
    of each head of their slot, full layers the whole slot, the KV-sharing layers 4 and 5 their sources' (3 and 2).
    PEFT's warning names the layers it skips, as PEFT words it."""
    peft_model = peft_model_of(tiny_gemma4(), "prefix")
    config = peft_model.active_peft_config
    assert (config.num_attention_heads, config.token_dim) == (2, 64)
    fastpeft.accelerate(peft_model, strict=True)
    slots = peft_model.prompt_encoder["default"].embedding.weight.view(P, 12, 2, 32)
    with pytest.warns(UserWarning, match=r"injected into layers \[0, 1, 2, 3\]; skipped \[4, 5\] due to KV shape"):
        spec = fastpeft.integration.peft.prefix_spec(peft_model)
    for layer in range(4):
        width = 32 if LAYER_TYPES[layer] == "full_attention" else 16
        assert torch.equal(spec.keys[layer], slots[:, 2 * layer, :, :width].transpose(0, 1))
        assert torch.equal(spec.values[layer], slots[:, 2 * layer + 1, :, :width].transpose(0, 1))
    assert spec.keys[4] is spec.keys[3] and spec.values[5] is spec.values[2]


def test_warns_if_some_layers_skipped_like_peft():
    """PEFT's test_prefix_tuning_gemma4_warns_if_some_layers_skipped on a tiny Gemma 4: num_kv_shared_layers lowered
    after the model was built (its layers 4 and 5 still share KV); the accelerated forward warns as PEFT does and
    gives PEFT's logits (layer 4 sees layer 3's prefix, whatever PEFT puts in its own unused cache slot)."""
    base = tiny_gemma4()
    base.config.num_kv_shared_layers = 1
    peft_model = peft_model_of(base, "prefix")
    ids = torch.arange(3, 13).view(1, -1)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"skipped \[.*\] due to KV shape"):
        expected = peft_model(ids).logits
    fastpeft.accelerate(peft_model, strict=True)
    with torch.no_grad(), pytest.warns(UserWarning, match=r"skipped \[5\] due to KV shape"):
        logits = peft_model(ids).logits
    assert_close(logits, expected, 1e-5, "logits")


def test_raises_if_all_layers_skipped_like_peft():
    """PEFT's test_prefix_tuning_gemma4_raises_if_all_layers_skipped on a tiny Gemma 4: every layer's KV heads raised
    past the prefix's after get_peft_model; PEFT raises at the forward, and so does the accelerated model."""
    peft_model = peft_model_of(tiny_gemma4(), "prefix")
    fastpeft.accelerate(peft_model, strict=True)
    peft_model.config.get_text_config().num_key_value_heads = 999
    with pytest.raises(ValueError, match="skipped every layer"):
        peft_model(torch.arange(3, 13).view(1, -1))


def test_first_layer_without_prefix_numbers_tokens_from_zero_like_peft():
    """Sliding layers with more KV heads (2) than the K=V full-attention layers (1): PEFT provisions 1 x 32, which
    the sliding layers do not fit, so only full layers get a prefix. Layer 0 then holds none, and transformers numbers
    the tokens after layer 0's empty cache, from 0: fastpeft gives PEFT's step (float64, unpadded). With padding PEFT
    reads those layers' masks shifted by P, which fastpeft refuses by name."""
    ids, mask, labels = padded_batch(padded=False)
    base = tiny_gemma4(attention_k_eq_v=True, num_global_key_value_heads=1).double()
    peft_model = peft_model_of(base, "prefix")
    peft_model.double()
    expected = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model, strict=True)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, rtol=1e-10, what="layer 0 skipped")
    ids, mask, labels = padded_batch()
    with pytest.raises(ValueError, match=r"skips layers \[0, 1, 3, 4\].*shifted by the prefix length"):
        training_step(peft_model, ids, mask, labels)


def test_prompt_tuning_matches_peft():
    """Prompt tuning (PEFT's forward over fastpeft attention) and its generate, which serves the virtual tokens' K/V
    to every layer: sliding layers keep all of them (the window lets later queries see some), KV-sharing layers get
    their sources'."""
    _skip_unless_gemma4_runs_without_per_layer_inputs()
    ids, mask, labels = padded_batch()
    peft_model = peft_model_of(tiny_gemma4(hidden_size_per_layer_input=0), "prompt")
    exact_model = copy.deepcopy(peft_model).double()
    exact = training_step(exact_model, ids, mask, labels)
    reference, reference_logits = reference_greedy(peft_model, ids, mask, max_new_tokens=5)
    fastpeft.accelerate(exact_model, strict=True)
    assert_same_step(training_step(exact_model, ids, mask, labels), exact, rtol=1e-10, what="prompt float64")
    fastpeft.accelerate(peft_model, strict=True)
    out = greedy(peft_model, ids, mask, max_new_tokens=5, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, reference)
    assert_close(torch.stack(out.logits), reference_logits, 1e-5, "prompt step logits")


def test_per_layer_geometry_is_read_and_uniform_users_refuse_it_by_name():
    """The configuration raises its own error for config.head_dim; fastpeft reads every layer's shape instead, and
    what needs one layout for all layers (AdapterBank, MultiPrefixTrainer) refuses with a ValueError naming it."""
    from fastpeft.integration.geometry import BaseGeometry
    from fastpeft.integration import compat

    base = tiny_gemma4()
    with pytest.raises(compat.ConfigReadError, match=r"config.head_dim of 'gemma4_text' differs between layers") as err:
        compat.config_attribute(base.config, "head_dim")
    assert err.value.per_layer and isinstance(err.value, ValueError)
    geometry = BaseGeometry.of(base.config)
    assert geometry.head_dim is None and geometry.layer_kv_shapes == tuple(
        (2, 32 if kind == "full_attention" else 16) for kind in LAYER_TYPES)
    with pytest.raises(ValueError, match="AdapterBank needs one attention layout for every layer"):
        fastpeft.AdapterBank(base)
    with pytest.raises(ValueError, match="MultiPrefixTrainer needs one attention layout for every layer"):
        fastpeft.MultiPrefixTrainer(tiny_gemma4())
