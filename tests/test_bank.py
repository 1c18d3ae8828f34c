"""fastpeft.AdapterBank: a batch mixing prefix tuning (with and without projection), prompt tuning, p-tuning and no
adapter, with different numbers of virtual tokens and padding, gives every row what PEFT gives it alone."""

import gc
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from fastpeft.adapters import load_prompt_adapter, prefix_key_values
from fastpeft.integration.geometry import BaseGeometry
from fastpeft.bank import AdapterBank
from fastpeft.integration.reference_generate import generate_without_cache
from tests.bank_fixtures import (ADAPTER_KINDS, assert_rows_match_reference, make_peft_model, make_rows, pad_rows,
                                 peft_reference, relative_error)
from tests.models import tiny_model

NEW_TOKENS = 4
ROW_LENGTHS = (5, 2, 7, 4, 6, 3, 7, 1)
# Every kind, twice for some (same entry read by several rows), the projection prefix both in memory and from disk.
ROW_ADAPTERS = ("prefix", None, "prefix-proj", "prompt", "p-tuning", "prefix-proj-dir", "prefix", None)


def _build_setup(family, tmp_dir):
    factory = lambda: tiny_model(family)  # noqa: E731  identical weights on every call (seeded)
    peft_models = {kind: make_peft_model(factory, kind, seed=100 + i) for i, kind in enumerate(ADAPTER_KINDS)}
    dirs = {}
    for kind in ADAPTER_KINDS:
        dirs[kind] = os.path.join(tmp_dir, f"{family}-{kind}")
        peft_models[kind].save_pretrained(dirs[kind])

    bank = AdapterBank(tiny_model(family))
    bank.add("prefix", dirs["prefix"])
    bank.add("prefix-proj", peft_models["prefix-proj"])  # in memory: the projection MLP is evaluated once
    bank.add("prefix-proj-dir", dirs["prefix-proj"])  # saved: the MLP's output
    bank.add("prompt", dirs["prompt"])
    bank.add("p-tuning", peft_models["p-tuning"])

    base = tiny_model(family)
    model_of = {None: base, "prefix-proj-dir": peft_models["prefix-proj"], **peft_models}
    rows = make_rows(seed=7, lengths=ROW_LENGTHS)
    references = [peft_reference(model_of[name], row, NEW_TOKENS) for row, name in zip(rows, ROW_ADAPTERS)]
    return SimpleNamespace(bank=bank, rows=rows, references=references, dirs=dirs, peft_models=peft_models,
                           base=base)


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


@pytest.mark.parametrize("family,side", [("llama", "left"), ("llama", "right"), ("gpt2", "left"), ("qwen2", "left")])
def test_mixed_batch_equals_peft_per_row(setups, family, side):
    s = setups(family)
    ids, mask = pad_rows(s.rows, side)
    logits = s.bank(ids, attention_mask=mask, adapters=ROW_ADAPTERS).logits
    assert logits.shape == (len(s.rows), ids.shape[1], s.base.config.vocab_size)
    generated = s.bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS, max_new_tokens=NEW_TOKENS)
    assert generated.shape[0] == len(s.rows) and ids.shape[1] < generated.shape[1] <= ids.shape[1] + NEW_TOKENS
    assert torch.equal(generated[:, :ids.shape[1]], ids)
    assert_rows_match_reference(logits, generated, mask, s.rows, ROW_ADAPTERS, s.references)


_TRITON_SERVING_SCRIPT = """
import importlib, sys
import torch
import transformers.models.llama.modeling_llama as modeling_llama
from fastpeft.bank import AdapterBank
from tests.models import tiny_model

def forbidden(*args, **kwargs):
    raise AssertionError("a non-kernel attention path ran")

torch.nn.functional.scaled_dot_product_attention = forbidden
modeling_llama.eager_attention_forward = forbidden
importlib.import_module("fastpeft.ops.backends.reference").reference_attention = forbidden

request = torch.load(sys.argv[1])
bank = AdapterBank(tiny_model("llama"))
for name, directory in request["dirs"].items():
    bank.add(name, directory)  # prompt tuning / p-tuning run their virtual tokens through the kernels here
logits = bank(request["ids"], attention_mask=request["mask"], adapters=request["adapters"]).logits
generated = bank.generate(request["ids"], attention_mask=request["mask"], adapters=request["adapters"],
                          max_new_tokens=request["new_tokens"])
torch.save({"logits": logits, "generated": generated}, sys.argv[2])
"""


