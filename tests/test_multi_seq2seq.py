"""MultiPrefixTrainer / MultiPrefixModel on encoder-decoders (T5, MT5, BART) against plain PEFT, tenant by tenant.

Four tenants, one of each kind PEFT's ``PeftModelForSeq2SeqLM`` trains (prefix tuning with and without projection,
prompt tuning, p-tuning), each with its own number of virtual tokens, share every batch; encoder rows are padded on
either side, the decoder's labels right-padded with -100 (some rows with unlabelled targets). Each tenant must get
what PEFT gives it on its own rows alone (a PeftModel with the same config and initial values, fed that tenant's rows
unpadded, i.e. right-padded as ``fastpeft.data.collate`` pads): the same loss and logits, the same gradients, after
three optimizer steps the same parameters (a tenant absent from a step untouched), and saved adapters that PEFT loads and
runs to the same logits.

What would change the numbers if it were wrong: a prompt row's virtual tokens in front of its own real tokens in the
bidirectional encoder (its own count, whichever side it was padded on), a prefix row's decoder reading PEFT's layer
``2i mod num_layers`` with positions after its own P (BART's per-row position embedding, T5's relative bias), the loss
normalised per tenant, the gradient reaching each tenant from its rows only.

Tolerance. float32 rounding on these tiny random models is itself of the order of 1e-5 (PEFT's own float32 gradient of
a p-tuning MLP on MT5 lies 5e-5 from its float64 gradient). Gradients and parameters are therefore held to relative
1e-5 of PEFT's float64 run (updates 1e-4), or, where float32 moves PEFT's own result further than that from its float64
run, to four times that distance (a tolerance that scales with the truth, STYLE.md).
"""

import copy
import json
import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

from fastpeft.data import IGNORE_INDEX  # noqa: E402
from fastpeft.multi import MultiPrefixModel, MultiPrefixTrainer  # noqa: E402
from fastpeft.multi_seq2seq import EncoderDecoderMultiPrefixModel  # noqa: E402
from tests.bank_fixtures import relative_error  # noqa: E402
from tests.reference import assert_close  # noqa: E402
from tests.test_bank_seq2seq import ADAPTER_KINDS, VOCAB, tiny_seq2seq  # noqa: E402

FAMILIES = ("t5", "mt5", "bart")
LR, MOMENTUM, WEIGHT_DECAY = 1e-2, 0.9, 0.1  # weight decay on, so that a stepped idle tenant would drift


