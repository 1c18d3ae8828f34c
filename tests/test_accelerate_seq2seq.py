"""fastpeft.accelerate with prefix tuning on encoder-decoders (BART; T5 and MT5 at the end), against PEFT itself on
the same model, adapter and inputs: loss, logits and prompt-encoder gradients (float32, relative error < 1e-5) with
and without ``prefix_projection``, padded encoder batches, labels, decoder masks, a decoder shallower than the
encoder, greedy generation against PEFT's forward looped without a cache, the cache the forward returns, save/load,
restore, and the configurations PEFT itself cannot run, refused by name.

PEFT hands the prefix over as an ``EncoderDecoderCache`` whose cross-attention half it empties, so only the decoder's
self-attention sees a prefix, the decoder numbers its tokens after it, and decoder layer i reads PEFT layer
``2i mod num_layers``'s slots (``encoder_decoder_prefix_spec``): each of these facts changes the numbers below.
"""

import warnings

import pytest
import torch

import fastpeft
from fastpeft.integration import compat
from fastpeft.integration.reference_generate import generate_seq2seq_without_cache
from tests.accelerate_helpers import (assert_same_step, assert_same_updates, forbid_framework_attention,
                                      greedy_seq2seq, randomize_prompt_parameters)
from tests.reference import assert_close

VOCAB = 128
P = 4
PREFIX_METHODS = ("prefix", "prefix_projection")


def tiny_bart(encoder_layers=2, decoder_layers=2, decoder_heads=4, seed=0):
    """A tiny random BART (d_model 128, 4 heads of 32, dropout off, float32, eval)."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.BartConfig(d_model=128, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                           encoder_attention_heads=4, decoder_attention_heads=decoder_heads, encoder_ffn_dim=256,
                           decoder_ffn_dim=256, vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0,
                           activation_dropout=0.0, max_position_embeddings=256, forced_eos_token_id=None)
    return tf.BartForConditionalGeneration(config).eval()


def make(method="prefix", seed=0, **bart_kwargs):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    if method == "prompt":
        config = PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    else:
        config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P,
                                    prefix_projection=method == "prefix_projection", encoder_hidden_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_bart(seed=seed, **bart_kwargs), config)
    randomize_prompt_parameters(peft_model, seed + 100)
    return peft_model


def inputs(batch=3, length=7, decoder_length=5):
    """Right-padded encoder ids and mask (BART pads on the right; row 1 has 2 pads), decoder ids, labels."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, length - 2:] = 0
    ids = ids.masked_fill(mask == 0, 1)  # BART's pad id
    decoder_ids = torch.randint(3, VOCAB, (batch, decoder_length), generator=g)
    labels = torch.randint(3, VOCAB, (batch, decoder_length), generator=g)
    return ids, mask, decoder_ids, labels


def step(peft_model, **forward_kwargs):
    """One forward/backward in train mode: (loss, logits flattened over batch and positions, {name: grad})."""
    peft_model.train()
    peft_model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model(**forward_kwargs)
    out.loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in peft_model.named_parameters()
             if param.requires_grad}
    peft_model.eval()
    return out.loss.detach(), out.logits.detach().flatten(0, 1), grads


def forward_cases():
    ids, mask, decoder_ids, labels = inputs()
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[2, 3:] = 0
    return {
        "decoder_ids": dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, labels=labels),
        # BART builds decoder_input_ids by shifting the labels right.
        "labels_only": dict(input_ids=ids, attention_mask=mask, labels=labels),
        # PEFT puts ones for the prefix in front of a decoder mask: the prefix stays visible to padded rows too.
        "decoder_mask": dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                             decoder_attention_mask=decoder_mask, labels=labels),
    }


