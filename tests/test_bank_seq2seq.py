"""fastpeft.AdapterBank on encoder-decoders (T5, MT5, BART): a batch mixing prefix tuning (with and without
projection), prompt tuning, p-tuning and no adapter, with different numbers of virtual tokens and padding on either
side, gives every row what PEFT gives it alone: decoder logits within 1e-5 and greedy tokens equal to PEFT's forward
looped without a cache (``generate_seq2seq_without_cache``, never a library's generate).

What would change the numbers if it were wrong: each prompt row's virtual tokens go through the bidirectional encoder
with that row, right before its real tokens (BART's absolute positions, T5's relative ones); a prefix row's decoder
reads PEFT's layer ``2i mod num_layers`` and numbers its tokens after its own P (BART's position embedding per row,
T5's relative bias over its own prefix columns), also for beams."""

import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from fastpeft.bank import NO_ADAPTER_SLOT, AdapterBank
from fastpeft.bank_seq2seq import EncoderDecoderAdapterBank
from fastpeft.integration.reference_generate import generate_seq2seq_without_cache
from tests.bank_fixtures import pad_rows, relative_error

VOCAB = 128
NEW_TOKENS = 5
ROW_LENGTHS = (5, 2, 7, 4, 6, 3, 1)
# Every kind, the plain prefix twice (one entry read by two rows), rows without an adapter; the prefix and the prompt
# from their saved directories, the others in memory.
ROW_ADAPTERS = ("prefix", None, "prefix-proj", "prompt", "p-tuning", "prefix", None)
# name -> (PEFT config factory, number of virtual tokens): a different P per adapter.
ADAPTER_KINDS = {
    "prefix": lambda peft: peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
    "prefix-proj": lambda peft: peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=5,
                                                        prefix_projection=True, encoder_hidden_size=64),
    "prompt": lambda peft: peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4),
    "p-tuning": lambda peft: peft.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=6,
                                                      encoder_hidden_size=64),
}
SAVED = ("prefix", "prompt")


def tiny_seq2seq(family, seed=0, encoder_layers=2, decoder_layers=2, decoder_heads=4):
    """A tiny random T5 / MT5 (few relative-position buckets, so that the lengths here reach T5's logarithmic ones) or
    BART (d_model 128, 4 heads of 32, dropout off, eval). Its matrices are redrawn wider than transformers' init
    (which makes a tiny model repeat one token), so that greedy tokens depend on the input and the adapter."""
    import transformers as tf

    torch.manual_seed(seed)
    if family in ("t5", "mt5"):
        config_class, model_class = {"t5": (tf.T5Config, tf.T5ForConditionalGeneration),
                                     "mt5": (tf.MT5Config, tf.MT5ForConditionalGeneration)}[family]
        config = config_class(d_model=128, d_kv=32, d_ff=256, num_layers=encoder_layers,
                              num_decoder_layers=decoder_layers, num_heads=4, vocab_size=VOCAB,
                              relative_attention_num_buckets=8, relative_attention_max_distance=16,
                              dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        std = 0.1
    else:
        config_class, model_class = tf.BartConfig, tf.BartForConditionalGeneration
        config = config_class(d_model=128, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                              encoder_attention_heads=4, decoder_attention_heads=decoder_heads, encoder_ffn_dim=256,
                              decoder_ffn_dim=256, vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0,
                              activation_dropout=0.0, max_position_embeddings=256, forced_eos_token_id=None)
        std = 0.2
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, std)
    return model


def make_peft_model(family, kind, seed, **model_kwargs):
    """PEFT's ``kind`` adapter on a fresh ``tiny_seq2seq`` base, its prompt parameters drawn from ``seed``."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(tiny_seq2seq(family, **model_kwargs), ADAPTER_KINDS[kind](peft))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * (1.0 if "embedding" in name else 0.3))
    return peft_model.eval()


def make_rows(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


@torch.no_grad()
def peft_alone(model, row, decoder_row):
    """PEFT (or the base model) on one unpadded row: the decoder's logits ``[T, vocab]`` for ``decoder_row`` and the
    greedy decoder sequence of its forward looped without a cache, ending at the model's eos."""
    logits = model(input_ids=row[None], decoder_input_ids=decoder_row[None]).logits[0]
    generation = model.generation_config
    sequence, _ = generate_seq2seq_without_cache(model, row[None], max_new_tokens=NEW_TOKENS,
                                                 eos_token_id=generation.eos_token_id,
                                                 pad_token_id=generation.pad_token_id)
    return logits, sequence[0]


