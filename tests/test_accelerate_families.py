"""fastpeft.accelerate on the families the generic attention-interface path added (OPT, GPT-J, Gemma 3, Phi causal
LMs, GPT-NeoX; RoBERTa sequence classification; BERT/RoBERTa feature extraction; BART prompt tuning and p-tuning; CPT adapters),
each against PEFT itself on the same model, adapter and inputs: loss, logits, prompt gradients (float32, relative
error < 1e-5), greedy generation against PEFT's forward looped without a cache. And the refusals, each naming the
missing feature."""

import warnings

import pytest
import torch

import fastpeft
from fastpeft.integration import compat
from tests.accelerate_helpers import (METHODS, assert_same_step, forbid_framework_attention, greedy, greedy_seq2seq,
                                      randomize_prompt_parameters, reference_greedy, training_step)
from tests.reference import assert_close

VOCAB = 128
P = 4



def tiny_base(family, task="causal", seed=0, **config_overrides):
    """A tiny random model of ``family`` (hidden size 128, 2 layers, 4 query heads, dropout off, float32, eval)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=0)
    if family == "opt":
        config = tf.OPTConfig(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=128, max_position_embeddings=256, dropout=0.0,
                              attention_dropout=0.0, bos_token_id=1, eos_token_id=2, **common)
    elif family == "gptj":
        config = tf.GPTJConfig(n_embd=128, n_layer=2, n_head=4, rotary_dim=16, n_positions=256, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, **common)
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                     max_position_embeddings=256, sliding_window=64, bos_token_id=1, eos_token_id=2,
                                     **common)
    elif family == "phi":
        config = tf.PhiConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=256, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                              bos_token_id=1, eos_token_id=2, **common)
    elif family == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256, rotary_pct=0.5, hidden_dropout=0.0,
                                  attention_dropout=0.0, bos_token_id=1, eos_token_id=2, **common)
    elif family in ("deberta", "deberta_v2"):
        cls = tf.DebertaConfig if family == "deberta" else tf.DebertaV2Config
        config = cls(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     relative_attention=True, pos_att_type=["c2p", "p2c"], num_labels=3, **common)
    elif family in ("roberta", "bert"):
        cls = tf.RobertaConfig if family == "roberta" else tf.BertConfig
        config = cls(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     num_labels=3, vocab_size=VOCAB, pad_token_id=1 if family == "roberta" else 0)
    else:
        raise ValueError(family)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    if task == "causal":
        model = tf.AutoModelForCausalLM.from_config(config)
    elif task == "seq_cls":
        model = tf.AutoModelForSequenceClassification.from_config(config)
    else:
        model = tf.AutoModel.from_config(config)
    return model.eval()


def _peft_config(method, task):
    from peft import CPTConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    task_type = {"causal": TaskType.CAUSAL_LM, "seq_cls": TaskType.SEQ_CLS, "features": TaskType.FEATURE_EXTRACTION,
                 "seq2seq": TaskType.SEQ_2_SEQ_LM}[task]
    if method == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P)
    if method == "prefix_projection":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=P, prefix_projection=True,
                                  encoder_hidden_size=64)
    if method == "prompt":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=P)
    if method == "p_tuning":
        return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=P, encoder_hidden_size=64)
    if method == "cpt":
        return CPTConfig(task_type=task_type, cpt_token_ids=[3, 4, 5, 6], cpt_mask=[1, 1, 1, 1],
                         cpt_tokens_type_mask=[1, 2, 3, 4])
    raise ValueError(method)


def make(family, method, task="causal", seed=0, **config_overrides):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_base(family, task, seed, **config_overrides), _peft_config(method, task))
    randomize_prompt_parameters(peft_model, seed + 100)
    return peft_model


def batch(family, task="causal", batch_size=3, length=7, left_pad=(0, 3, 1)):
    """Left-padded ids (the family's pad id at the pads), mask, and labels (next-token with -100 at the pads, or
    class ids)."""
    pad = 1 if family == "roberta" else 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones_like(ids)
    for row, count in enumerate(left_pad[:batch_size]):
        mask[row, :count] = 0
    ids = ids.masked_fill(mask == 0, pad)
    labels = torch.arange(batch_size) % 3 if task == "seq_cls" else ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _interface_families():
    """The causal families whose attention goes through the interface on the installed transformers (GPT-J only
    from 5.2x on)."""
    import transformers as tf

    families = ["opt", "gemma3", "phi", "gpt_neox"]
    if compat.uses_attention_interface(tf.GPTJForCausalLM):
        families.append("gptj")
    return families


CAUSAL = ("opt", "gptj", "gemma3", "phi", "gpt_neox")


def _skip_unless_interface(family):
    if family not in _interface_families():
        pytest.skip(f"{family} bypasses the attention interface on this transformers release (GPT-J's hand-written "
                    "attention: tests/test_accelerate_gptj_legacy.py)")


@pytest.mark.parametrize("method", METHODS + ("cpt",))
@pytest.mark.parametrize("family", CAUSAL)
def test_causal_forward_backward_match_peft(family, method):
    _skip_unless_interface(family)
    peft_model = make(family, method)
    ids, mask, labels = batch(family)
    expected = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model)
    assert peft_model.get_base_model().config._attn_implementation == "fastpeft"
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what=f"{family}/{method}")


@pytest.mark.parametrize("method", ["prefix", "prompt", "cpt"])
@pytest.mark.parametrize("family", CAUSAL)
def test_causal_greedy_matches_peft_forward(family, method):
    _skip_unless_interface(family)
    peft_model = make(family, method)
    ids, mask, _ = batch(family)
    expected, expected_logits = reference_greedy(peft_model, ids, mask)
    fastpeft.accelerate(peft_model)
    out = greedy(peft_model, ids, mask, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, expected)
    assert_close(torch.stack(out.logits), expected_logits, 1e-5, f"{family}/{method} step logits")


def test_opt_prefix_positions_are_pad_aware_like_peft():
    """OPT counts positions over the attention mask, so PEFT's prefix-tuning forward numbers a left-padded row's
    tokens from P (not from P + pads); the padded row's logits equal the row run alone."""
    peft_model = fastpeft.accelerate(make("opt", "prefix"))
    ids, mask, _ = batch("opt")
    with torch.no_grad():
        padded = peft_model(input_ids=ids, attention_mask=mask).logits
        alone = peft_model(input_ids=ids[1:2, 3:], attention_mask=mask[1:2, 3:]).logits
    assert_close(padded[1, 3:], alone[0], 1e-5, "padded row vs alone")