def optimizer(parameters):
    """SGD with momentum and weight decay: stateful like AdamW, but without AdamW's division of every element by its
    own gradient scale, which turns float32 rounding in the smallest gradients into update differences far above it
    (PEFT's own AdamW run in float32 ends up to 1.5e-2 away from its float64 run after three steps here)."""
    return torch.optim.SGD(parameters, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
TENANTS = tuple(ADAPTER_KINDS)  # prefix (P=3), prefix-proj (P=5), prompt (P=4), p-tuning (P=6)


def make_batch(seed, tenants, lengths, target_lengths, left_pad=(), unlabelled=()):
    """A mixed batch as rows: encoder ids (unpadded), decoder targets (unpadded, -100 for rows in ``unlabelled`` and
    on the first target of row 0). ``left_pad``: rows padded on the left in the mixed batch."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
    targets = [torch.randint(3, VOCAB, (n,), generator=g) for n in target_lengths]
    targets[0][0] = IGNORE_INDEX
    for b in unlabelled:
        targets[b][:] = IGNORE_INDEX
    return {"tenants": list(tenants), "rows": rows, "targets": targets, "left_pad": set(left_pad)}


# Three steps. Step 1 has no labelled token of "p-tuning" (a row whose targets are all -100), so it must not move;
# steps 1 and 3 have left-padded encoder rows; "prefix" has two rows in most steps.
BATCHES = [
    make_batch(1, ["prefix", "prompt", "p-tuning", "prefix-proj", "prefix", "prompt"], [5, 3, 6, 4, 2, 7],
               [3, 4, 2, 5, 3, 1], left_pad=[1, 4]),
    make_batch(2, ["prompt", "prefix-proj", "p-tuning", "prefix", "prefix-proj"], [4, 6, 3, 5, 2], [2, 3, 4, 1, 5],
               unlabelled=[2]),
    make_batch(3, ["p-tuning", "prefix", "prompt", "prefix-proj", "p-tuning", "prefix"], [7, 2, 5, 3, 4, 6],
               [4, 2, 3, 3, 5, 2], left_pad=[0, 2, 5]),
]


def padded(batch, keep=None, respect_sides=True):
    """``input_ids``, ``attention_mask``, ``labels`` of the rows ``keep`` (default all): encoder rows padded with 0 on
    the side the batch says (or all on the right), targets right-padded with -100."""
    keep = range(len(batch["rows"])) if keep is None else keep
    rows = [batch["rows"][b] for b in keep]
    targets = [batch["targets"][b] for b in keep]
    width, target_width = max(len(r) for r in rows), max(len(t) for t in targets)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), target_width), IGNORE_INDEX)
    for i, (b, row, target) in enumerate(zip(keep, rows, targets)):
        left = respect_sides and b in batch["left_pad"]
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
        labels[i, :len(target)] = target
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tenant_rows(batch, name):
    return [b for b, tenant in enumerate(batch["tenants"]) if tenant == name]


def has_labels(batch, name):
    return any(bool((batch["targets"][b] != IGNORE_INDEX).any()) for b in tenant_rows(batch, name))


def assert_equal_to_peft(actual, expected, expected64, floor, name):
    """``actual`` (ours, float32) equals PEFT's result: within relative ``floor`` of PEFT's float64 result
    ``expected64``, or, where float32 rounding puts PEFT's own float32 result ``expected`` further from it, within four
    times that distance."""
    peft_noise = relative_error(expected.double(), expected64.double())
    assert_close(actual, expected64, max(floor, 4 * peft_noise),
                 name=f"{name} (PEFT's own float32 error {peft_noise:.1e})")


def peft_models(family):
    """One PEFT model per tenant on its own copy of the backbone, its prompt parameters drawn from a seed, in train
    mode (dropout is off in these configs)."""
    models = {}
    for i, name in enumerate(TENANTS):
        base = tiny_seq2seq(family)  # which seeds the generator itself
        torch.manual_seed(100 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[name] = peft.get_peft_model(base, ADAPTER_KINDS[name](peft))
        models[name].train()
    return models


def grads(module):
    return {k: p.grad.detach().clone() for k, p in module.named_parameters() if p.grad is not None}


def params(module):
    return {k: p.detach().clone() for k, p in module.named_parameters()}


def peft_step_gradients(model, batch, name):
    """PEFT's loss, logits and prompt-encoder gradients for tenant ``name``'s rows of ``batch``, unpadded (right
    padding), in the model's dtype."""
    model.zero_grad()
    out = model(**padded(batch, tenant_rows(batch, name), respect_sides=False))
    out.loss.backward()
    result = out.loss.item(), out.logits.detach(), grads(model.prompt_encoder["default"])
    model.zero_grad()
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = _run(family, tmp_path_factory.mktemp(family))
        return cache[family]

    return get


def _run(family, directory):
    """Run the three steps both ways (and PEFT's first step in float64 too); keep what the tests compare."""
    references = peft_models(family)
    trainer = MultiPrefixTrainer(tiny_seq2seq(family), optimizer_factory=optimizer)
    for name, model in references.items():
        trainer.add_adapter(name, model)
    initial = {name: params(trainer.encoder(name)) for name in TENANTS}

    first = BATCHES[0]
    peft_first = {name: peft_step_gradients(references[name], first, name) for name in TENANTS}
    references64 = {name: copy.deepcopy(model).double() for name, model in references.items()}
    peft_first64 = {name: peft_step_gradients(references64[name], first, name) for name in TENANTS}

    # PEFT, one tenant at a time, on its own rows, stepped only when they carry labels (in float64 too).
    for name, model in [*references.items(), *references64.items()]:
        peft_optimizer = optimizer(model.prompt_encoder.parameters())
        for batch in BATCHES:
            if not has_labels(batch, name):
                continue
            peft_optimizer.zero_grad()
            model(**padded(batch, tenant_rows(batch, name), respect_sides=False)).loss.backward()
            peft_optimizer.step()

    # The trainer: loss, logits and gradients of the first batch, then the three training steps.
    trainer.model.train()
    inputs = padded(first)
    out = trainer(inputs["input_ids"], first["tenants"], attention_mask=inputs["attention_mask"],
                  labels=inputs["labels"])
    out.loss.backward()
    multi_grads = {name: grads(trainer.encoder(name)) for name in TENANTS}
    trainer.zero_grad()
    results, snapshots = [], []
    for batch in BATCHES:
        snapshots.append({name: params(trainer.encoder(name)) for name in TENANTS})
        inputs = padded(batch)
        results.append(trainer.training_step(inputs["input_ids"], batch["tenants"],
                                             attention_mask=inputs["attention_mask"], labels=inputs["labels"]))
    snapshots.append({name: params(trainer.encoder(name)) for name in TENANTS})
    return dict(family=family, trainer=trainer, references=references, references64=references64, initial=initial,
                peft_first=peft_first,
                peft_first64=peft_first64, multi_first=out, multi_grads=multi_grads, results=results,
                snapshots=snapshots, directory=directory)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_logits_equal_peft_per_tenant(runs, family):
    run = runs(family)
    trainer = run["trainer"]
    assert isinstance(trainer.prefix_model, EncoderDecoderMultiPrefixModel)
    out = run["multi_first"]
    first = BATCHES[0]
    assert out.logits.shape == (len(first["rows"]), max(len(t) for t in first["targets"]), VOCAB)
    for name in TENANTS:
        loss, logits, _ = run["peft_first"][name]
        assert out.adapter_losses[name] == pytest.approx(loss, rel=1e-5), name
        for i, b in enumerate(tenant_rows(first, name)):
            T = len(first["targets"][b])
            err = relative_error(out.logits[b, :T], logits[i, :T])
            assert err < 1e-5, f"{family}: row {b} ({name}, left-padded: {b in first['left_pad']}) logits {err:.2e}"
    # The combined loss is the sum of the per-tenant means.
    assert out.loss.item() == pytest.approx(sum(run["peft_first"][n][0] for n in TENANTS), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_peft_per_tenant(runs, family):
    run = runs(family)
    for name in TENANTS:
        expected, expected64 = run["peft_first"][name][2], run["peft_first64"][name][2]
        actual = run["multi_grads"][name]
        assert actual.keys() == expected.keys(), name
        for key in expected:
            assert float(expected[key].norm()) > 0
            assert_equal_to_peft(actual[key], expected[key], expected64[key], 1e-5, f"{family} {name}.{key}.grad")


@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_after_training_equal_peft(runs, family):
    run = runs(family)
    for name, model in run["references"].items():
        expected = params(model.prompt_encoder["default"])
        expected64 = params(run["references64"][name].prompt_encoder["default"])
        actual = params(run["trainer"].encoder(name))
        for key in expected:
            assert_equal_to_peft(actual[key], expected[key], expected64[key], 1e-5, f"{family} {name}.{key}")
            # The update itself, not only the parameter (which is dominated by its initial value).
            initial = run["initial"][name][key]
            assert float((expected[key] - initial).norm()) > 0
            assert_equal_to_peft(actual[key] - initial, expected[key] - initial, expected64[key] - initial.double(),
                                 1e-4, f"{family} {name}.{key} update")


def test_tenant_without_labelled_rows_is_untouched(runs):
    run = runs("t5")
    trainer = run["trainer"]
    assert run["results"][1]["updated"] == ["prefix", "prefix-proj", "prompt"]
    assert "p-tuning" not in run["results"][1]["adapter_losses"]
    before, after = run["snapshots"][1]["p-tuning"], run["snapshots"][2]["p-tuning"]
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert trainer.updates("p-tuning") == 2 and trainer.updates("prefix") == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_adapters_load_in_peft_with_the_trainers_logits(runs, family):
    run = runs(family)
    trainer, root = run["trainer"], run["directory"]
    trainer.save_pretrained(root / "multi")
    batch = BATCHES[2]
    inputs = padded(batch)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer(inputs["input_ids"], batch["tenants"], attention_mask=inputs["attention_mask"],
                         labels=inputs["labels"]).logits
    for name, reference in run["references"].items():
        ours = root / "multi" / name
        assert sorted(os.listdir(ours)) == ["adapter_config.json", "adapter_model.safetensors"]
        # The files PEFT writes for the same adapter trained by PEFT.
        reference.save_pretrained(root / "peft" / name)
        with open(ours / "adapter_config.json") as a, open(root / "peft" / name / "adapter_config.json") as b:
            assert json.load(a) == json.load(b)
        from safetensors.torch import load_file

        mine, theirs = load_file(ours / "adapter_model.safetensors"), load_file(
            root / "peft" / name / "adapter_model.safetensors")
        assert mine.keys() == theirs.keys() == {"prompt_embeddings"}
        assert mine["prompt_embeddings"].dtype == torch.float32
        theirs64 = run["references64"][name].get_prompt_embedding_to_save("default")
        assert_equal_to_peft(mine["prompt_embeddings"], theirs["prompt_embeddings"], theirs64, 1e-5,
                             f"{family} {name} saved")

        # Loaded in plain PEFT, the adapter gives the trainer's logits for its rows (alone, unpadded).
        loaded = PeftModel.from_pretrained(tiny_seq2seq(family), str(ours)).eval()
        keep = tenant_rows(batch, name)
        with torch.no_grad():
            peft_logits = loaded(**padded(batch, keep, respect_sides=False)).logits
        for i, b in enumerate(keep):
            T = len(batch["targets"][b])
            assert_close(logits[b, :T], peft_logits[i, :T], 1e-5, name=f"{family} {name} row {b} logits")


def one_step_losses_and_grads(trainer, peft_model, name, batch):
    """(ours, PEFT's) loss and gradients of ``name``'s rows of ``batch`` (the trainer's forward on the whole batch)."""
    inputs = padded(batch)
    trainer.model.train()
    out = trainer(inputs["input_ids"], batch["tenants"], attention_mask=inputs["attention_mask"],
                  labels=inputs["labels"])
    out.loss.backward()
    ours = out.adapter_losses[name], grads(trainer.encoder(name))
    trainer.zero_grad()
    loss, _, expected = peft_step_gradients(peft_model.train(), batch, name)
    return ours, (loss, expected)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_decoder_shallower_than_the_prefix_trains_layer_two_i_mod_num_layers(family):
    """A 3-layer encoder and a 2-layer decoder: decoder layer 1 reads (and trains) the adapter's layer 2, as PEFT's
    cache layout has it; the adapter's layer 1 gets no gradient in either."""
    shape = dict(encoder_layers=3, decoder_layers=2)
    base = tiny_seq2seq(family, **shape)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(base, ADAPTER_KINDS["prefix"](peft))
    trainer = MultiPrefixTrainer(tiny_seq2seq(family, **shape))
    trainer.add_adapter("prefix", reference)
    trainer.add_adapter("prompt", ADAPTER_KINDS["prompt"](peft))
    batch = make_batch(4, ["prefix", "prompt", "prefix"], [4, 6, 3], [3, 2, 4], left_pad=[2])
    (loss, actual), (expected_loss, expected) = one_step_losses_and_grads(trainer, reference, "prefix", batch)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert_close(actual["embedding.weight"], expected["embedding.weight"], 1e-5, name=f"{family} prefix grad")


@pytest.mark.parametrize("shape, message", [
    (dict(encoder_layers=2, decoder_layers=3), "decoder of BartForConditionalGeneration has 3 layers"),
    (dict(decoder_heads=8), "decoder of BartForConditionalGeneration has 8"),
])
def test_prefix_peft_cannot_run_on_the_decoder_is_refused_by_name(shape, message):
    """A decoder deeper than the prefix's num_layers (PEFT: IndexError) or with other heads (PEFT: a size mismatch) is
    refused by name as ``fastpeft.accelerate`` and ``AdapterBank`` refuse it, from a config or a PeftModel; prompt
    tuning, which never reaches the decoder, still trains there."""
    model = MultiPrefixModel(tiny_seq2seq("bart", **shape))
    with pytest.raises(ValueError, match=message):
        model.add_adapter("prefix", ADAPTER_KINDS["prefix"](peft))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(tiny_seq2seq("bart", **shape), ADAPTER_KINDS["prefix"](peft))
    with pytest.raises(ValueError, match=message):
        model.add_adapter("prefix", peft_model)
    assert model.adapters == []
    model.add_adapter("prompt", ADAPTER_KINDS["prompt"](peft))
    out = model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[8, 9]]), adapter_ids=[0])
    out.loss.backward()
    assert float(model.encoder("prompt").embedding.weight.grad.norm()) > 0


