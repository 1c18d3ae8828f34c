"""Generation by PEFT's own forward, without a KV cache: the reference fastpeft's generation is checked against.

``generate_without_cache`` re-runs the whole sequence through the model's ``forward`` at every step and picks the
next token from the last position's logits. It uses no KV cache and none of transformers' or PEFT's ``generate``
code, so it stays right when a release changes how ``generate`` hands the cache around (transformers 5.24 renamed
it, and PEFT 0.21.2's ``generate`` then no longer equals its own forward). Slow by design: a reference, used by
the tests and by ``fastpeft generate --engine peft``.

PEFT's position semantics are kept: prefix tuning (and a plain model) numbers the real tokens of each row from P
(from 0) whatever the padding, so each row runs alone, unpadded: that is what the pad-aware ``generate`` computes;
prompt tuning and p-tuning number the concatenation ``[virtual tokens ; input]`` from 0, padding included, as PEFT's
``generate`` does, so the padded batch runs as it is. The forward keeps its default cache setting (PEFT's prefix
tuning forward hands its prefix over as a cache); no cache survives from one step to the next.
``generate_seq2seq_without_cache`` does the same for encoder-decoders, growing the decoder input.
"""

import torch

from ..sampling import logits_processors
from .compat import adapters_disabled


def _rows_run_alone(model):
    """False only for a PeftModel whose active, enabled adapter is prompt tuning or p-tuning: PEFT numbers their
    padded concatenation from 0. Prefix tuning and plain models (a disabled adapter too) have pad-aware generation
    positions, which a row run alone and unpadded reproduces."""
    from peft import PeftModel, PeftType

    if not isinstance(model, PeftModel) or adapters_disabled(model):
        return True
    return model.active_peft_config.peft_type == PeftType.PREFIX_TUNING


def _last_logits(model, input_ids, attention_mask, per_row):
    """``[B, vocab]`` logits at each row's last position from one forward without a cache."""
    if not per_row:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].float()
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
        real = ids[mask.bool()].unsqueeze(0)
        rows.append(model(input_ids=real, attention_mask=torch.ones_like(real)).logits[0, -1])
    return torch.stack(rows).float()


@torch.no_grad()
def generate_without_cache(model, input_ids, attention_mask=None, max_new_tokens=8, do_sample=False,
                           temperature=1.0, top_k=50, top_p=1.0, eos_token_id=None, pad_token_id=0,
                           generator=None):
    """Greedy or sampled generation by repeated full forwards of ``model`` (a ``PeftModel`` or a plain causal LM).

    Arguments:
        input_ids, attention_mask: ``[B, L]``, left-padded (right padding would put pads before new tokens).
        do_sample, temperature, top_k, top_p: as transformers' ``generate``; sampling draws one
            ``torch.multinomial`` over the ``[B, vocab]`` probabilities per step, as transformers does, so the same
            seed gives the same draws.
        eos_token_id: an id or list of ids that end a row (later tokens are ``pad_token_id``); None: never.

    Returns ``(sequences [B, L + n], logits [n, B, vocab])``: the input followed by the new tokens, and the raw
    float32 logits each step's token was picked from; ``n < max_new_tokens`` when every row ended early.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    per_row = _rows_run_alone(model)
    processors = logits_processors(do_sample, temperature, top_k, top_p)
    eos = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    sequences, step_logits = input_ids, []
    for _ in range(max_new_tokens):
        logits = _last_logits(model, sequences, attention_mask, per_row)
        step_logits.append(logits)
        if do_sample:
            probabilities = processors(sequences, logits.clone()).softmax(-1)
            token = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        else:
            token = logits.argmax(-1)
        if eos is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            unfinished &= ~torch.isin(token, eos)
        sequences = torch.cat([sequences, token.unsqueeze(1)], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        if eos is not None and not bool(unfinished.any()):
            break
    return sequences, torch.stack(step_logits)


@torch.no_grad()
def generate_seq2seq_without_cache(model, input_ids, attention_mask=None, max_new_tokens=8, decoder_input_ids=None,
                                   eos_token_id=None, pad_token_id=0):
    """Greedy generation of an encoder-decoder (a ``PeftModelForSeq2SeqLM`` or a plain seq2seq LM) by repeated full
    forwards: the encoder input stays as it is, the decoder input grows from ``decoder_input_ids`` (default: the
    model config's ``decoder_start_token_id`` alone) by the argmax of the last position's logits. No KV cache survives from one step to the next and
    no ``generate`` code runs, so PEFT's forward semantics (prefix tuning: the decoder's tokens after its prefix) are
    what it computes. The batch runs as it is: the encoder's padding is masked, the decoder has none.

    Arguments:
        input_ids, attention_mask: ``[B, L]`` encoder input, padded either side (BART pads on the right).
        decoder_input_ids: ``[B, T]``, the decoder's start (transformers' ``generate`` puts the start token in front
            of a given one that lacks it; this takes it as it is).
        eos_token_id: an id or list of ids that end a row (later tokens are ``pad_token_id``); None: never.

    Returns ``(decoder sequences [B, T + n], logits [n, B, vocab])``: the decoder's start followed by the new tokens
    (what transformers' ``generate`` returns for an encoder-decoder), and the float32 logits each token was picked
    from; ``n < max_new_tokens`` when every row ended early.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = None if eos_token_id is None else torch.tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    sequences = decoder_input_ids
    if sequences is None:
        sequences = torch.full((input_ids.shape[0], 1), model.config.decoder_start_token_id, dtype=input_ids.dtype,
                               device=input_ids.device)
    step_logits = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       decoder_input_ids=sequences).logits[:, -1].float()
        step_logits.append(logits)
        token = logits.argmax(-1)
        if eos is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            unfinished &= ~torch.isin(token, eos)
        sequences = torch.cat([sequences, token.unsqueeze(1)], dim=1)
        if eos is not None and not bool(unfinished.any()):
            break
    return sequences, torch.stack(step_logits)


@torch.no_grad()
def teacher_forced_logits(model, sequences, attention_mask, prompt_length):
    """``[n, B, vocab]``: the logits ``model`` gives for each new token of ``sequences [B, prompt_length + n]`` from
    the tokens before it (a forward without cache per step, PEFT's positions as in ``generate_without_cache``).
    Compares another generator's per-step logits on the tokens it picked, e.g. after sampling."""
    per_row = _rows_run_alone(model)
    steps = []
    for end in range(prompt_length, sequences.shape[1]):
        extra = attention_mask.new_ones(attention_mask.shape[0], end - prompt_length)
        steps.append(_last_logits(model, sequences[:, :end], torch.cat([attention_mask, extra], dim=1), per_row))
    return torch.stack(steps)
