"""Shared pieces of the fastpeft.accelerate tests: PEFT models of every method on the tiny families, and one
training step (loss, logits at the real tokens, gradients of every trainable parameter) to compare."""

import inspect
import warnings

import pytest
import torch

from tests.models import padded_batch, tiny_model

NUM_VIRTUAL_TOKENS = 4
METHODS = ("prefix", "prefix_projection", "prompt", "p_tuning")
PREFIX_METHODS = ("prefix", "prefix_projection")


def peft_config(method, family, num_virtual_tokens=NUM_VIRTUAL_TOKENS):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    task = TaskType.SEQ_CLS if family == "bert" else TaskType.CAUSAL_LM
    if method == "prefix":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens)
    if method == "prefix_projection":
        return PrefixTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens, prefix_projection=True,
                                  encoder_hidden_size=64)
    if method == "prompt":
        return PromptTuningConfig(task_type=task, num_virtual_tokens=num_virtual_tokens)
    if method == "p_tuning":
        return PromptEncoderConfig(task_type=task, num_virtual_tokens=num_virtual_tokens, encoder_hidden_size=64)
    raise ValueError(method)


def randomize_prompt_parameters(peft_model, seed):
    """PEFT initializes some prompt parameters to small or structured values; random ones make every
    comparison sensitive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.5)


def make_peft_model(family, method, seed=0, base=None, attn_implementation="sdpa"):
    """A PEFT model of ``method`` on a tiny ``family`` backbone (or on ``base``), prompt parameters random."""
    from peft import get_peft_model

    if base is None:
        base = tiny_model(family, seed=seed, attn_implementation=attn_implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, peft_config(method, family))
    randomize_prompt_parameters(peft_model, seed + 100)
    return peft_model


def batch_and_labels(family, seed=0, batch=3, length=7, left_pad=(0, 3, 1)):
    """Left-padded input_ids/attention_mask and labels: next-token labels with -100 at the pads (causal LMs),
    class ids (BERT)."""
    ids, mask = padded_batch(seed=seed, batch=batch, length=length, left_pad=left_pad)
    if family == "bert":
        labels = torch.arange(batch) % 3
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def real_token_logits(logits, mask, num_virtual_tokens):
    """Logits at the positions that are not padding: ``[B, L, V]`` (prefix tuning) or ``[B, P + L, V]`` (prompt
    and p-tuning, whose virtual positions are real) -> ``[N, V]``; sequence-classification logits as they are."""
    if logits.dim() == 2:
        return logits
    if logits.shape[1] == mask.shape[1] + num_virtual_tokens:
        virtual = torch.ones(mask.shape[0], num_virtual_tokens, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([virtual, mask], dim=1)
    return logits[mask.bool()]


def peft_refuses_prefix_classification(peft_model):
    """PEFT 0.21's prefix-tuning forward for sequence classification looks for a parameter literally named
    ``past_key_values`` in the classifier's forward, then in its backbone's, and refuses when neither has one:
    transformers >= 5.24 names the cache ``cache``."""
    from peft import PeftModelForSequenceClassification

    if fastpeft_is_accelerated(peft_model) or not isinstance(peft_model, PeftModelForSequenceClassification):
        return False
    if peft_model.active_peft_config.peft_type.value != "PREFIX_TUNING":
        return False
    backbone = peft_model.base_model.get_submodule(peft_model.transformer_backbone_name)
    return all("past_key_values" not in inspect.signature(m.forward).parameters
               for m in (peft_model.base_model, backbone))


def fastpeft_is_accelerated(peft_model):
    from fastpeft.integration.peft import is_accelerated

    return is_accelerated(peft_model)


def peft_prefix_classification_forward(peft_model, input_ids, attention_mask, labels):
    """PEFT 0.21's ``_prefix_tuning_forward`` for sequence classification, step by step, with the prefix cache
    handed over under the keyword the model takes (what PEFT computes on transformers 5.17, where that keyword is
    ``past_key_values``): the classifier with the cache if it takes one, else its backbone, pooler output, dropout
    and classification head. Single-label classification loss, as PEFT's."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    from fastpeft.integration.compat import cache_keyword

    P = peft_model.active_peft_config.num_virtual_tokens
    batch = input_ids.shape[0]
    attention_mask = torch.cat([torch.ones(batch, P), attention_mask], dim=1)
    cache = peft_model.get_prompt(batch)
    classifier = peft_model.base_model
    if cache_keyword(classifier) is not None:
        return classifier(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          **{cache_keyword(classifier): cache})
    backbone = classifier.get_submodule(peft_model.transformer_backbone_name)
    outputs = backbone(input_ids=input_ids, attention_mask=attention_mask, **{cache_keyword(backbone): cache})
    pooled = outputs[1] if len(outputs) > 1 else outputs[0]  # RoBERTa's classifier has no pooler: its head pools
    if "dropout" in dict(classifier.named_children()):
        pooled = classifier.dropout(pooled)
    logits = classifier.get_submodule(peft_model.cls_layer_name)(pooled)
    loss = torch.nn.functional.cross_entropy(logits.view(-1, classifier.num_labels), labels.view(-1))
    return SequenceClassifierOutput(loss=loss, logits=logits)