def test_layerdrop_backbone_refuses_prefix_tuning_by_name():
    import transformers

    config = transformers.BartConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     vocab_size=VOCAB, decoder_layerdrop=0.1)
    model = MultiPrefixModel(transformers.BartForConditionalGeneration(config))
    with pytest.raises(ValueError, match=r"LayerDrop \(config.decoder_layerdrop=0.1\)"):
        model.add_adapter("prefix", ADAPTER_KINDS["prefix"](peft))


def test_bad_inputs_raise_clear_errors(tmp_path):
    trainer = MultiPrefixTrainer(tiny_seq2seq("t5"))
    trainer.add_adapter("prompt", ADAPTER_KINDS["prompt"](peft))
    ids = torch.randint(3, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="task_type must be SEQ_2_SEQ_LM"):
        trainer.add_adapter("causal", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="LORA"):
        trainer.add_adapter("lora", peft.LoraConfig(task_type="SEQ_2_SEQ_LM"))
    from tests.models import tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        causal = peft.get_peft_model(tiny_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                   num_virtual_tokens=2))
    causal.save_pretrained(tmp_path / "causal")
    with pytest.raises(ValueError, match="task_type 'CAUSAL_LM' \\(expected 'SEQ_2_SEQ_LM'\\)"):
        trainer.add_adapter("causal", tmp_path / "causal")
    with pytest.raises(ValueError, match="labels are required"):
        trainer.training_step(ids, ["prompt", "prompt"])
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        trainer(ids, ["prompt", "prompt"], labels=torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        trainer(ids, ["prompt", "prompt"], labels=torch.ones(2, 2))
    with pytest.raises(ValueError, match="every row of attention_mask needs a real token"):
        trainer(ids, ["prompt", "prompt"], attention_mask=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]),
                labels=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(KeyError, match="nobody"):
        trainer(ids, ["prompt", "nobody"], labels=torch.ones(2, 2, dtype=torch.long))
    assert trainer.adapters == ["prompt"]


