"""Shared helpers of the AdapterBank tests: PEFT adapters of every prompt-learning kind, ragged padded batches, and
PEFT's own per-row results (each row alone, unpadded, with its own adapter) as the reference."""

import torch

from tests.models import VOCAB

# name -> (PEFT config factory, number of virtual tokens). Different P per adapter, both prefix variants.
ADAPTER_KINDS = {
    "prefix": lambda: _peft().PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    "prefix-proj": lambda: _peft().PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                                      prefix_projection=True, encoder_hidden_size=64),
    "prompt": lambda: _peft().PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p-tuning": lambda: _peft().PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=6,
                                                    encoder_hidden_size=64),
}


def _peft():
    import peft

    return peft


def make_peft_model(model_factory, kind, seed):
    """A PEFT model of ``kind`` (a key of ADAPTER_KINDS) around a fresh base from ``model_factory``, with its prompt
    parameters drawn from ``seed`` (never zeros: PEFT draws embeddings from N(0, 1), MLPs from their default init)."""
    torch.manual_seed(seed)
    return _peft().get_peft_model(model_factory(), ADAPTER_KINDS[kind]()).eval()


def make_rows(seed, lengths):
    """One random token list per length, ids in [3, VOCAB) (so no row holds the pad, bos or eos id)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def pad_rows(rows, side, pad_id=0):
    """input_ids and attention_mask ``[B, max_len]`` with each row padded on ``side`` ('left' or 'right')."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = row, 1
    return ids, mask


@torch.no_grad()
def peft_reference(model, row, max_new_tokens):
    """PEFT (or the plain base model) on one unpadded row: logits at its tokens ``[L, vocab]`` (the virtual-token
    positions of prompt tuning dropped) and the greedily generated tokens ``[max_new_tokens]`` or fewer, from PEFT's
    forward looped without a cache (never a ``generate``: PEFT's broke with transformers 5.24)."""
    from fastpeft.integration.reference_generate import generate_without_cache

    ids = row.unsqueeze(0)
    logits = model(input_ids=ids).logits[0, -len(row):]
    eos = model.generation_config.eos_token_id
    generated, _ = generate_without_cache(model, ids, max_new_tokens=max_new_tokens, eos_token_id=eos)
    return logits, generated[0, len(row):]


def relative_error(actual, expected):
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm())


def assert_rows_match_reference(bank_logits, generated, mask, rows, adapters, references, tol=1e-5):
    """Every row's logits at its real tokens and its greedy tokens equal the reference of that row alone."""
    width = mask.shape[1]
    for b, (row, name) in enumerate(zip(rows, adapters)):
        ref_logits, ref_tokens = references[b]
        real = mask[b].bool()
        err = relative_error(bank_logits[b][real], ref_logits)
        assert err < tol, f"row {b} (adapter {name!r}): logits relative error {err:.2e} >= {tol}"
        new = generated[b, width:width + len(ref_tokens)]
        assert torch.equal(new.cpu(), ref_tokens), \
            f"row {b} (adapter {name!r}): generated {new.tolist()}, PEFT alone {ref_tokens.tolist()}"