@pytest.mark.parametrize("method", METHODS)
def test_roberta_sequence_classification_matches_peft(method):
    """RoBERTa numbers positions from padding_idx over the non-pad ids; with a prefix PEFT's cache shifts them by P.
    (On transformers >= 5.24 PEFT refuses prefix tuning here; training_step then runs PEFT's algorithm.)"""
    peft_model = make("roberta", method, task="seq_cls")
    ids, mask, labels = batch("roberta", task="seq_cls")
    expected = training_step(peft_model, ids, mask, labels)
    fastpeft.accelerate(peft_model)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what=f"roberta/{method}")


def _feature_step(peft_model, ids, mask):
    """Train-mode forward of a feature-extraction model; returns (hidden states at the real tokens, {name: grad})
    for a fixed random projection of the hidden states as the loss."""
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hidden = peft_model(input_ids=ids, attention_mask=mask).last_hidden_state
    if hidden.shape[1] != ids.shape[1]:  # prompt tuning / p-tuning: the virtual tokens are positions too
        hidden = hidden[:, -ids.shape[1]:]
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    (hidden * weights * mask.unsqueeze(-1)).sum().backward()
    grads = {name: param.grad.detach().clone() for name, param in peft_model.named_parameters()
             if param.requires_grad}
    peft_model.eval()
    return hidden.detach()[mask.bool()], grads


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_feature_extraction_matches_peft(family, method):
    peft_model = make(family, method, task="features")
    ids, mask, _ = batch(family, task="features")
    expected_hidden, expected_grads = _feature_step(peft_model, ids, mask)
    fastpeft.accelerate(peft_model)
    hidden, grads = _feature_step(peft_model, ids, mask)
    assert_close(hidden, expected_hidden, 1e-5, f"{family}/{method} hidden states")
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, f"{name}: PEFT's gradient is zero, the check is void"
        assert_close(grads[name], grad, 1e-5, f"{family}/{method} grad {name}")