@pytest.mark.parametrize("case", ["decoder_ids", "labels_only", "decoder_mask"])
@pytest.mark.parametrize("method", PREFIX_METHODS)
def test_bart_prefix_tuning_step_matches_peft(method, case, monkeypatch):
    """Loss, logits and prompt-encoder gradients equal PEFT's, with every attention (encoder, decoder, cross)
    through fastpeft's kernels."""
    peft_model = make(method)
    kwargs = forward_cases()[case]
    expected = step(peft_model, **kwargs)
    fastpeft.accelerate(peft_model)
    forbid_framework_attention(monkeypatch, peft_model)
    assert_same_step(step(peft_model, **kwargs), expected, what=f"bart/{method}/{case}")


@pytest.mark.parametrize("encoder_layers, decoder_layers", [(3, 3), (4, 4), (3, 2)])
def test_decoder_layers_read_peft_layer_two_i_mod_num_layers(encoder_layers, decoder_layers):
    """PEFT's cache maps decoder layer i to its layer 2i mod num_layers (num_layers = the encoder's layer count):
    with 3 layers all slots are used, with 4 only layers 0 and 2, with a 2-layer decoder under a 3-layer encoder
    layers 0 and 2."""
    peft_model = make("prefix", encoder_layers=encoder_layers, decoder_layers=decoder_layers)
    kwargs = forward_cases()["decoder_ids"]
    expected = step(peft_model, **kwargs)
    fastpeft.accelerate(peft_model)
    assert_same_step(step(peft_model, **kwargs), expected, what=f"bart {encoder_layers}/{decoder_layers} layers")


@pytest.mark.parametrize("method", PREFIX_METHODS)
def test_bart_prefix_tuning_greedy_matches_peft_forward_loop(method):
    """Greedy tokens of the accelerated generate equal those of PEFT's forward looped over the growing decoder
    input without a cache (never PEFT's own generate), and so do the logits they were picked from."""
    peft_model = make(method)
    ids, mask, _, _ = inputs()
    expected, expected_logits = generate_seq2seq_without_cache(peft_model, ids, mask, max_new_tokens=6)
    fastpeft.accelerate(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                  do_sample=False, num_beams=1, eos_token_id=None, forced_bos_token_id=None,
                                  return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, expected)
    assert_close(torch.stack(out.logits), expected_logits, 1e-5, f"bart/{method} step logits")
    # The cache holds the decoder's real tokens only: the prefix is read from the prompt encoder at every step.
    assert compat.cache_of(out).self_attention_cache.get_seq_length() == expected.shape[1] - 1


@pytest.mark.parametrize("method", ["prefix", "prompt", "t5_prompt"])
def test_decoder_longer_than_encoder(method, monkeypatch):
    """Cross-attention with more queries (decoder tokens) than keys (encoder tokens, virtual ones included), which
    the kernels' bottom-right alignment does not take as it is: step and greedy generation from a given decoder
    start (PEFT's own suite generates that way) equal PEFT's. T5 passes its cross-attention bias along."""
    if method == "t5_prompt":
        from tests.test_accelerate_families import _t5_peft

        peft_model = _t5_peft("prompt")
    else:
        peft_model = make(method)
    ids, mask, decoder_ids, labels = inputs(length=3, decoder_length=9)
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, labels=labels)
    expected = step(peft_model, **kwargs)
    start = torch.cat([torch.full((3, 1), peft_model.get_base_model().config.decoder_start_token_id),
                       decoder_ids[:, :8]], dim=1)
    expected_tokens, _ = generate_seq2seq_without_cache(peft_model, ids, mask, max_new_tokens=3,
                                                        decoder_input_ids=start)
    fastpeft.accelerate(peft_model)
    forbid_framework_attention(monkeypatch, peft_model)
    assert_same_step(step(peft_model, **kwargs), expected, what=f"bart/{method} short encoder")
    if method != "prefix":
        return  # PEFT's own generate runs prompt tuning (the step above covers the attention)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = peft_model.generate(input_ids=ids, attention_mask=mask, decoder_input_ids=start, max_new_tokens=3,
                                     min_new_tokens=3, do_sample=False, num_beams=1, eos_token_id=None,
                                     forced_bos_token_id=None)
    assert torch.equal(tokens, expected_tokens)


