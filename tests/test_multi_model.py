"""MultiPrefixModel under the loops people already use: transformers.Trainer (its column removal, checkpoints, resume)
and a plain accelerate loop must take the steps MultiPrefixTrainer takes on the same rows; the shared data path
(AdapterBatchCollator) and the module's state dict (the adapters only).

Tiny random Llama with GQA, fp32, CPU.
"""

import warnings

import pytest
import torch

from tests.models import VOCAB, tiny_model
from tests.reference import assert_close

peft = pytest.importorskip("peft")
from peft import PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fastpeft.data import IGNORE_INDEX, AdapterBatchCollator, collate  # noqa: E402
from fastpeft.multi import MultiPrefixModel, MultiPrefixTrainer, SaveAdaptersCallback  # noqa: E402

LR = 1e-2
ADAPTERS = {
    "short": dict(num_virtual_tokens=3),
    "projected": dict(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=48),
    "idle": dict(num_virtual_tokens=2),   # named by no record: must come out of every loop untouched
}
STEPS = 2


def _records():
    """Six records of "short" and "projected", each naming its adapter twice: by index (``adapter_ids``, what
    survives Trainer's column removal) and by name (``task``, dropped by it), plus a text field the model does not
    take. Some rows have unlabelled prompts."""
    g = torch.Generator().manual_seed(11)
    names = ["short", "projected", "short", "projected", "projected", "short"]
    records = []
    for i, (name, length, prompt) in enumerate(zip(names, [7, 5, 9, 6, 8, 4], [2, 0, 3, 1, 0, 0])):
        ids = torch.randint(1, VOCAB, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        records.append({"input_ids": ids, "labels": labels, "adapter_ids": list(ADAPTERS).index(name),
                        "task": name, "text": f"row {i}"})
    return records


RECORDS = _records()


@pytest.fixture(scope="module")
def peft_models():
    models = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(200 + i)
        models[name] = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", **kwargs))
    return models


def _model(peft_models):
    model = MultiPrefixModel(tiny_model("llama"))
    for name, peft_model in peft_models.items():
        model.add_adapter(name, peft_model)
    return model


def _params(model):
    return {name: {k: p.detach().clone() for k, p in model.encoder(name).named_parameters()} for name in ADAPTERS}


@pytest.fixture(scope="module")
def reference(peft_models):
    """MultiPrefixTrainer (per-adapter AdamW, no clipping) on the six records as one batch, STEPS times."""
    trainer = MultiPrefixTrainer(tiny_model("llama"), lr=LR)
    for name, peft_model in peft_models.items():
        trainer.add_adapter(name, peft_model)
    initial = _params(trainer.prefix_model)
    batch = collate(RECORDS, pad_token_id=0)
    names = [record["task"] for record in RECORDS]
    results = [trainer.training_step(batch["input_ids"], names, attention_mask=batch["attention_mask"],
                                     labels=batch["labels"]) for _ in range(STEPS)]
    assert all(sorted(result["updated"]) == ["projected", "short"] for result in results)
    return {"trainer": trainer, "initial": initial, "final": _params(trainer.prefix_model),
            "losses": [result["loss"] for result in results]}


def _assert_same_training(model, reference, what, tolerance=1e-5):
    """Every trained adapter moved as the reference's did; the idle one did not move at all."""
    final = _params(model)
    for name in ADAPTERS:
        for key, expected in reference["final"][name].items():
            initial = reference["initial"][name][key]
            if name == "idle":
                assert torch.equal(final[name][key], initial), f"{what}: idle {key} moved"
                continue
            assert float((expected - initial).norm()) > 0
            assert_close(final[name][key] - initial, expected - initial, tolerance, name=f"{what} {name}.{key} update")


# ---------------------------------------------------------------------------------------------- transformers.Trainer


def _trainer(model, output_dir, max_steps=STEPS):
    from transformers import Trainer, TrainingArguments

    # The whole data set is one batch (the sampler's shuffling only reorders its rows); Trainer's AdamW with a
    # constant rate and no global clipping is the reference's per-adapter AdamW.
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=len(RECORDS),
                             max_steps=max_steps, learning_rate=LR, optim="adamw_torch", weight_decay=0.0,
                             lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, logging_steps=1,
                             save_strategy="steps", save_steps=1, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=RECORDS,
                   data_collator=AdapterBatchCollator(model.adapters, pad_token_id=0),
                   callbacks=[SaveAdaptersCallback()])