@pytest.mark.parametrize("method", ["prefix", "prefix_projection"])
def test_roberta_prefix_tuning_of_padded_ids_without_a_mask_is_the_all_ones_mask(method):
    """RoBERTa numbers pads padding_idx and restarts its count after them; fastpeft hands the backbone those
    positions (plus P). transformers 5.25 reads restarting position ids without an attention mask as packed
    sequences; PEFT hands no position ids there, so its attention sees every key: without a mask the accelerated model
    gives what an all-ones mask gives (feature extraction: also PEFT's own forward without a mask), on every release."""
    ids, _, _ = batch("roberta", task="features")
    assert (ids == 1).any(), "the batch must hold pad ids for the check to mean anything"
    ones = torch.ones_like(ids)
    features = make("roberta", method, task="features")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = features(input_ids=ids).last_hidden_state
        fastpeft.accelerate(features, strict=True)
        hidden = features(input_ids=ids).last_hidden_state
        assert_close(hidden, features(input_ids=ids, attention_mask=ones).last_hidden_state, 1e-6, "no mask vs ones")
    assert_close(hidden, expected, 1e-5, f"{method} hidden states vs PEFT without a mask")

    classifier = fastpeft.accelerate(make("roberta", method, task="seq_cls"), strict=True)
    with torch.no_grad():
        logits = classifier(input_ids=ids).logits
        assert_close(logits, classifier(input_ids=ids, attention_mask=ones).logits, 1e-6, "classifier logits")


# ----- refusals ------------------------------------------------------------------------------------------------


def test_gemma3_sliding_window_shorter_than_prefix_and_sequence_matches_peft(monkeypatch):
    """Gemma 3 interleaves sliding-window and full layers: with a window of 8 over P + L = 11 the forward gives
    PEFT's loss, logits and prompt gradients, and generate PEFT's forward loop's tokens and step logits."""
    peft_model = make("gemma3", "prefix", sliding_window=8)
    ids, mask, labels = batch("gemma3")
    expected = training_step(peft_model, ids, mask, labels)
    reference, reference_logits = reference_greedy(peft_model, ids, mask, max_new_tokens=5)
    fastpeft.accelerate(peft_model)
    forbid_framework_attention(monkeypatch, peft_model)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what="gemma3 window 8")
    out = greedy(peft_model, ids, mask, max_new_tokens=5, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, reference)
    assert_close(torch.stack(out.logits), reference_logits, 1e-5, "gemma3 window 8 step logits")


def _assert_fallback(peft_model, match, task="causal", family="llama"):
    """accelerate() on a backbone fastpeft cannot compute: a FallbackWarning naming why, the model untouched and
    giving PEFT's own loss and prompt gradients; strict=True raises with the same reason; restore() undoes it."""
    ids, mask, labels = batch(family, task)
    expected = training_step(peft_model, ids, mask, labels)
    attn_implementation = peft_model.get_base_model().config._attn_implementation
    with pytest.warns(fastpeft.FallbackWarning, match=match):
        assert fastpeft.accelerate(peft_model) is peft_model
    assert fastpeft.integration.peft.fallback_reason(peft_model) is not None
    assert not fastpeft.integration.peft.is_accelerated(peft_model)
    assert peft_model.get_base_model().config._attn_implementation == attn_implementation
    assert not {"forward", "generate"} & set(vars(peft_model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fastpeft.FallbackWarning)
        fastpeft.accelerate(peft_model)  # a second call is a no-op: no second warning
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, rtol=1e-12)  # the very same path
    with pytest.raises(ValueError, match=match):
        fastpeft.accelerate(peft_model, strict=True)
    assert fastpeft.restore(peft_model) is peft_model
    assert fastpeft.integration.peft.fallback_reason(peft_model) is None