def test_triton_kernels_serve_without_framework_attention(setups, tmp_path):
    """With FASTPEFT_BACKEND=triton (TRITON_INTERPRET=1 on CPU) the bank's add, prefill and decode run on the Triton
    kernels: SDPA, transformers' eager attention and fastpeft's PyTorch reference are made to raise. It runs in a
    fresh interpreter because Triton fixes the interpreter mode when it (and each kernel module) is first imported,
    which in this process happened long before."""
    pytest.importorskip("triton")
    s = setups("llama")
    new_tokens = 2
    ids, mask = pad_rows(s.rows, "left")
    dirs = {name: s.dirs[name.replace("-dir", "")] for name in ROW_ADAPTERS if name is not None}
    torch.save(dict(dirs=dirs, ids=ids, mask=mask, adapters=list(ROW_ADAPTERS), new_tokens=new_tokens),
               tmp_path / "request.pt")
    env = dict(os.environ, TRITON_INTERPRET="1", FASTPEFT_BACKEND="triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _TRITON_SERVING_SCRIPT, str(tmp_path / "request.pt"),
                          str(tmp_path / "result.pt")], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    references = [(ref_logits, ref_tokens[:new_tokens]) for ref_logits, ref_tokens in s.references]
    assert_rows_match_reference(result["logits"], result["generated"], mask, s.rows, ROW_ADAPTERS, references)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_on_cuda(setups, dtype):
    """On the GPU (Triton prefill, Triton or CUDA split-KV decode): float32 gives PEFT's per-row logits (compared with
    the CPU float32 PEFT references) and greedy tokens; bfloat16 stays within bfloat16 rounding of them."""
    s = setups("llama")
    dirs = {name: s.dirs[name.replace("-dir", "")] for name in ROW_ADAPTERS if name is not None}
    ids, mask = pad_rows(s.rows, "left")
    with AdapterBank(tiny_model("llama").to("cuda", dtype)) as bank:
        for name, directory in dirs.items():
            bank.add(name, directory)
        logits = bank(ids.cuda(), attention_mask=mask.cuda(), adapters=ROW_ADAPTERS).logits.float().cpu()
        generated = bank.generate(ids.cuda(), attention_mask=mask.cuda(), adapters=ROW_ADAPTERS,
                                  max_new_tokens=NEW_TOKENS).cpu()
    assert logits.shape[:2] == ids.shape and generated.shape[0] == len(s.rows)
    if dtype == torch.float32:
        # float32 on both sides; the GPU's matmuls differ from the CPU's in the last bits only.
        assert_rows_match_reference(logits, generated, mask, s.rows, ROW_ADAPTERS, s.references, tol=1e-4)
    else:
        for b, (ref_logits, _) in enumerate(s.references):
            err = relative_error(logits[b][mask[b].bool()], ref_logits)
            assert err < 3e-2, f"row {b} ({ROW_ADAPTERS[b]!r}): bfloat16 logits relative error {err:.2e}"


def test_rows_without_adapter_equal_the_base_model(setups):
    s = setups("llama")
    ids, mask = pad_rows(s.rows[:3], "left")
    logits = s.bank(ids, attention_mask=mask).logits
    for b, row in enumerate(s.rows[:3]):
        with torch.no_grad():
            expected = s.base(input_ids=row.unsqueeze(0)).logits[0]
        assert relative_error(logits[b][mask[b].bool()], expected) < 1e-5


def test_greedy_stops_at_eos_and_pads_finished_rows(setups):
    s = setups("llama")
    ids, mask = pad_rows(s.rows, "left")
    free_run = s.bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS, max_new_tokens=NEW_TOKENS,
                               eos_token_id=[])
    new = free_run[:, ids.shape[1]:]
    eos = int(new[2, 1])  # row 2's second token ends it; other rows end wherever they produce it too
    pad = 1
    stopped = s.bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS, max_new_tokens=NEW_TOKENS,
                              eos_token_id=eos, pad_token_id=pad)
    expected = new.clone()
    ends = []
    for b in range(len(s.rows)):
        hits = (new[b] == eos).nonzero().flatten().tolist()
        end = hits[0] + 1 if hits else NEW_TOKENS
        expected[b, end:] = pad
        ends.append(end)
    assert torch.equal(stopped[:, ids.shape[1]:], expected[:, :max(ends)])