def training_step(peft_model, ids, mask, labels, **forward_kwargs):
    """One forward/backward in train mode. Returns (loss, real-token logits, {name: grad}) of every trainable
    parameter (the prompt encoder, and the classifier head PEFT trains for sequence classification). Where PEFT
    refuses prefix tuning for sequence classification (transformers >= 5.24), PEFT's own algorithm runs instead
    (``peft_prefix_classification_forward``)."""
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if peft_refuses_prefix_classification(peft_model) and not forward_kwargs:
            out = peft_prefix_classification_forward(peft_model, ids, mask, labels)
        else:
            out = peft_model(input_ids=ids, attention_mask=mask, labels=labels, **forward_kwargs)
    out.loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in peft_model.named_parameters()
             if param.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    peft_model.eval()
    return out.loss.detach(), real_token_logits(out.logits.detach(), mask, NUM_VIRTUAL_TOKENS), grads


def assert_same_step(actual, expected, rtol=1e-5, what=""):
    from tests.reference import assert_close

    loss, logits, grads = actual
    ref_loss, ref_logits, ref_grads = expected
    assert_close(loss, ref_loss, rtol, f"{what} loss")
    assert_close(logits, ref_logits, rtol, f"{what} logits")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert ref_grads[name].abs().sum() > 0, f"{what} {name}: PEFT's gradient is zero, the check is void"
        assert_close(grads[name], ref_grads[name], rtol, f"{what} grad {name}")


def assert_within_own_error(ours, peft_lowp, exact):
    """Low-precision check: each of our (loss, logits, grads) errors against the float32 step ``exact`` is at most
    twice what PEFT's own step in that precision (``peft_lowp``) gets, plus 1e-3."""
    from tests.reference import relative_error

    for index, what in ((0, "loss"), (1, "logits")):
        bound = 2 * relative_error(peft_lowp[index].float(), exact[index]) + 1e-3
        assert relative_error(ours[index].float(), exact[index]) < bound, what
    for name, grad in exact[2].items():
        bound = 2 * relative_error(peft_lowp[2][name], grad) + 1e-3
        assert relative_error(ours[2][name], grad) < bound, name


def greedy(model, ids, mask, max_new_tokens=6, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=0, **kwargs)


def greedy_seq2seq(model, ids, mask, max_new_tokens=6, **kwargs):
    """An encoder-decoder's greedy ``generate`` of exactly ``max_new_tokens`` tokens (no eos), with its per-step
    logits (``return_dict_in_generate``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                              return_dict_in_generate=True, output_logits=True, **kwargs)


def assert_same_updates(results, what):
    """``results = {False: (losses, deltas), True: ...}``, PEFT's and the accelerated model's training run: three
    logged losses each, and every prompt parameter's update, equal (and non-zero)."""
    from tests.reference import assert_close

    (peft_losses, peft_deltas), (losses, deltas) = results[False], results[True]
    assert len(losses) == 3
    assert_close(torch.tensor(losses), torch.tensor(peft_losses), 1e-5, f"{what} losses")
    for name, delta in peft_deltas.items():
        assert delta.abs().sum() > 0, f"{name} did not train"
        assert_close(deltas[name], delta, 1e-5, f"update of {name}")


def reference_greedy(model, ids, mask, max_new_tokens=6):
    """What ``greedy`` must give: ``(sequences, per-step logits)`` of PEFT's forward (or a plain model's) looped
    without a cache, stopping at the generation config's eos like ``generate``. Never a ``generate`` as the
    reference: PEFT 0.21.2's stopped equalling its own forward with transformers 5.24."""
    from fastpeft.integration.reference_generate import generate_without_cache

    return generate_without_cache(model, ids, mask, max_new_tokens=max_new_tokens, pad_token_id=0,
                                  eos_token_id=model.generation_config.eos_token_id)


def forbid_framework_attention(monkeypatch, peft_model):
    """Make PyTorch's SDPA and the model family's eager attention raise: only fastpeft's kernels may attend."""
    import importlib

    def forbidden(*args, **kwargs):
        raise AssertionError("the framework's own attention was called")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", forbidden)
    modeling = importlib.import_module(type(peft_model.get_base_model()).__module__)
    monkeypatch.setattr(modeling, "eager_attention_forward", forbidden)


@pytest.fixture
def interpreted_triton(monkeypatch):
    """FASTPEFT_BACKEND=triton on CPU tensors for one test, through the Triton interpreter. Triton fixes the
    interpreter mode at its first import, so tests/conftest.py turns it on for whole CPU-only sessions; elsewhere
    (CUDA sessions) this subset is skipped."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreted-Triton subset needs TRITON_INTERPRET=1 for the whole session "
                    "(tests/conftest.py sets it on CPU-only torch builds)")
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")


def tiny_softcapped_gemma2():
    """A tiny Gemma 2 causal LM with attention logit soft-capping: a family whose attention fastpeft does not
    reproduce (``tanh`` soft-capping of the scores), so every entry point must refuse it."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Gemma2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=32, intermediate_size=128, attn_logit_softcapping=5.0,
                             max_position_embeddings=64, pad_token_id=0)
    return tf.Gemma2ForCausalLM(config).eval()