def _build_setup(family, directory):
    peft_models = {kind: make_peft_model(family, kind, seed=100 + i) for i, kind in enumerate(ADAPTER_KINDS)}
    bank = AdapterBank(tiny_seq2seq(family))
    for kind, peft_model in peft_models.items():
        if kind in SAVED:
            peft_model.save_pretrained(os.path.join(directory, kind))
            bank.add(kind, os.path.join(directory, kind))
        else:
            bank.add(kind, peft_model)
    base = tiny_seq2seq(family)
    model_of = {None: base, **peft_models}
    rows = make_rows(seed=7, lengths=ROW_LENGTHS)
    start = base.config.decoder_start_token_id
    decoder_ids = torch.cat([torch.full((len(rows), 1), start), torch.randint(
        3, VOCAB, (len(rows), 4), generator=torch.Generator().manual_seed(8))], dim=1)
    references = [peft_alone(model_of[name], row, decoder_ids[b])
                  for b, (row, name) in enumerate(zip(rows, ROW_ADAPTERS))]
    return SimpleNamespace(bank=bank, rows=rows, decoder_ids=decoder_ids, references=references,
                           peft_models=peft_models, model_of=model_of, base=base)


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _build_setup(family, str(tmp_path_factory.mktemp(family)))
        return cache[family]

    yield get
    for setup in cache.values():
        setup.bank.close()


def assert_rows_match_peft(s, logits, generated, what):
    for b, name in enumerate(ROW_ADAPTERS):
        ref_logits, ref_sequence = s.references[b]
        err = relative_error(logits[b], ref_logits)
        assert err < 1e-5, f"{what}: row {b} (adapter {name!r}) logits relative error {err:.2e}"
        # PEFT's loop stops where the row's eos came; transformers pads rows that ended before the batch did.
        assert torch.equal(generated[b, :len(ref_sequence)], ref_sequence), \
            f"{what}: row {b} (adapter {name!r}) generated {generated[b].tolist()}, PEFT {ref_sequence.tolist()}"


@pytest.mark.parametrize("family,side", [("t5", "left"), ("t5", "right"), ("mt5", "left"), ("bart", "right"),
                                         ("bart", "left")])
def test_mixed_batch_equals_peft_per_row(setups, family, side):
    s = setups(family)
    assert isinstance(s.bank, AdapterBank) and isinstance(s.bank, EncoderDecoderAdapterBank)
    ids, mask = pad_rows(s.rows, side, pad_id=s.base.config.pad_token_id)
    logits = s.bank(ids, attention_mask=mask, adapters=ROW_ADAPTERS, decoder_input_ids=s.decoder_ids).logits
    assert logits.shape == (len(s.rows), s.decoder_ids.shape[1], VOCAB)
    generated = s.bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS, max_new_tokens=NEW_TOKENS)
    assert generated.shape[0] == len(s.rows) and generated.shape[1] <= 1 + NEW_TOKENS
    assert_rows_match_peft(s, logits, generated, f"{family}/{side}")


_TRITON_SERVING_SCRIPT = """
import importlib, sys
import torch
import transformers.models.bart.modeling_bart as modeling_bart
from fastpeft.bank import AdapterBank
from tests.test_bank_seq2seq import tiny_seq2seq

def forbidden(*args, **kwargs):
    raise AssertionError("a non-kernel attention path ran")

torch.nn.functional.scaled_dot_product_attention = forbidden
modeling_bart.eager_attention_forward = forbidden
importlib.import_module("fastpeft.ops.backends.reference").reference_attention = forbidden

request = torch.load(sys.argv[1])
bank = AdapterBank(tiny_seq2seq("bart"))
for name, directory in request["dirs"].items():
    bank.add(name, directory)
logits = bank(request["ids"], attention_mask=request["mask"], adapters=request["adapters"],
              decoder_input_ids=request["decoder_ids"]).logits
generated = bank.generate(request["ids"], attention_mask=request["mask"], adapters=request["adapters"],
                          max_new_tokens=request["new_tokens"])
torch.save({"logits": logits, "generated": generated}, sys.argv[2])
"""