def test_model_bypassing_the_attention_interface_falls_back():
    """A model that computes attention by hand (no _supports_attention_backend, no attention-interface lookup in its
    module; Falcon up to transformers 5.24): PEFT's path, with the reason."""
    from peft import PromptTuningConfig, get_peft_model

    from tests.model_bypassing_attention_interface import tiny_handwritten_attention_model
    from tests.models import tiny_model

    # transformers caches its per-class source heuristic once a model of the class switches implementation: have a
    # Llama do that first, so that the test cannot pass on a fresh cache only.
    tiny_model("llama", attn_implementation="eager").set_attn_implementation("sdpa")
    peft_model = get_peft_model(tiny_handwritten_attention_model(vocab_size=VOCAB),
                                PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    _assert_fallback(peft_model, "attention interface")


def test_softcapping_config_falls_back_naming_the_feature():
    from peft import PromptTuningConfig, get_peft_model

    from tests.accelerate_helpers import tiny_softcapped_gemma2

    peft_model = get_peft_model(tiny_softcapped_gemma2(), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=P))
    _assert_fallback(peft_model, "soft-capping", family="gemma2")


def tiny_bart(seed=0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.BartConfig(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=VOCAB,
                           dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=256,
                           forced_eos_token_id=None)
    return tf.BartForConditionalGeneration(config).eval()


def _bart_peft(method):
    from peft import get_peft_model

    config = _peft_config(method, "seq2seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_bart(), config)
    randomize_prompt_parameters(peft_model, 100)
    return peft_model


def _seq2seq_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # BART pads on the right
    decoder_ids = torch.randint(3, VOCAB, (3, 5), generator=g)
    labels = torch.randint(3, VOCAB, (3, 5), generator=g)
    return ids, mask, decoder_ids, labels


def _seq2seq_step(peft_model, ids, mask, decoder_ids, labels):
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, labels=labels)
    out.loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in peft_model.named_parameters()
             if param.requires_grad}
    peft_model.eval()
    return out.loss.detach(), out.logits.detach().flatten(0, 1), grads


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_bart_prompt_learning_matches_peft_through_fastpeft_attention(method, monkeypatch):
    """Encoder self-attention, decoder self-attention and cross-attention all run through fastpeft's kernels."""
    from tests.accelerate_helpers import forbid_framework_attention

    peft_model = _bart_peft(method)
    inputs = _seq2seq_inputs()
    expected = _seq2seq_step(peft_model, *inputs)
    fastpeft.accelerate(peft_model)
    forbid_framework_attention(monkeypatch, peft_model)
    assert_same_step(_seq2seq_step(peft_model, *inputs), expected, what=f"bart/{method}")


def test_bart_prompt_tuning_greedy_matches_peft_forward():
    """Greedy decoding against PEFT's forward looped over the growing decoder input, without a cache."""
    peft_model = _bart_peft("prompt")
    ids, mask, _, _ = _seq2seq_inputs()
    start = peft_model.get_base_model().config.decoder_start_token_id
    decoder_ids = torch.full((ids.shape[0], 1), start)
    steps = []
    with torch.no_grad():
        for _ in range(5):
            logits = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits[:, -1]
            steps.append(logits)
            decoder_ids = torch.cat([decoder_ids, logits.argmax(-1, keepdim=True)], 1)
    fastpeft.accelerate(peft_model)
    out = greedy_seq2seq(peft_model, ids, mask, max_new_tokens=5, forced_bos_token_id=None)
    assert torch.equal(out.sequences, decoder_ids)
    assert_close(torch.stack(out.logits), torch.stack(steps), 1e-5, "bart step logits")


# ----- T5: the relative position bias through the kernels' attn_bias --------------------------------------------