def test_sampling_is_seeded_and_degenerates_to_greedy(setups):
    s = setups("llama")
    ids, mask = pad_rows(s.rows[:4], "left")
    kwargs = dict(attention_mask=mask, adapters=ROW_ADAPTERS[:4], max_new_tokens=2, eos_token_id=[])
    greedy = s.bank.generate(ids, **kwargs)
    for sampling in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-4)):
        sampled = s.bank.generate(ids, do_sample=True, generator=torch.Generator().manual_seed(0), **sampling,
                                  **kwargs)
        assert torch.equal(sampled, greedy), sampling
    first = s.bank.generate(ids, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(3), **kwargs)
    again = s.bank.generate(ids, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="top_p"):
        s.bank.generate(ids, do_sample=True, top_p=1.5, **kwargs)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.7, top_p=0.8)])
def test_sampling_draws_what_peft_draws_for_the_same_seed(setups, sampling):
    """One row at a time (so both consume the global RNG alike): the bank samples from the same distribution as
    sampling PEFT's forward with transformers' own warpers and defaults (top_k=50) where arguments are left out, so
    the draws coincide."""
    s = setups("llama")
    settings = dict(dict(temperature=1.0, top_k=50, top_p=1.0), **sampling)
    for b in (0, 3, 4):  # prefix, prompt tuning, p-tuning
        name, row = ROW_ADAPTERS[b], s.rows[b].unsqueeze(0)
        torch.manual_seed(1234 + b)
        expected, _ = generate_without_cache(s.peft_models[name], row, max_new_tokens=4, do_sample=True,
                                             eos_token_id=s.peft_models[name].generation_config.eos_token_id,
                                             **settings)
        torch.manual_seed(1234 + b)
        sampled = s.bank.generate(row, adapters=[name], max_new_tokens=4, do_sample=True, **sampling)
        assert torch.equal(sampled, expected), (name, sampled.tolist(), expected.tolist())


def _row_alone(s, b, generated_row, prompt_width):
    """Row b of a padded batch as PEFT sees it alone: its real prompt tokens followed by the tokens generated for it
    (``generated_row [prompt_width + n]``), and its model (PEFT model, or the base model for no adapter)."""
    name = ROW_ADAPTERS[b]
    model = s.base if name is None else s.peft_models[name.replace("-dir", "")]
    return model, torch.cat([s.rows[b], generated_row[prompt_width:]]).unsqueeze(0)