def test_triton_kernels_serve_bart_without_framework_attention(setups, tmp_path):
    """With FASTPEFT_BACKEND=triton (TRITON_INTERPRET=1 on CPU) BART's encoder (rows of ragged virtual tokens, padded),
    decoder self-attention (the prefix tables, per-row positions) and cross-attention all run on the Triton kernels:
    SDPA, BART's eager attention and fastpeft's PyTorch reference are made to raise. A fresh interpreter: Triton
    fixes the interpreter mode when it is first imported."""
    pytest.importorskip("triton")
    s = setups("bart")
    dirs = {}
    for kind, peft_model in s.peft_models.items():
        dirs[kind] = str(tmp_path / kind)
        peft_model.save_pretrained(dirs[kind])
    ids, mask = pad_rows(s.rows, "left", pad_id=s.base.config.pad_token_id)
    new_tokens = 2
    torch.save(dict(dirs=dirs, ids=ids, mask=mask, adapters=list(ROW_ADAPTERS), decoder_ids=s.decoder_ids,
                    new_tokens=new_tokens), tmp_path / "request.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", FASTPEFT_BACKEND="triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _TRITON_SERVING_SCRIPT, str(tmp_path / "request.pt"),
                          str(tmp_path / "result.pt")], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    for b, name in enumerate(ROW_ADAPTERS):
        ref_logits, ref_sequence = s.references[b]
        assert relative_error(result["logits"][b], ref_logits) < 1e-5, f"row {b} ({name!r})"
        length = min(len(ref_sequence), 1 + new_tokens)
        assert torch.equal(result["generated"][b, :length], ref_sequence[:length]), f"row {b} ({name!r})"


def test_the_encoder_runs_once_per_request_on_rows_as_wide_as_the_longest(setups):
    """generate encodes once, then transformers runs the decoder alone at each step; each row's own virtual tokens
    sit right before its real tokens, so the encoder's batch is as wide as the longest row (virtual tokens included),
    not the longest adapter plus the longest input."""
    s = setups("t5")
    encoder = s.bank.model.get_encoder()
    widths = []
    handle = encoder.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
        tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    rows = [s.rows[4][:2], s.rows[2]]  # p-tuning (6 virtual tokens) on 2 tokens, no adapter on 7: widths 8 and 7
    ids, mask = pad_rows(rows, "left")
    try:
        out = s.bank.generate(ids, attention_mask=mask, adapters=["p-tuning", None], max_new_tokens=4,
                              eos_token_id=[], return_dict_in_generate=True)
    finally:
        handle.remove()
    assert widths == [(2, 8)]
    assert out.sequences.shape == (2, 5)  # eos_token_id=[]: no row ends early
    from fastpeft.integration import compat

    assert compat.cache_of(out).self_attention_cache.get_seq_length() == 4  # the decoder's own tokens only
    for b, (row, name) in enumerate(zip(rows, ["p-tuning", None])):
        expected, _ = generate_seq2seq_without_cache(s.model_of[name], row[None], max_new_tokens=4)
        assert torch.equal(out.sequences[b], expected[0])


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_beam_search_per_row_adapters_scores_match_peft_forward(setups, family):
    """Beams copy each row's prefix entry and its decoder positions (BART) / prefix bias columns (T5): every
    returned beam's per-token log-probabilities equal PEFT's forward on that beam's decoder tokens for its row alone."""
    s = setups(family)
    rows = [0, 2, 3, 4, 1]  # prefix, projection prefix (another P), prompt tuning, p-tuning, no adapter
    adapters = [ROW_ADAPTERS[b] for b in rows]
    ids, mask = pad_rows([s.rows[b] for b in rows], "left", pad_id=s.base.config.pad_token_id)
    returned = 2
    out = s.bank.generate(ids, attention_mask=mask, adapters=adapters, max_new_tokens=3, num_beams=3,
                          num_return_sequences=returned, length_penalty=0.0, eos_token_id=[],
                          return_dict_in_generate=True, output_scores=True)
    transition = s.bank.model.compute_transition_scores(out.sequences, out.scores, out.beam_indices,
                                                        normalize_logits=False)
    assert out.sequences.shape == (len(rows) * returned, 4)
    for i, sequence in enumerate(out.sequences):
        b = rows[i // returned]
        with torch.no_grad():
            logits = s.model_of[ROW_ADAPTERS[b]](input_ids=s.rows[b][None],
                                                 decoder_input_ids=sequence[None, :-1]).logits[0]
        log_probs = logits.float().log_softmax(-1).gather(-1, sequence[1:, None]).squeeze(-1)
        assert relative_error(transition[i], log_probs) < 1e-5, f"beam {i} of row {b} ({ROW_ADAPTERS[b]!r})"


def test_default_decoder_input_is_the_start_token_and_zero_new_tokens_return_it(setups):
    s = setups("bart")
    ids, mask = pad_rows(s.rows[:3], "right", pad_id=s.base.config.pad_token_id)
    logits = s.bank(ids, attention_mask=mask, adapters=ROW_ADAPTERS[:3]).logits
    assert logits.shape == (3, 1, VOCAB)
    for b in range(3):
        assert relative_error(logits[b], s.references[b][0][:1]) < 1e-5
    start = torch.full((3, 1), s.base.config.decoder_start_token_id)
    assert torch.equal(s.bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS[:3], max_new_tokens=0), start)