def tiny_t5(family="t5", seed=0):
    """Few relative-position buckets and a short max distance, so that the test lengths reach T5's logarithmic
    buckets (the decoder's unidirectional ones from distance 4 on); dropout off."""
    import transformers as tf

    torch.manual_seed(seed)
    config_class, model_class = {"t5": (tf.T5Config, tf.T5ForConditionalGeneration),
                                 "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration)}[family]
    config = config_class(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                          vocab_size=VOCAB, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                          dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return model_class(config).eval()


def _t5_peft(method, family="t5"):
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_t5(family), _peft_config(method, "seq2seq"))
    randomize_prompt_parameters(peft_model, 100)
    return peft_model


def _t5_decoder_padded_step(peft_model, ids, mask, decoder_ids, labels):
    """``_seq2seq_step`` with a right-padded decoder input as well (decoder self-attention: padding and causality)."""
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[2, 3:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                         decoder_attention_mask=decoder_mask, labels=labels.masked_fill(decoder_mask == 0, -100))
    out.loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in peft_model.named_parameters()
             if param.requires_grad}
    peft_model.eval()
    return out.loss.detach(), out.logits.detach().flatten(0, 1), grads


@pytest.mark.parametrize("family", ["t5", "mt5"])
@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
@pytest.mark.parametrize("step", [_seq2seq_step, _t5_decoder_padded_step], ids=["enc-padded", "enc-dec-padded"])
def test_t5_prompt_learning_matches_peft_through_fastpeft_attention(method, family, step, monkeypatch):
    """Encoder self-attention (bidirectional buckets), decoder self-attention (causal buckets) and cross-attention
    (a zero bias) all run through fastpeft's kernels with T5's position bias as their attn_bias, T5's scaling 1.0."""
    from tests.accelerate_helpers import forbid_framework_attention

    peft_model = _t5_peft(method, family)
    inputs = _seq2seq_inputs()
    expected = step(peft_model, *inputs)
    fastpeft.accelerate(peft_model, strict=True)
    assert peft_model.get_base_model().config._attn_implementation == "fastpeft"
    forbid_framework_attention(monkeypatch, peft_model)
    assert_same_step(step(peft_model, *inputs), expected, what=f"{family}/{method}")


def test_t5_trained_relative_attention_bias_gets_peft_gradient(monkeypatch):
    """A user who also trains T5's relative_attention_bias (frozen under PEFT) gets its gradient through the
    kernels' attn_bias gradient, summed over the batch it is broadcast over."""
    from tests.accelerate_helpers import forbid_framework_attention

    peft_model = _t5_peft("prompt")
    trained = [param for name, param in peft_model.named_parameters() if "relative_attention_bias" in name]
    assert len(trained) == 2  # the encoder's and the decoder's first layers
    for param in trained:
        param.requires_grad_(True)
    inputs = _seq2seq_inputs()
    expected = _t5_decoder_padded_step(peft_model, *inputs)
    assert sum("relative_attention_bias" in name for name in expected[2]) == 2
    fastpeft.accelerate(peft_model, strict=True)
    forbid_framework_attention(monkeypatch, peft_model)
    assert_same_step(_t5_decoder_padded_step(peft_model, *inputs), expected, what="t5 trained bias")


def test_t5_gradient_checkpointing_matches_peft(monkeypatch):
    """Under gradient checkpointing T5 marks its zero cross-attention bias as requiring grad: the kernels take it
    (and compute its gradient, which goes nowhere) and the prompt gradients stay PEFT's."""
    from fastpeft.ops import registry

    peft_model = _t5_peft("p_tuning")
    base = peft_model.get_base_model()
    method, keyword = compat.checkpointing_names(base)
    getattr(base, method)(**{keyword: {"use_reentrant": False}})
    inputs = _seq2seq_inputs()
    expected = _seq2seq_step(peft_model, *inputs)
    fastpeft.accelerate(peft_model, strict=True)
    bias_gradients = []
    sdpa = registry.get("sdpa")
    original = sdpa.backward   # (dout, args, out, lse, saved, plan, bias_grad)
    monkeypatch.setattr(sdpa, "backward", lambda *args: bias_gradients.append(args[-1]) or original(*args))
    assert_same_step(_seq2seq_step(peft_model, *inputs), expected, what="t5 checkpointed")
    assert any(bias_gradients), "the zero cross-attention bias was expected to require grad"


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_t5_greedy_matches_peft_forward(method):
    """Greedy decoding (the decoder's cache: one query per step, T5's bias for that position over the cached keys)
    against PEFT's forward looped over the growing decoder input, without a cache."""
    from fastpeft.integration.reference_generate import generate_seq2seq_without_cache

    peft_model = _t5_peft(method)
    ids, mask, _, _ = _seq2seq_inputs()
    decoder_ids, steps = generate_seq2seq_without_cache(peft_model, ids, mask, max_new_tokens=6)
    fastpeft.accelerate(peft_model, strict=True)
    out = greedy_seq2seq(peft_model, ids, mask, max_new_tokens=6)
    assert torch.equal(out.sequences, decoder_ids)
    assert_close(torch.stack(out.logits), steps, 1e-5, f"t5/{method} step logits")