def test_beam_search_per_row_adapters_scores_match_peft_forward(setups):
    """transformers' beam search through the bank: each returned beam's per-token log-probabilities equal PEFT's
    forward on that beam's tokens for that row alone with its adapter, and each row's best beam scores at least as
    high as its greedy continuation (PEFT's forward loop)."""
    from fastpeft.integration.reference_generate import teacher_forced_logits

    s = setups("llama")
    rows = [0, 2, 3, 4, 1]  # prefix, projection prefix, prompt tuning, p-tuning, no adapter
    ids, mask = pad_rows([s.rows[b] for b in rows], "left")
    returned = 2
    out = s.bank.generate(ids, attention_mask=mask, adapters=[ROW_ADAPTERS[b] for b in rows], max_new_tokens=3,
                          num_beams=3, num_return_sequences=returned, length_penalty=0.0, eos_token_id=[],
                          return_dict_in_generate=True, output_scores=True)
    transition = s.bank.model.compute_transition_scores(out.sequences, out.scores, out.beam_indices,
                                                        normalize_logits=False)
    assert out.sequences.shape == (len(rows) * returned, ids.shape[1] + 3)
    for i, sequence in enumerate(out.sequences):
        b = rows[i // returned]
        model, alone = _row_alone(s, b, sequence, ids.shape[1])
        prompt_length = len(s.rows[b])
        forced = teacher_forced_logits(model, alone, torch.ones(1, prompt_length, dtype=torch.long), prompt_length)
        log_probs = forced[:, 0].log_softmax(-1).gather(-1, alone[0, prompt_length:, None]).squeeze(-1)
        assert relative_error(transition[i], log_probs) < 1e-5, f"beam {i} of row {b} ({ROW_ADAPTERS[b]!r})"
        if i % returned == 0:
            greedy_tokens = s.references[b][1][:3]
            greedy_forced = teacher_forced_logits(
                model, torch.cat([s.rows[b], greedy_tokens]).unsqueeze(0),
                torch.ones(1, prompt_length, dtype=torch.long), prompt_length)
            greedy_score = greedy_forced[:, 0].log_softmax(-1).gather(-1, greedy_tokens[:, None]).sum()
            assert log_probs.sum() >= greedy_score - 1e-4, f"row {b}: best beam below greedy"


def test_logits_processors_and_streamer_per_row_adapters(setups):
    """Repetition penalty and n-gram blocking from transformers' own processors, per row with its adapter, equal a
    loop over PEFT's forward for that row alone with the same processors; a streamer receives the prompt, then each
    new token as it is picked. The pad id is suppressed: whether a left-padded row's pad ids count as context for the
    repetition penalty differs between transformers releases (5.17 penalizes them, 5.24 does not)."""
    from transformers import (LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                              SuppressTokensLogitsProcessor)
    from transformers.generation.streamers import BaseStreamer

    s = setups("llama")
    new_tokens = 5
    ids, mask = pad_rows(s.rows[:5], "left")
    generated = s.bank.generate(ids, attention_mask=mask, adapters=ROW_ADAPTERS[:5], max_new_tokens=new_tokens,
                                repetition_penalty=1.5, no_repeat_ngram_size=2, suppress_tokens=[0], eos_token_id=[])
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5), NoRepeatNGramLogitsProcessor(2),
                                      SuppressTokensLogitsProcessor([0])])
    for b in range(5):
        model, sequence = _row_alone(s, b, ids[b, :0], 0)
        with torch.no_grad():
            for _ in range(new_tokens):
                logits = model(input_ids=sequence).logits[:, -1].float()
                token = processors(sequence, logits).argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, token], 1)
        assert torch.equal(generated[b, ids.shape[1]:], sequence[0, len(s.rows[b]):]), f"row {b}"

    class Collect(BaseStreamer):
        def __init__(self):
            self.pieces = []

        def put(self, value):
            self.pieces.append(value.flatten().tolist())

        def end(self):
            self.pieces.append("end")

    streamer = Collect()
    row = s.rows[3].unsqueeze(0)  # prompt tuning (transformers' streamers take one row)
    tokens = s.bank.generate(row, adapters=["prompt"], max_new_tokens=3, eos_token_id=[], streamer=streamer)
    assert streamer.pieces == [row[0].tolist(), *[[t] for t in tokens[0, -3:].tolist()], "end"]
    assert torch.equal(tokens[0, -3:], s.references[3][1][:3])


# ----- adapter management and errors ------------------------------------------------------------------------------