def test_eos_list_empty_never_ends_a_row(setups):
    """``eos_token_id=[]`` outranks the model's generation config, whose eos would end a row that produces it (a
    generation config's None would be filled from the model's), and the default ends it there."""
    s = setups("bart")
    ids, mask = pad_rows(s.rows, "right", pad_id=s.base.config.pad_token_id)
    free = s.bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS, max_new_tokens=NEW_TOKENS,
                           eos_token_id=[])
    assert free.shape == (len(s.rows), 1 + NEW_TOKENS)
    for b, name in enumerate(ROW_ADAPTERS):
        expected, _ = generate_seq2seq_without_cache(s.model_of[name], s.rows[b][None], max_new_tokens=NEW_TOKENS)
        assert torch.equal(free[b], expected[0]), f"row {b} ({name!r})"
    generation = s.bank.model.generation_config
    eos, pad = generation.eos_token_id, generation.pad_token_id
    generation.eos_token_id = int(free[2, 2])  # row 2 produces it as its second token
    try:
        ended = s.bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS, max_new_tokens=NEW_TOKENS)
        again = s.bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS, max_new_tokens=NEW_TOKENS,
                                eos_token_id=[])
    finally:
        generation.eos_token_id = eos
    assert torch.equal(ended[2, :3], free[2, :3]) and (ended[2, 3:] == pad).all()
    assert torch.equal(again, free)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_decoder_shallower_than_the_prefix_reads_layer_two_i_mod_num_layers(family, tmp_path):
    """With a 3-layer encoder and a 2-layer decoder, decoder layer 1 reads the adapter's layer 2 (PEFT's cache
    layout), not layer 1: a prefix row equals PEFT's."""
    shape = dict(encoder_layers=3, decoder_layers=2)
    peft_model = make_peft_model(family, "prefix", seed=5, **shape)
    rows = make_rows(seed=9, lengths=(4, 6))
    ids, mask = pad_rows(rows, "left")
    decoder_ids = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(1))
    with AdapterBank(tiny_seq2seq(family, **shape)) as bank:
        bank.add("prefix", peft_model)
        logits = bank(ids, attention_mask=mask, adapters=["prefix", None], decoder_input_ids=decoder_ids).logits
    base = tiny_seq2seq(family, **shape)
    for b, model in enumerate((peft_model, base)):
        with torch.no_grad():
            expected = model(input_ids=rows[b][None], decoder_input_ids=decoder_ids[b:b + 1]).logits[0]
        assert relative_error(logits[b], expected) < 1e-5


@pytest.mark.parametrize("shape, message", [
    (dict(encoder_layers=2, decoder_layers=3), "decoder of BartForConditionalGeneration has 3 layers"),
    (dict(decoder_heads=8), "decoder of BartForConditionalGeneration has 8"),
])
def test_prefix_peft_cannot_run_on_the_decoder_is_refused_by_name(shape, message):
    """A decoder deeper than the prefix's num_layers (PEFT: IndexError) or with other heads (PEFT: a size mismatch),
    as ``fastpeft.accelerate`` refuses it; prompt tuning, which never reaches the decoder, still serves there."""
    with AdapterBank(tiny_seq2seq("bart", **shape)) as bank:
        with pytest.raises(ValueError, match=message):
            bank.add("prefix", make_peft_model("bart", "prefix", seed=1, **shape))
        assert len(bank) == 0
        prompt = make_peft_model("bart", "prompt", seed=2, **shape)
        bank.add("prompt", prompt)
        row = make_rows(seed=3, lengths=(5,))[0]
        decoder_ids = torch.tensor([[2, 5, 6]])
        logits = bank(row[None], adapters=["prompt"], decoder_input_ids=decoder_ids).logits
        with torch.no_grad():
            expected = prompt(input_ids=row[None], decoder_input_ids=decoder_ids).logits
        assert relative_error(logits, expected) < 1e-5