@pytest.mark.parametrize("name", TENANTS)
def test_new_adapter_is_initialised_like_get_peft_model(name):
    base = tiny_seq2seq("t5")  # which seeds the generator itself
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(base, ADAPTER_KINDS[name](peft))
    trainer = MultiPrefixTrainer(tiny_seq2seq("t5"))
    torch.manual_seed(7)
    trainer.add_adapter(name, ADAPTER_KINDS[name](peft))
    assert trainer.config(name).to_dict() == reference.peft_config["default"].to_dict()
    expected, actual = params(reference.prompt_encoder["default"]), params(trainer.encoder(name))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_train_over_records_pads_like_hand_built_steps():
    """``train`` collates encoder-decoder records (encoder ids and decoder targets of their own lengths, right-padded
    apart) into the steps one would build by hand."""
    batch = BATCHES[0]
    records = [{"task": tenant, "input_ids": row.tolist(), "labels": target.tolist()}
               for tenant, row, target in zip(batch["tenants"], batch["rows"], batch["targets"])]

    def fresh():
        trainer = MultiPrefixTrainer(tiny_seq2seq("bart"), lr=LR)
        for i, name in enumerate(TENANTS):
            torch.manual_seed(100 + i)
            trainer.add_adapter(name, ADAPTER_KINDS[name](peft))
        return trainer

    with pytest.raises(ValueError, match="needs labels"):
        fresh().train([{"task": "prompt", "input_ids": [5, 6]}])
    trainer = fresh()
    history = trainer.train(records, batch_size=4, shuffle=False)
    assert [r["step"] for r in history] == [1, 2]
    by_hand = fresh()
    for chunk in (range(0, 4), range(4, 6)):
        inputs = padded(batch, list(chunk), respect_sides=False)
        by_hand.training_step(inputs["input_ids"], [batch["tenants"][b] for b in chunk],
                              attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    for name in TENANTS:
        for key, value in params(by_hand.encoder(name)).items():
            assert torch.equal(params(trainer.encoder(name))[key], value), f"{name}.{key}"


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = BATCHES[2]
    inputs = padded(batch)
    results = []
    for checkpointing in (False, True):
        trainer = MultiPrefixTrainer(tiny_seq2seq("t5"), gradient_checkpointing=checkpointing)
        for i, name in enumerate(TENANTS):
            torch.manual_seed(100 + i)
            trainer.add_adapter(name, ADAPTER_KINDS[name](peft))
        trainer.model.train()
        trainer(inputs["input_ids"], batch["tenants"], attention_mask=inputs["attention_mask"],
                labels=inputs["labels"]).loss.backward()
        results.append({name: grads(trainer.encoder(name)) for name in TENANTS})
    for name in TENANTS:
        for key, expected in results[0][name].items():
            assert_close(results[1][name][key], expected, 1e-6, name=f"{name}.{key}")


def test_saved_adapters_continue_training_from_their_tables(runs, tmp_path):
    """A saved directory of each kind loads back as its saved table (a p-tuning head's or a projection's output, as
    PEFT loads it) and trains on."""
    source = runs("t5")["trainer"]
    trainer = MultiPrefixTrainer(tiny_seq2seq("t5"), lr=LR)
    for name in TENANTS:
        source.save_adapter(name, tmp_path / name)
        trainer.add_adapter(name, tmp_path / name)
        with torch.no_grad():
            saved = source.prefix_model.encoder(name)
            from fastpeft.multi import prompt_encoder_output

            table = prompt_encoder_output(saved, source.config(name))
        assert_close(trainer.encoder(name).embedding.weight, table, 1e-6, name=f"reloaded {name}")
    batch = BATCHES[0]
    inputs = padded(batch)
    before = {name: trainer.encoder(name).embedding.weight.detach().clone() for name in TENANTS}
    result = trainer.training_step(inputs["input_ids"], batch["tenants"], attention_mask=inputs["attention_mask"],
                                   labels=inputs["labels"])
    assert sorted(result["updated"]) == sorted(TENANTS)
    for name in TENANTS:
        assert not torch.equal(trainer.encoder(name).embedding.weight, before[name]), name


def _fresh_trainer(seed=0, family="t5"):
    """A MultiPrefixTrainer (per-tenant SGD) on ``family`` with the four tenants initialised from ``seed``."""
    trainer = MultiPrefixTrainer(tiny_seq2seq(family), optimizer_factory=optimizer)
    for i, name in enumerate(TENANTS):
        torch.manual_seed(seed * 100 + i)
        trainer.add_adapter(name, ADAPTER_KINDS[name](peft))
    trainer.model.train()
    return trainer


def test_transformers_trainer_trains_the_module_as_multi_prefix_trainer(tmp_path):
    """``transformers.Trainer`` drives the encoder-decoder ``MultiPrefixModel`` with ``AdapterBatchCollator``
    (encoder-decoder records): its steps (its "sgd": plain SGD over every tenant) equal ``MultiPrefixTrainer``'s
    per-tenant plain SGD on the same batch."""
    from transformers import Trainer, TrainingArguments

    from fastpeft.data import AdapterBatchCollator, collate

    batch = BATCHES[0]
    reference = _fresh_trainer()
    for name in TENANTS:
        reference.optimizer(name).param_groups[0].update(momentum=0.0, weight_decay=0.0)
    records = [{"adapter_ids": reference.prefix_model.adapter_id(tenant), "input_ids": row.tolist(),
                "labels": target.tolist()}
               for tenant, row, target in zip(batch["tenants"], batch["rows"], batch["targets"])]
    inputs = collate(records, pad_token_id=0, encoder_decoder=True)
    for _ in range(2):
        reference.training_step(inputs["input_ids"], batch["tenants"], attention_mask=inputs["attention_mask"],
                                labels=inputs["labels"])
    model = _fresh_trainer().prefix_model
    initial = {name: params(model.encoder(name)) for name in TENANTS}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(records), max_steps=2,
                             learning_rate=LR, optim="sgd", weight_decay=0.0, lr_scheduler_type="constant",
                             warmup_steps=0, max_grad_norm=0.0, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=records,
                data_collator=AdapterBatchCollator(model.adapters, pad_token_id=0, encoder_decoder=True)).train()
    for name in TENANTS:
        for key, expected in params(reference.encoder(name)).items():
            assert float((expected - initial[name][key]).norm()) > 0
            assert_close(params(model.encoder(name))[key] - initial[name][key], expected - initial[name][key], 1e-4,
                         name=f"Trainer {name}.{key} update")