def test_loader_splits_a_prefix_like_peft(setups):
    """``fastpeft.adapters`` on a saved projection prefix gives, per layer, exactly the K/V PEFT puts in its cache."""
    s = setups("llama")
    adapter = load_prompt_adapter(s.dirs["prefix-proj"])
    assert adapter.peft_type == "PREFIX_TUNING" and adapter.num_virtual_tokens == 5
    keys, values = prefix_key_values(adapter, BaseGeometry.of(s.base.config))
    with torch.no_grad():
        cache = s.peft_models["prefix-proj"].get_prompt(batch_size=1)
    assert len(keys) == len(values) == len(cache.layers) == 2
    for layer, (k, v) in enumerate(zip(keys, values)):
        assert k.shape == (2, 5, 32)  # [Hkv, P, head_dim]
        torch.testing.assert_close(k, cache.layers[layer].keys[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v, cache.layers[layer].values[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["prefix-proj", "p-tuning"])
def test_peft_models_loaded_for_inference_are_served(setups, kind):
    """``PeftModel.from_pretrained`` keeps only the saved encoder output (a projection prefix has no MLP left, and
    PEFT's own get_prompt_embedding_to_save then fails): the bank serves it exactly like the adapter directory."""
    from peft import PeftModel

    s = setups("llama")
    loaded = PeftModel.from_pretrained(tiny_model("llama"), s.dirs[kind]).eval()
    ids, mask = pad_rows(s.rows[:3], "left")
    s.bank.add("loaded", loaded)
    s.bank.add("from-dir", s.dirs[kind])
    try:
        from_model = s.bank(ids, attention_mask=mask, adapters=["loaded"] * 3).logits
        from_dir = s.bank(ids, attention_mask=mask, adapters=["from-dir"] * 3).logits
    finally:
        s.bank.remove("loaded")
        s.bank.remove("from-dir")
    torch.testing.assert_close(from_model, from_dir, rtol=0, atol=0)
    row = s.rows[0]
    reference_logits, _ = peft_reference(loaded, row, 1)
    assert relative_error(from_model[0][mask[0].bool()], reference_logits) < 1e-5


def test_unknown_and_removed_names_raise_key_error(setups):
    s = setups("llama")
    ids, mask = pad_rows(s.rows[:3], "left")
    with pytest.raises(KeyError, match="'nope'.*'other'|'other'.*'nope'"):
        s.bank(ids, attention_mask=mask, adapters=["prefix", "nope", "other"])
    with pytest.raises(KeyError, match="nope"):
        s.bank.generate(ids, attention_mask=mask, adapters=["nope", None, None], max_new_tokens=1)
    with pytest.raises(ValueError, match="3 rows|rows"):
        s.bank(ids, attention_mask=mask, adapters=["prefix"])

    bank = AdapterBank(tiny_model("llama"))
    bank.add("temp", s.dirs["prompt"])
    bank(ids, attention_mask=mask, adapters=["temp", None, "temp"])
    bank.remove("temp")
    with pytest.raises(KeyError, match="temp"):
        bank(ids, attention_mask=mask, adapters=["temp", None, None])
    with pytest.raises(KeyError, match="temp"):
        bank.remove("temp")
    bank.close()


def test_duplicate_name_is_refused_and_leaves_the_bank_unchanged(setups):
    s = setups("llama")
    bank = AdapterBank(tiny_model("llama"))
    bank.add("a", s.dirs["prefix"])
    before = bank.storage_bytes
    with pytest.raises(ValueError, match="already holds an adapter named 'a'"):
        bank.add("a", s.dirs["prompt"])
    assert bank.names == ["a"] and bank.storage_bytes == before and bank.num_virtual_tokens("a") == 3
    bank.close()


def _save_prompt_adapter(model, kind, path):
    make_peft_model(lambda: model, kind, seed=5).save_pretrained(path)
    return path


@pytest.mark.parametrize("overrides,kind,message", [
    (dict(layers=3), "prefix", "layers: adapter 3, base model 2"),
    (dict(kv_heads=4), "prefix", "KV heads: adapter 4, base model 2"),
    (dict(hidden=192, heads=4, kv_heads=2), "prefix", "head size: adapter 48, base model 32"),
    (dict(hidden=192, heads=4, kv_heads=2), "prompt", "hidden size: adapter 192, base model 128"),
    (dict(heads=8, kv_heads=2), "p-tuning", "attention heads: adapter 8, base model 4"),
])
def test_foreign_adapter_is_refused(tmp_path, overrides, kind, message):
    path = _save_prompt_adapter(tiny_model("llama", **overrides), kind, str(tmp_path / "foreign"))
    bank = AdapterBank(tiny_model("llama"))
    with pytest.raises(ValueError, match=message):
        bank.add("foreign", path)
    assert len(bank) == 0
    bank.close()


def test_wrong_task_and_non_prompt_learning_adapters_are_refused(setups, tmp_path):
    s = setups("llama")
    bank = AdapterBank(tiny_model("llama"))
    edited = str(tmp_path / "seq-cls")
    shutil.copytree(s.dirs["prefix"], edited)
    config_path = os.path.join(edited, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["task_type"] = "SEQ_CLS"
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="task_type 'SEQ_CLS'"):
        bank.add("seq-cls", edited)

    import peft

    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="peft_type 'LORA' is not prompt learning"):
        bank.add("lora", lora)
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="peft_type 'LORA' is not prompt learning"):
        bank.add("lora", str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="not a PeftModel|base transformers model"):
        AdapterBank(lora)
    bank.close()