def test_beam_search_scores_match_peft_forward():
    """Beam search (the cache of real tokens reordered between steps, the prefix shared): every chosen token's
    log-probability, as generate reports it, equals PEFT's forward without a cache on the returned sequence."""
    peft_model = make("prefix")
    ids, mask, _, _ = inputs()
    fastpeft.accelerate(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                  num_beams=3, do_sample=False, eos_token_id=None, forced_bos_token_id=None,
                                  length_penalty=0.0, return_dict_in_generate=True, output_scores=True)
    base = peft_model.get_base_model()
    reported = base.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
    fastpeft.restore(peft_model)
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1]).logits
    expected = logits.float().log_softmax(-1).gather(-1, out.sequences[:, 1:, None])[..., 0]
    assert_close(reported, expected, 1e-5, "beam token log-probabilities")


def test_forward_cache_holds_real_tokens_and_continues_the_sequence():
    """Without labels the output cache holds the L decoder tokens (PEFT's holds P + L); fed back with the next
    token it gives the logits the full decoder input gives (positions continue after prefix and cache)."""
    peft_model = make("prefix")
    ids, mask, decoder_ids, _ = inputs()
    with torch.no_grad():
        full = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        fastpeft.accelerate(peft_model)
        first = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids[:, :-1],
                           use_cache=True)
        cache = compat.cache_of(first)
        assert cache.self_attention_cache.get_seq_length() == decoder_ids.shape[1] - 1
        assert_close(first.logits, full[:, :-1], 1e-5, "logits before the last token")
        last = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids[:, -1:],
                          use_cache=True, **compat.cache_kwargs(peft_model.get_base_model(), cache)).logits
    assert_close(last[:, -1], full[:, -1], 1e-5, "last token's logits from the cache")


def test_save_load_round_trip():
    """The accelerated model saves PEFT's adapter file; it loads back in plain PEFT and, accelerated again, in
    inference mode (PEFT reads the embedding directly there) gives PEFT's logits."""
    import tempfile

    from peft import PeftModel
    from safetensors.torch import load_file

    peft_model = make("prefix_projection")
    ids, mask, decoder_ids, _ = inputs()
    with tempfile.TemporaryDirectory() as plain_dir, tempfile.TemporaryDirectory() as accelerated_dir:
        peft_model.save_pretrained(plain_dir)
        with torch.no_grad():
            expected = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        fastpeft.accelerate(peft_model)
        peft_model.save_pretrained(accelerated_dir)
        saved, plain = (load_file(f"{d}/adapter_model.safetensors") for d in (accelerated_dir, plain_dir))
        assert saved.keys() == plain.keys()
        assert all(torch.equal(saved[key], plain[key]) for key in plain)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PeftModel.from_pretrained(tiny_bart(), accelerated_dir)
        with torch.no_grad():
            peft_logits = loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
            fastpeft.accelerate(loaded)
            ours = loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert_close(peft_logits, expected, 1e-5, "PEFT's logits of the loaded adapter")
    assert_close(ours, peft_logits, 1e-5, "accelerated logits of the loaded adapter")


def test_gradient_checkpointing_matches_peft_without_it():
    """PEFT refuses prefix tuning under gradient checkpointing; accelerated, the decoder's checkpointed layers
    recompute with the prefix as a keyword argument and the step equals PEFT's without checkpointing."""
    peft_model = make("prefix")
    kwargs = forward_cases()["decoder_ids"]
    expected = step(peft_model, **kwargs)
    fastpeft.accelerate(peft_model)
    method, keyword = compat.checkpointing_names(peft_model.get_base_model())
    getattr(peft_model.get_base_model(), method)(**{keyword: {"use_reentrant": False}})
    assert_same_step(step(peft_model, **kwargs), expected, what="bart checkpointed")