def _ddp_run(trainer, rows):
    """Gradients of one forward/backward on ``rows`` of the first batch, then two training steps."""
    batch = BATCHES[0]
    inputs = padded(batch, rows)
    args = (inputs["input_ids"], [batch["tenants"][b] for b in rows])
    kwargs = dict(attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    out = trainer(*args, **kwargs)
    out.loss.backward()
    result = {"grads": {name: grads(trainer.encoder(name)) for name in TENANTS}, "counts": out.token_counts}
    trainer.zero_grad()
    result["steps"] = [trainer.training_step(*args, **kwargs) for _ in range(2)]
    result["params"] = {name: params(trainer.encoder(name)) for name in TENANTS}
    return result


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Rank 1 starts from other values: DDP must broadcast rank 0's adapters.
        result = _ddp_run(_fresh_trainer(seed=rank), [0, 1, 2] if rank == 0 else [3, 4, 5])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes: 30 s on the shared 2-core machine under load 8
def test_ddp_two_processes_equal_one_process(tmp_path):
    """Rank 0 holds the first three rows (prefix, prompt, p-tuning: the longest prompt), rank 1 the others
    (prefix-proj, prefix, prompt): each tenant's gradients and steps equal one process holding all six."""
    from tests.distributed import run_workers

    run_workers(_ddp_worker, (2, str(tmp_path / "rendezvous"), str(tmp_path)), init_file=str(tmp_path / "rendezvous"))
    single = _ddp_run(_fresh_trainer(seed=0), list(range(6)))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["counts"] == single["counts"]
        for name, expected in single["grads"].items():
            for key, value in expected.items():
                assert_close(result["grads"][name][key], value, 1e-5, name=f"rank {rank} {name}.{key}.grad")
        for got, want in zip(result["steps"], single["steps"]):
            assert sorted(got["updated"]) == sorted(want["updated"]) == sorted(TENANTS)
            assert got["adapter_losses"] == pytest.approx(want["adapter_losses"], rel=1e-5)
        for name, expected in single["params"].items():
            for key, value in expected.items():
                assert_close(result["params"][name][key], value, 1e-5, name=f"rank {rank} {name}.{key}")


@pytest.mark.parametrize("family, how", [("bart", "bf16 backbone"), ("t5", "bf16 autocast")])
def test_bf16_trains_with_fp32_adapters(family, how):
    """A bf16 backbone, or torch.autocast over a float32 one: adapter parameters, their gradients and optimizer
    states stay float32 (prompts enter the encoder in its dtype, prefixes the decoder in the compute dtype). The
    gradients stay as near float32's as PEFT's own in the same precision (which lie 10-20% from float32's on these
    tiny random models): within twice PEFT's distance, or 5e-2."""
    batch = BATCHES[2]
    inputs = padded(batch)
    dtype = torch.bfloat16 if how == "bf16 backbone" else torch.float32
    runs = []
    for low in (False, True):
        trainer = MultiPrefixTrainer(tiny_seq2seq(family).to(dtype if low else torch.float32),
                                     optimizer_factory=optimizer,
                                     mixed_precision="bf16" if low and how == "bf16 autocast" else None)
        for i, name in enumerate(TENANTS):
            torch.manual_seed(100 + i)
            trainer.add_adapter(name, ADAPTER_KINDS[name](peft))
        trainer.model.train()
        out = trainer(inputs["input_ids"], batch["tenants"], attention_mask=inputs["attention_mask"],
                      labels=inputs["labels"])
        out.loss.backward()
        runs.append(trainer)
    assert out.logits.dtype == torch.bfloat16
    full, low = runs
    for i, name in enumerate(TENANTS):
        # PEFT in the same precision, from the same initial values (get_peft_model's, as add_adapter's).
        base = tiny_seq2seq(family).to(dtype)
        torch.manual_seed(100 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = peft.get_peft_model(base, ADAPTER_KINDS[name](peft)).train()
        reference.prompt_encoder.float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "bf16 autocast"):
            peft_grads = peft_step_gradients(reference, batch, name)[2]
        for key, p in low.encoder(name).named_parameters():
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            expected = dict(full.encoder(name).named_parameters())[key].grad
            peft_error = relative_error(peft_grads[key].double(), expected.double())
            assert_close(p.grad, expected, max(5e-2, 2 * peft_error),
                         name=f"{family} {how} {name}.{key} (PEFT's own error {peft_error:.1e})")
    low.zero_grad()
    result = low.training_step(inputs["input_ids"], batch["tenants"], attention_mask=inputs["attention_mask"],
                               labels=inputs["labels"])
    assert sorted(result["updated"]) == sorted(TENANTS)
    for name in TENANTS:
        for p in low.encoder(name).parameters():
            assert p.dtype == torch.float32 and low.optimizer(name).state[p]["momentum_buffer"].dtype == torch.float32


def test_the_public_class_builds_the_encoder_decoder_model_and_copies_keep_their_class():
    from tests.models import tiny_model

    seq2seq, causal = MultiPrefixModel(tiny_seq2seq("t5")), MultiPrefixModel(tiny_model("llama"))
    assert type(seq2seq) is EncoderDecoderMultiPrefixModel and seq2seq.encoder_decoder
    assert type(causal) is MultiPrefixModel and not causal.encoder_decoder
    seq2seq.add_adapter("prompt", ADAPTER_KINDS["prompt"](peft))
    for model in (seq2seq, causal):
        copied = copy.deepcopy(model)  # copy and pickle call __new__ without the backbone
        assert type(copied) is type(model) and copied.adapters == model.adapters