def test_pickle_checkpoint_needs_allow_pickle(setups, tmp_path):
    s = setups("llama")
    pickled = str(tmp_path / "pickled")
    s.peft_models["prompt"].save_pretrained(pickled, safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(pickled) and "adapter_model.safetensors" not in os.listdir(pickled)
    bank = AdapterBank(tiny_model("llama"))
    with pytest.raises(ValueError, match="adapter_model.bin.*allow_pickle=True"):
        bank.add("pickled", pickled)
    assert len(bank) == 0
    bank.add("pickled", pickled, allow_pickle=True)
    bank.add("safe", s.dirs["prompt"])
    ids, mask = pad_rows(s.rows[:2], "left")
    from_pickle = bank(ids, attention_mask=mask, adapters=["pickled", "pickled"]).logits
    from_safetensors = bank(ids, attention_mask=mask, adapters=["safe", "safe"]).logits
    assert torch.equal(from_pickle, from_safetensors)
    bank.close()


@pytest.mark.parametrize("damage", ["truncated-safetensors", "garbage-safetensors", "bad-config", "truncated-pickle"])
def test_damaged_adapter_files_are_named(setups, tmp_path, damage):
    """A damaged adapter file gives a ValueError that names the file, and the bank stays unchanged."""
    s = setups("llama")
    damaged = tmp_path / "damaged"
    shutil.copytree(s.dirs["prompt"], damaged)
    weights, config = damaged / "adapter_model.safetensors", damaged / "adapter_config.json"
    if damage == "truncated-safetensors":
        weights.write_bytes(weights.read_bytes()[:100])
        broken = weights
    elif damage == "garbage-safetensors":
        weights.write_bytes(b"\x00" * 64)
        broken = weights
    elif damage == "bad-config":
        config.write_text(config.read_text()[:-20])
        broken = config
    else:
        s.peft_models["prompt"].save_pretrained(str(damaged), safe_serialization=False)
        weights.unlink()
        broken = damaged / "adapter_model.bin"
        broken.write_bytes(broken.read_bytes()[:200])
    size = len(s.bank)
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        s.bank.add("damaged", str(damaged), allow_pickle=True)
    assert len(s.bank) == size and "damaged" not in s.bank


def test_remove_and_re_add_reuse_slots_and_growth_keeps_adapters(setups):
    s = setups("llama")
    ids, mask = pad_rows(s.rows[:4], "left")
    kinds = ["prefix", "prompt", "prefix-proj", "p-tuning"]
    bank = AdapterBank(tiny_model("llama"), initial_capacity=2)
    bank.add("prefix", s.dirs["prefix"])
    bank.add("prompt", s.dirs["prompt"])
    assert bank.capacity == 2
    before_growth = bank(ids, attention_mask=mask, adapters=["prefix", "prompt", None, "prefix"]).logits
    bank.add("prefix-proj", s.peft_models["prefix-proj"])  # grows T (doubling) and P_max
    bank.add("p-tuning", s.peft_models["p-tuning"])
    assert bank.capacity == 5
    after_growth = bank(ids, attention_mask=mask, adapters=["prefix", "prompt", None, "prefix"]).logits
    assert torch.equal(before_growth, after_growth)

    slots = {name: bank.slot_of(name) for name in kinds}
    assert sorted(slots.values()) == [1, 2, 3, 4]
    storage = bank.storage_bytes
    bank.remove("prompt")
    bank.remove("prefix")
    bank.add("prompt-again", s.dirs["prompt"])  # the lowest freed entry
    bank.add("prefix-again", s.dirs["prefix"])
    assert bank.slot_of("prompt-again") == min(slots["prefix"], slots["prompt"])
    assert bank.slot_of("prefix-again") == max(slots["prefix"], slots["prompt"])
    assert bank.storage_bytes == storage and bank.capacity == 5

    # A shorter adapter in an entry that held a longer one, next to every other kind: still PEFT's numbers.
    adapters = ["prefix-again", "prompt-again", "prefix-proj", "p-tuning"]
    logits = bank(ids, attention_mask=mask, adapters=adapters).logits
    for b, kind in enumerate(kinds):
        model = s.peft_models[kind]
        with torch.no_grad():
            expected = model(input_ids=s.rows[b].unsqueeze(0)).logits[0, -len(s.rows[b]):]
        assert relative_error(logits[b][mask[b].bool()], expected) < 1e-5, kind
    bank.close()


def test_close_restores_the_base_model(setups):
    model = tiny_model("llama", attn_implementation="sdpa").train()
    ids, mask = pad_rows(setups("llama").rows[:3], "left")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    with AdapterBank(model) as bank:
        assert model.config._attn_implementation == "fastpeft" and not model.training
        bank.add("prefix", setups("llama").dirs["prefix"])
        with torch.no_grad():  # used directly meanwhile, the model computes what it computed before
            during = model(input_ids=ids, attention_mask=mask).logits
        assert relative_error(during[mask.bool()], before[mask.bool()]) < 1e-5
    assert model.config._attn_implementation == "sdpa" and model.training
    with pytest.raises(RuntimeError, match="closed"):
        bank(torch.ones(1, 2, dtype=torch.long), adapters=["prefix"])

    # A bank whose model was switched back underneath it refuses to serve (the prefix would be dropped silently).
    first, second = AdapterBank(model), AdapterBank(model)
    first.close()
    with pytest.raises(RuntimeError, match="changed to 'sdpa'"):
        second(torch.ones(1, 2, dtype=torch.long))
    second.close()

    model.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}
    with pytest.raises(ValueError, match="several devices"):
        AdapterBank(model)