def test_disable_adapter_and_restore():
    """Inside disable_adapter() forward and generate are the backbone's own; after restore() PEFT's forward runs
    again and no position hook is left on the decoder."""
    peft_model = make("prefix")
    ids, mask, decoder_ids, _ = inputs()
    base = peft_model.get_base_model()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        expected = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        plain_tokens = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        fastpeft.accelerate(peft_model)
        with peft_model.disable_adapter():
            assert_close(peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits,
                         plain, 1e-5, "disabled adapter logits")
            assert torch.equal(peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                                   do_sample=False), plain_tokens)
        fastpeft.restore(peft_model)
        assert not base.get_decoder().embed_positions._forward_pre_hooks
        restored = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert torch.equal(restored, expected)


@pytest.mark.parametrize("dropping", [(0, 1), (1,)])
def test_prefix_that_misses_a_decoder_self_attention_is_an_error(dropping, monkeypatch):
    """Were the keyword to stop reaching the decoder's self-attention of some layers (a transformers release that stops
    passing keyword arguments down), forward and generate raise, naming those layers, instead of returning the numbers
    of the model without their prefix."""
    from fastpeft.integration.attention import PREFIX_KWARG

    peft_model = fastpeft.accelerate(make("prefix"))
    layers = peft_model.get_base_model().get_decoder().layers
    for index in dropping:
        forward = layers[index].forward

        def forward_dropping_the_prefix(*args, forward=forward, **kwargs):
            kwargs.pop(PREFIX_KWARG, None)
            return forward(*args, **kwargs)

        monkeypatch.setattr(layers[index], "forward", forward_dropping_the_prefix)
    ids, mask, decoder_ids, _ = inputs()
    message = (rf"reached the attention of {2 - len(dropping)} of BartForConditionalGeneration's 2 layers in this "
               rf"call, not layers \[{', '.join(map(str, dropping))}\]")
    with pytest.raises(ValueError, match=message):
        peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    with pytest.raises(ValueError, match=message):
        greedy_seq2seq(peft_model, ids, mask, max_new_tokens=2)


@pytest.mark.parametrize("bart_kwargs, message", [
    (dict(encoder_layers=2, decoder_layers=3), "decoder of BartForConditionalGeneration has 3 layers"),
    (dict(decoder_heads=8), "decoder of BartForConditionalGeneration has 8"),
])
def test_configurations_peft_cannot_run_are_refused_by_name(bart_kwargs, message):
    """A decoder deeper than the prefix (PEFT: IndexError) or with other head counts (PEFT: a size mismatch)."""
    with pytest.raises(ValueError, match=message):
        fastpeft.accelerate(make("prefix", **bart_kwargs))


# ----- T5: the decoder numbers its positions in its relative position bias ----------------------------------------


def make_t5(method="prefix", family="t5", num_layers=2, num_decoder_layers=2, seed=0):
    """PEFT prefix tuning on a tiny T5 (few relative-position buckets, so the test lengths reach the logarithmic
    ones; see ``tests.test_accelerate_families.tiny_t5``), prompt parameters random."""
    from peft import PrefixTuningConfig, get_peft_model

    from tests.test_accelerate_families import tiny_t5

    base = tiny_t5(family, seed=seed)
    if (num_layers, num_decoder_layers) != (2, 2):
        config = base.config
        config.num_layers, config.num_decoder_layers = num_layers, num_decoder_layers
        torch.manual_seed(seed)
        base = type(base)(config).eval()
    config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P,
                                prefix_projection=method == "prefix_projection", encoder_hidden_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(base, config)
    randomize_prompt_parameters(peft_model, seed + 100)
    return peft_model