def test_adapters_of_another_task_or_layout_are_refused(setups):
    from peft import PromptTuningConfig, get_peft_model

    from tests.models import tiny_model

    s = setups("t5")
    names = s.bank.names
    causal = get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="task_type 'CAUSAL_LM' \\(expected 'SEQ_2_SEQ_LM'\\)"):
        s.bank.add("causal", causal)
    assert s.bank.names == names
    with AdapterBank(tiny_model("llama")) as causal_bank:
        with pytest.raises(ValueError, match="task_type 'SEQ_2_SEQ_LM' \\(expected 'CAUSAL_LM'\\)"):
            causal_bank.add("seq2seq", s.peft_models["prompt"])
    with AdapterBank(tiny_seq2seq("t5", encoder_layers=3)) as deeper:
        with pytest.raises(ValueError, match="layers: adapter 2, base model 3"):
            deeper.add("prefix", s.peft_models["prefix"])


def test_remove_re_add_close_and_storage(setups):
    s = setups("t5")
    bank = AdapterBank(tiny_seq2seq("t5"), initial_capacity=1)
    model = bank.model
    assert model.config._attn_implementation == "fastpeft"
    empty = bank.storage_bytes
    for kind, peft_model in s.peft_models.items():
        bank.add(kind, peft_model)
    assert {kind: bank.num_virtual_tokens(kind) for kind in ADAPTER_KINDS} == {
        "prefix": 3, "prefix-proj": 5, "prompt": 4, "p-tuning": 6}
    assert bank.storage_bytes > empty
    slots = {kind: bank.slot_of(kind) for kind in ADAPTER_KINDS}
    assert slots["prompt"].decoder == slots["prefix"].encoder == NO_ADAPTER_SLOT
    bank.remove("prompt")
    bank.remove("prefix")
    with pytest.raises(KeyError, match="'prompt'"):
        bank(s.rows[0][None], adapters=["prompt"])
    bank.add("prompt-again", s.peft_models["prompt"])
    bank.add("prefix-again", s.peft_models["prefix"])
    assert bank.slot_of("prompt-again") == slots["prompt"] and bank.slot_of("prefix-again") == slots["prefix"]
    ids, mask = pad_rows(s.rows, "left")
    adapters = [{"prefix": "prefix-again", "prompt": "prompt-again"}.get(name, name) for name in ROW_ADAPTERS]
    logits = bank(ids, attention_mask=mask, adapters=adapters, decoder_input_ids=s.decoder_ids).logits
    for b in range(len(s.rows)):
        assert relative_error(logits[b], s.references[b][0]) < 1e-5
    bank.close()
    assert model.config._attn_implementation != "fastpeft" and bank.storage_bytes == 0
    with pytest.raises(RuntimeError, match="closed"):
        bank(ids, attention_mask=mask)


def test_bad_inputs_are_refused(setups):
    s = setups("t5")
    ids, mask = pad_rows(s.rows[:2], "left")
    with pytest.raises(ValueError, match="decoder_input_ids must be a \\[B=2, T >= 1\\] tensor"):
        s.bank(ids, attention_mask=mask, decoder_input_ids=s.decoder_ids)
    with pytest.raises(ValueError, match="decoder_input_ids must hold integer token ids"):
        s.bank(ids, attention_mask=mask, decoder_input_ids=s.decoder_ids[:2].float())
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="rows \\[1\\] have no real token"):
        s.bank(ids, attention_mask=empty)
    for reserved in ("encoder_outputs", "inputs_embeds", "decoder_inputs_embeds", "fastpeft_prefix"):
        with pytest.raises(ValueError, match=f"sets {reserved} itself"):
            s.bank.generate(ids, attention_mask=mask, **{reserved: None})
    with pytest.raises(KeyError, match="'nope'"):
        s.bank.generate(ids, attention_mask=mask, adapters=["nope", None])


def test_a_decoder_layer_dropping_the_prefix_is_an_error(monkeypatch):
    """Were the keyword to stop reaching a decoder layer's self-attention, forward and generate raise, naming it,
    instead of returning that layer's numbers without the prefix."""
    from fastpeft.integration.attention import PREFIX_KWARG

    bank = AdapterBank(tiny_seq2seq("t5"))
    bank.add("prefix", make_peft_model("t5", "prefix", seed=1))
    layer = bank.model.get_decoder().block[1]
    forward = layer.forward

    def forward_dropping_the_prefix(*args, **kwargs):
        kwargs.pop(PREFIX_KWARG, None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", forward_dropping_the_prefix)
    ids = torch.tensor([[5, 6, 7]])
    message = r"reached the attention of 1 of T5ForConditionalGeneration's 2 layers in this call, not layers \[1\]"
    with pytest.raises(ValueError, match=message):
        bank(ids, adapters=["prefix"])
    with pytest.raises(ValueError, match=message):
        bank.generate(ids, adapters=["prefix"], max_new_tokens=2)
    bank.close()