def test_t5_scaling_none_and_one_are_both_honoured():
    """T5 passes scaling=1.0 (no 1/sqrt(D)); None means 1/sqrt(D), as in T5's own eager attention."""
    from transformers.models.t5 import modeling_t5

    from fastpeft.integration.attention import fastpeft_attention_forward

    module = tiny_t5().encoder.block[0].layer[0].SelfAttention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 32, generator=g) for _ in range(3))
    bias = torch.randn(1, 4, 5, 5, generator=g)
    for scaling in (None, 1.0):
        expected, _ = modeling_t5.eager_attention_forward(module, q, k, v, None, scaling=scaling, position_bias=bias)
        actual, _ = fastpeft_attention_forward(module, q, k, v, None, scaling=scaling, position_bias=bias)
        assert_close(actual, expected, 1e-5, f"scaling={scaling}")


def test_position_bias_of_an_unchecked_model_type_is_refused_by_name():
    from fastpeft.integration.attention import fastpeft_attention_forward

    module = tiny_t5().encoder.block[0].layer[0].SelfAttention
    module.config.model_type = "layoutlmv3"   # an instance attribute shadowing the class's
    q = torch.randn(1, 4, 3, 32)
    with pytest.raises(ValueError, match="position_bias"):
        fastpeft_attention_forward(module, q, q, q, None, scaling=1.0, position_bias=torch.zeros(1, 4, 3, 3))


def test_position_bias_without_the_prefix_columns_is_refused():
    from fastpeft.integration.attention import PrefixSpec, fastpeft_attention_forward

    module = tiny_t5().decoder.block[0].layer[0].SelfAttention
    q = torch.randn(1, 4, 3, 32)
    spec = PrefixSpec.build([torch.randn(4, 2, 32)] * 2, [torch.randn(4, 2, 32)] * 2)
    with pytest.raises(ValueError, match="prefix columns"):
        fastpeft_attention_forward(module, q, q, q, None, scaling=1.0, position_bias=torch.zeros(1, 4, 3, 3),
                                   fastpeft_prefix=spec)


def test_other_relative_bias_families_still_fall_back_naming_the_feature():
    """UMT5 (per-layer relative biases) has not been checked against fastpeft: refused by its config."""
    import transformers as tf
    from peft import PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    config = tf.UMT5Config(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, vocab_size=VOCAB)
    peft_model = get_peft_model(tf.UMT5ForConditionalGeneration(config).eval(),
                                PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with pytest.raises(ValueError, match="relative position bias"):
        fastpeft.accelerate(peft_model, strict=True)


def test_t5_accelerate_and_restore_reach_both_stacks():
    """T5's encoder and decoder hold their own copies of the config, which transformers 5.17's
    set_attn_implementation does not reach: fastpeft switches them itself, both ways."""
    peft_model = _t5_peft("prompt")
    base = peft_model.get_base_model()
    previous = base.config._attn_implementation
    fastpeft.accelerate(peft_model, strict=True)
    assert {base.encoder.config._attn_implementation, base.decoder.config._attn_implementation} == {"fastpeft"}
    fastpeft.restore(peft_model)
    assert {base.config._attn_implementation, base.encoder.config._attn_implementation,
            base.decoder.config._attn_implementation} == {previous}