@pytest.mark.parametrize("family", ["t5", "mt5"])
@pytest.mark.parametrize("case", ["decoder_ids", "labels_only", "decoder_mask"])
@pytest.mark.parametrize("method", PREFIX_METHODS)
def test_t5_prefix_tuning_step_matches_peft(method, case, family, monkeypatch):
    """PEFT's cache of P prefix tokens makes T5's decoder compute its relative position bias over the P prefix
    columns too, with the queries at P + i (fastpeft computes those columns in attention with T5's own compute_bias):
    loss, logits and prompt-encoder gradients equal PEFT's, every attention through fastpeft's kernels, the bias over
    [prefix ; keys] as attn_bias."""
    peft_model = make_t5(method, family)
    kwargs = forward_cases()[case]
    expected = step(peft_model, **kwargs)
    fastpeft.accelerate(peft_model, strict=True)
    forbid_framework_attention(monkeypatch, peft_model)
    assert_same_step(step(peft_model, **kwargs), expected, what=f"{family}/{method}/{case}")


@pytest.mark.parametrize("num_layers, num_decoder_layers", [(3, 3), (3, 2)])
def test_t5_decoder_layers_read_peft_layer_two_i_mod_num_layers(num_layers, num_decoder_layers):
    peft_model = make_t5("prefix", num_layers=num_layers, num_decoder_layers=num_decoder_layers)
    kwargs = forward_cases()["decoder_ids"]
    expected = step(peft_model, **kwargs)
    fastpeft.accelerate(peft_model, strict=True)
    assert_same_step(step(peft_model, **kwargs), expected, what=f"t5 {num_layers}/{num_decoder_layers} layers")


@pytest.mark.parametrize("method", PREFIX_METHODS)
def test_t5_prefix_tuning_greedy_matches_peft_forward_loop(method):
    """Each decoding step's bias covers the prefix columns at the step's position (the cache holds the real tokens
    only): greedy tokens and step logits equal PEFT's forward looped without a cache."""
    peft_model = make_t5(method)
    ids, mask, _, _ = inputs()
    expected, expected_logits = generate_seq2seq_without_cache(peft_model, ids, mask, max_new_tokens=6)
    fastpeft.accelerate(peft_model, strict=True)
    out = greedy_seq2seq(peft_model, ids, mask, max_new_tokens=6)
    assert torch.equal(out.sequences, expected)
    assert_close(torch.stack(out.logits), expected_logits, 1e-5, f"t5/{method} step logits")
    assert compat.cache_of(out).self_attention_cache.get_seq_length() == expected.shape[1] - 1


def test_t5_prefix_tuning_gradient_checkpointing_matches_peft_without_it():
    """Checkpoint recomputation of the decoder's first layer (which computes the position bias) runs after the
    forward: the prefix's bias columns come from the keyword, so they are the same there."""
    peft_model = make_t5("prefix")
    kwargs = forward_cases()["decoder_mask"]
    expected = step(peft_model, **kwargs)
    fastpeft.accelerate(peft_model, strict=True)
    base = peft_model.get_base_model()
    method, keyword = compat.checkpointing_names(base)
    getattr(base, method)(**{keyword: {"use_reentrant": False}})
    assert_same_step(step(peft_model, **kwargs), expected, what="t5 checkpointed")


def test_seq2seq_trainer_steps_match_peft(tmp_path):
    """Three SGD steps of transformers' Seq2SeqTrainer (input ids, mask and labels: BART builds the decoder input)
    give PEFT's losses and prompt-encoder updates."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, default_data_collator

    ids, mask, _, labels = inputs(batch=6)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(len(ids))]
    results = {}
    for accelerated in (False, True):
        peft_model = make("prefix_projection")
        if accelerated:
            fastpeft.accelerate(peft_model)
        initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / str(accelerated)), per_device_train_batch_size=3,
                                        max_steps=3, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                                        warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no",
                                        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                                        dataloader_num_workers=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = Seq2SeqTrainer(model=peft_model, args=args, train_dataset=rows,
                                     data_collator=default_data_collator)
            trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        deltas = {n: p.detach() - initial[n] for n, p in peft_model.named_parameters() if p.requires_grad}
        results[accelerated] = losses, deltas
    assert_same_updates(results, "Seq2SeqTrainer")