def test_bad_inputs_are_refused(setups):
    s = setups("llama")
    ids, mask = pad_rows(s.rows[:2], "left")
    with pytest.raises(ValueError, match="input_ids"):
        s.bank(ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        s.bank(ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="only 0 and 1"):
        s.bank(ids, attention_mask=mask * 2)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        s.bank.generate(ids, attention_mask=empty, max_new_tokens=1)
    with pytest.raises(ValueError, match="not a string"):
        s.bank(ids, attention_mask=mask, adapters="prefix")


def _live_tensors():
    gc.collect()
    # type(), not isinstance(): isinstance consults __class__, which lazy and deprecated module proxies answer by
    # importing (slowly, with warnings).
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))


def test_serving_many_requests_does_not_grow_memory(setups):
    """200 mixed requests (batches of 8 through forward and generate, every adapter kind, left and right padding):
    the bank's storage stays the same and no tensor outlives its call (no per-request cache or prefix copy is kept)."""
    s = setups("llama")
    names = list(ROW_ADAPTERS)
    g = torch.Generator().manual_seed(11)
    batch = 8

    def serve(call):
        picks = torch.randint(0, len(names), (batch,), generator=g).tolist()
        ids, mask = pad_rows([s.rows[p] for p in picks], "right" if call % 3 == 0 else "left")
        adapters = [names[p] for p in picks]
        if call % 2:
            s.bank(ids, attention_mask=mask, adapters=adapters)
        else:
            s.bank.generate(ids, attention_mask=mask, adapters=adapters, max_new_tokens=2, eos_token_id=[])

    for call in range(4):  # warm-up: lazily created state (warning registries, transformers' caches) settles
        serve(call)
    storage, live = s.bank.storage_bytes, _live_tensors()
    for call in range(4, 200 // batch):
        serve(call)
    assert s.bank.storage_bytes == storage
    assert _live_tensors() == live


def test_refuses_unsupported_family():
    """A soft-capped Gemma 2 would be served with logits off by soft-capping: refused at construction, and the model
    keeps its attention implementation."""
    from tests.accelerate_helpers import tiny_softcapped_gemma2

    model = tiny_softcapped_gemma2()
    previous = model.config._attn_implementation
    with pytest.raises(ValueError, match="gemma2"):
        AdapterBank(model)
    assert model.config._attn_implementation == previous