@pytest.fixture(scope="module")
def trainer_run(peft_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    model = _model(peft_models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(model, root / "run")
        trainer.train()
        trainer.save_model(str(root / "final"))
    return {"model": model, "trainer": trainer, "root": root}


def test_trainer_steps_equal_multi_prefix_trainer(trainer_run, reference):
    _assert_same_training(trainer_run["model"], reference, "Trainer")
    logged = [entry["loss"] for entry in trainer_run["trainer"].state.log_history if "loss" in entry]
    assert logged == pytest.approx(reference["losses"], abs=1e-4)  # Trainer logs losses rounded to 4 decimals


def test_trainer_checkpoints_hold_the_adapters_only(trainer_run, reference):
    """Trainer writes ``state_dict()`` of a module it does not know: the adapters' encoders, never the backbone;
    SaveAdaptersCallback adds every adapter as a PEFT directory that plain PEFT loads."""
    model, root = trainer_run["model"], trainer_run["root"]
    expected_keys = {f"prefix_encoders.{i}.{key}" for i, name in enumerate(ADAPTERS)
                     for key, _ in model.encoder(name).named_parameters()}
    for directory in (root / "run" / "checkpoint-1", root / "run" / f"checkpoint-{STEPS}", root / "final"):
        assert set(load_file(directory / "model.safetensors")) == expected_keys, directory
    checkpoint = root / "run" / f"checkpoint-{STEPS}"
    for name in ADAPTERS:
        saved = load_file(checkpoint / name / "adapter_model.safetensors")["prompt_embeddings"]
        reference["trainer"].save_adapter(name, root / "reference" / name)
        expected = load_file(root / "reference" / name / "adapter_model.safetensors")["prompt_embeddings"]
        assert_close(saved, expected, 1e-5, name=f"{name} checkpoint prefix")
        loaded = PeftModel.from_pretrained(tiny_model("llama"), str(checkpoint / name))
        assert_close(loaded.prompt_encoder["default"].embedding.weight, expected, 1e-6, name=f"{name} loaded")


def test_trainer_resumes_from_a_checkpoint(trainer_run, peft_models, tmp_path):
    """A fresh model resumed from checkpoint-1 (model.safetensors, optimizer, schedule) ends where the uninterrupted
    run ended."""
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            CountSteps.steps += 1

    model = _model(peft_models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(model, tmp_path / "resumed")
        trainer.add_callback(CountSteps)
        trainer.train(resume_from_checkpoint=str(trainer_run["root"] / "run" / "checkpoint-1"))
    assert CountSteps.steps == STEPS - 1  # resumed after step 1, not retrained from the start
    uninterrupted = _params(trainer_run["model"])
    for name, params in _params(model).items():
        for key, value in params.items():
            assert_close(value, uninterrupted[name][key], 1e-6, name=f"resumed {name}.{key}")


def test_forward_signature_names_the_trainer_columns():
    """Trainer keeps the batch fields forward takes (``remove_unused_columns``) and reads its labels from it."""
    import inspect

    from transformers.utils import find_labels

    assert list(inspect.signature(MultiPrefixModel.forward).parameters)[1:] == [
        "input_ids", "attention_mask", "labels", "adapter_ids"]
    assert find_labels(MultiPrefixModel) == ["labels"]


# ----------------------------------------------------------------------------------------------------- accelerate


def test_accelerate_loop_equals_multi_prefix_trainer(peft_models, reference):
    from accelerate import Accelerator

    model = _model(peft_models)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(RECORDS, batch_size=len(RECORDS),
                                         collate_fn=AdapterBatchCollator(model.adapters, pad_token_id=0))
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    prepared.train()
    losses = []
    for _ in range(STEPS):
        for batch in loader:
            out = prepared(**batch)
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
    _assert_same_training(model, reference, "accelerate")
    assert losses == pytest.approx(reference["losses"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- the module itself


def test_output_reports_each_adapter(peft_models, reference):
    model = _model(peft_models)
    batch = AdapterBatchCollator(model.adapters)(RECORDS)
    out = model(**batch)
    counts = {name: sum(sum(label != IGNORE_INDEX for label in record["labels"][1:])
                        for record in RECORDS if record["task"] == name) for name in ADAPTERS}
    assert out.token_counts.tolist() == [counts[name] for name in ADAPTERS]
    assert torch.isnan(out.adapter_losses[2]) and not torch.isnan(out.adapter_losses[:2]).any()
    assert out.loss.item() == pytest.approx(reference["losses"][0], rel=1e-6)
    assert float(out.adapter_losses[:2].sum()) == pytest.approx(reference["losses"][0], rel=1e-6)
    assert out.logits.shape == (*batch["input_ids"].shape, VOCAB)
    # Only the used adapters get a gradient; the absent one gets None, which optimizers skip.
    out.loss.backward()
    assert model.encoder("short").embedding.weight.grad is not None
    assert all(p.grad is None for p in model.encoder("idle").parameters())


def test_state_dict_is_the_adapters_and_loads_strictly(peft_models):
    model = _model(peft_models)
    state = model.state_dict()
    assert state and all(key.startswith("prefix_encoders.") for key in state)
    other = _model(peft_models)
    with torch.no_grad():
        for p in other.prefix_encoders.parameters():
            p.add_(1.0)
    result = other.load_state_dict(state, strict=True)  # the backbone's absence is no missing key
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    # A key of an adapter that is not there still counts.
    with pytest.raises(RuntimeError, match="prefix_encoders.2.embedding.weight"):
        other.load_state_dict({k: v for k, v in state.items() if not k.startswith("prefix_encoders.2.")})


def test_bad_adapter_ids_raise_clear_errors(peft_models):
    model = _model(peft_models)
    ids = torch.randint(1, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="adapter_ids"):
        model(ids)
    with pytest.raises(ValueError, match="adapter_ids"):
        model(ids, adapter_ids=[0])
    with pytest.raises(ValueError, match="adapter_ids"):
        model(ids, adapter_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(IndexError, match="adapter_ids"):
        model(ids, adapter_ids=[0, 3])
    with pytest.raises(KeyError, match="nobody"):
        model.adapter_id("nobody")


def test_collator_names_adapters_by_index_or_name():
    collator = AdapterBatchCollator(["a", "b"], pad_token_id=9, max_length=3)
    batch = collator([{"input_ids": [5, 6, 7, 8], "task": "b"}, {"input_ids": [4], "adapter_ids": 0}])
    assert batch["adapter_ids"].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [4, 9, 9]]
    assert batch["labels"].tolist() == [[5, 6, 7], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(KeyError, match="'c'"):
        collator([{"input_ids": [1], "task": "c"}])
    with pytest.raises(IndexError, match="adapter_ids=2"):
        collator([{"input_ids": [1], "adapter_ids": 2}])
    with pytest.raises(ValueError, match="names no adapter"):
        collator([{"input_ids": [1]}])
    with pytest.raises(KeyError, match=r"\['c', 'd'\]"):
        collator.check_records([{"input_ids": [1], "task": "d"}, {"input_ids": [1], "task": "c"},
                                {"input_ids": [1], "task": "a"}])


def test_restore_gives_the_backbone_back():
    from fastpeft.integration.checkpointing import is_checkpointing

    base = tiny_model("llama")
    previous = base.config._attn_implementation
    model = MultiPrefixModel(base, gradient_checkpointing=True)
    assert is_checkpointing(base) and base.config._attn_implementation == "fastpeft"
    model.restore()
    assert not is_checkpointing(base) and base.config._attn_implementation == previous
    assert not any(p.requires_grad for p in base.parameters())  # frozen it stays
    model.add_adapter("a", PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(RuntimeError, match="attention implementation"):
        model(torch.ones(1, 3, dtype=torch.long), adapter_ids=[0])
