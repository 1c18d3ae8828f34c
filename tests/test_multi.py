"""MultiPrefixTrainer against plain PEFT: N prefix-tuning adapters trained together on mixed batches must end where
each adapter ends when PEFT trains it alone on its own rows (same batches, same AdamW), gradient for gradient.

Tiny random Llama with GQA (4 query heads, 2 KV heads), fp32, CPU; the fused attention runs on the reference path.
"""

import copy
import json
import os
import types

import pytest
import torch

from tests.distributed import run_workers
from tests.models import VOCAB, tiny_model
from tests.reference import assert_close

peft = pytest.importorskip("peft")
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model  # noqa: E402

from fastpeft.multi import IGNORE_INDEX, MIXED_PRECISION, MultiPrefixTrainer  # noqa: E402

LR, WEIGHT_DECAY = 1e-2, 0.1   # weight decay on, so that a stepped idle adapter would drift
ADAPTERS = {
    "short": dict(num_virtual_tokens=3),
    "projected": dict(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=48),
    "tiny": dict(num_virtual_tokens=2),
}


def make_batch(seed, rows, lengths, left_pad=(), prompt=None, unlabelled=()):
    """Mixed batch: ``input_ids``/``attention_mask``/``labels`` ``[B, max(lengths)]``.

    Rows are right-padded to the longest, except rows in ``left_pad`` (PEFT's positions are not pad-aware, so
    those rows check that the trainer places tokens exactly as PEFT does). ``prompt[b]`` leading real tokens of row b
    carry no loss; rows in ``unlabelled`` carry none at all. Ids are random in [1, VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    B, L = len(rows), max(lengths)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        if b in left_pad:
            mask[b, L - n:] = 1
        else:
            mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    for b, n in enumerate(prompt or ()):
        real = mask[b].nonzero().flatten()
        labels[b, real[:n]] = IGNORE_INDEX
    for b in unlabelled:
        labels[b] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "adapters": list(rows)}


# Three steps. Step 1 has no labelled token of "tiny" (absent, plus a row whose labels are all -100), so "tiny"
# must not move; step 2 has a left-padded row.
BATCHES = [
    make_batch(1, ["short", "projected", "short", "tiny", "projected", "short"], [9, 7, 5, 9, 8, 6],
               prompt=[3, 0, 2, 0, 1, 0]),
    make_batch(2, ["projected", "short", "tiny", "projected", "short"], [6, 8, 8, 5, 7], unlabelled=[2]),
    make_batch(3, ["tiny", "short", "tiny", "projected", "projected"], [7, 7, 4, 6, 7], left_pad=[2]),
]


def rows_of(batch, name):
    """The sub-batch of ``name``'s rows, as PEFT alone sees it (same padding)."""
    keep = [b for b, n in enumerate(batch["adapters"]) if n == name]
    return {k: batch[k][keep] for k in ("input_ids", "attention_mask", "labels")}


def has_labels(batch, name):
    return bool((rows_of(batch, name)["labels"][:, 1:] != IGNORE_INDEX).any())


def peft_models():
    """One PEFT prefix-tuning model per adapter, each on its own copy of the same backbone, seeded inits."""
    models = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        models[name] = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", **kwargs))
        models[name].train()
    return models


def trainer_from(models, **kwargs):
    trainer = MultiPrefixTrainer(tiny_model("llama"), lr=LR, weight_decay=WEIGHT_DECAY, **kwargs)
    for name, model in models.items():
        trainer.add_adapter(name, model)
    return trainer


def grads(module):
    return {k: p.grad.detach().clone() for k, p in module.named_parameters()}


def params(module):
    return {k: p.detach().clone() for k, p in module.named_parameters()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run the three steps both ways; keep what the tests compare."""
    references = peft_models()
    trainer = trainer_from(references)
    initial = {name: params(trainer.encoder(name)) for name in ADAPTERS}

    # PEFT, one adapter at a time, on its own rows, stepped only when they carry labels.
    peft_grads, peft_losses = {}, {}
    for name, model in references.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        for step, batch in enumerate(BATCHES):
            if not has_labels(batch, name):
                continue
            optimizer.zero_grad()
            out = model(**rows_of(batch, name))
            out.loss.backward()
            if step == 0:
                peft_grads[name] = grads(model.prompt_encoder["default"])
                peft_losses[name] = out.loss.item()
            optimizer.step()

    # The trainer: gradients of the first batch, then the three training steps.
    trainer.model.train()
    first = BATCHES[0]
    out = trainer(first["input_ids"], first["adapters"], attention_mask=first["attention_mask"],
                  labels=first["labels"])
    out.loss.backward()
    multi_grads = {name: grads(trainer.encoder(name)) for name in ADAPTERS}
    trainer.zero_grad()
    results, snapshots = [], []
    for batch in BATCHES:
        snapshots.append({name: (params(trainer.encoder(name)), copy.deepcopy(trainer.optimizer(name).state_dict()))
                          for name in ADAPTERS})
        results.append(trainer.training_step(batch["input_ids"], batch["adapters"],
                                             attention_mask=batch["attention_mask"], labels=batch["labels"]))
    snapshots.append({name: (params(trainer.encoder(name)), copy.deepcopy(trainer.optimizer(name).state_dict()))
                      for name in ADAPTERS})
    return dict(trainer=trainer, references=references, initial=initial, peft_grads=peft_grads,
                peft_losses=peft_losses, multi_grads=multi_grads, multi_losses=out.adapter_losses,
                combined_loss=out.loss.item(), results=results, snapshots=snapshots,
                saved=tmp_path_factory.mktemp("adapters"))


def test_gradients_equal_peft_per_adapter(trained):
    for name in ADAPTERS:
        assert trained["multi_grads"][name].keys() == trained["peft_grads"][name].keys()
        for key, expected in trained["peft_grads"][name].items():
            assert float(expected.norm()) > 0
            assert_close(trained["multi_grads"][name][key], expected, 1e-5, name=f"{name}.{key}.grad")
        assert trained["multi_losses"][name] == pytest.approx(trained["peft_losses"][name], rel=1e-6)
    # The combined loss is the sum of the per-adapter means.
    assert trained["combined_loss"] == pytest.approx(sum(trained["peft_losses"].values()), rel=1e-6)


def test_parameters_after_training_equal_peft(trained):
    for name, model in trained["references"].items():
        expected = params(model.prompt_encoder["default"])
        actual = params(trained["trainer"].encoder(name))
        for key in expected:
            assert_close(actual[key], expected[key], 1e-5, name=f"{name}.{key}")
            # The update itself, not only the parameter (which is dominated by its initial value).
            initial = trained["initial"][name][key]
            assert float((expected[key] - initial).norm()) > 0
            assert_close(actual[key] - initial, expected[key] - initial, 1e-4, name=f"{name}.{key} update")


def test_adapter_without_labelled_rows_is_untouched(trained):
    before, after = trained["snapshots"][1]["tiny"], trained["snapshots"][2]["tiny"]
    assert trained["results"][1]["updated"] == ["short", "projected"]
    assert "tiny" not in trained["results"][1]["adapter_losses"]
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key])
    state_before, state_after = before[1]["state"], after[1]["state"]
    assert state_before.keys() == state_after.keys() and state_before
    for slot in state_before:
        for key, value in state_before[slot].items():
            assert torch.equal(value, state_after[slot][key]), f"optimizer state {slot}.{key} changed"
    assert trained["trainer"].updates("tiny") == 2 and trained["trainer"].updates("short") == 3
    # The same step did move the adapters that had rows.
    moved_before, moved_after = trained["snapshots"][1]["short"][0], trained["snapshots"][2]["short"][0]
    assert not torch.equal(moved_before["embedding.weight"], moved_after["embedding.weight"])


def test_saved_adapters_are_peft_adapters(trained):
    trainer, root = trained["trainer"], trained["saved"]
    trainer.save_pretrained(root / "multi")
    batch = BATCHES[2]
    trainer.model.eval()
    with torch.no_grad():
        multi_logits = trainer(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"]).logits
    for name, reference in trained["references"].items():
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
        assert_close(mine["prompt_embeddings"], theirs["prompt_embeddings"], 1e-5, name=f"{name} saved prefix")

        # Loaded in plain PEFT, the adapter gives the trainer's logits for its rows.
        loaded = PeftModel.from_pretrained(tiny_model("llama"), str(ours)).eval()
        sub = rows_of(batch, name)
        keep = [b for b, n in enumerate(batch["adapters"]) if n == name]
        with torch.no_grad():
            peft_logits = loaded(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
        assert_close(multi_logits[keep], peft_logits, 1e-5, name=f"{name} logits")


def test_saved_adapter_continues_training(trained, tmp_path):
    """A directory loads back (a projection adapter as its saved table) and trains on."""
    trained["trainer"].save_adapter("projected", tmp_path / "projected")
    trainer = MultiPrefixTrainer(tiny_model("llama"), lr=LR)
    trainer.add_adapter("again", tmp_path / "projected")
    expected = trained["trainer"].encoder("projected")
    with torch.no_grad():
        table = expected.transform(expected.embedding(torch.arange(5)))
    assert_close(trainer.encoder("again").embedding.weight, table, 1e-6, name="reloaded prefix")
    batch = rows_of(BATCHES[0], "projected")
    result = trainer.training_step(batch["input_ids"], ["again"] * len(batch["input_ids"]),
                                   attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert result["updated"] == ["again"]
    assert not torch.equal(trainer.encoder("again").embedding.weight, table)


def test_new_adapter_is_initialised_like_get_peft_model():
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=40)
    base = tiny_model("llama")
    torch.manual_seed(7)
    reference = get_peft_model(base, PrefixTuningConfig(**kwargs))
    trainer = MultiPrefixTrainer(tiny_model("llama"))
    torch.manual_seed(7)
    trainer.add_adapter("fresh", PrefixTuningConfig(**kwargs))
    assert trainer.config("fresh").to_dict() == reference.peft_config["default"].to_dict()
    expected = params(reference.prompt_encoder["default"])
    actual = params(trainer.encoder("fresh"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_train_over_records_batches_and_pads_like_hand_built_steps():
    torch.manual_seed(0)
    configs = {"x": PrefixTuningConfig(num_virtual_tokens=3),
               "y": PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=32)}
    g = torch.Generator().manual_seed(5)
    records = [{"task": task, "input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist()}
               for task, n in [("x", 5), ("y", 7), ("y", 3), ("x", 6), ("y", 4)]]
    records[1]["labels"] = [IGNORE_INDEX] * 3 + records[1]["input_ids"][3:]

    def fresh():
        torch.manual_seed(0)
        trainer = MultiPrefixTrainer(tiny_model("llama"), lr=LR)
        for name, config in configs.items():
            trainer.add_adapter(name, config)
        return trainer

    with pytest.raises(KeyError, match="'z'"):
        fresh().train(records + [{"task": "z", "input_ids": [1, 2]}])

    seen = []
    trainer = fresh()
    # Records may also be objects with attributes (e.g. dataclasses), labels absent = loss on every token.
    as_objects = records[:3] + [types.SimpleNamespace(task="x", input_ids=records[3]["input_ids"], labels=None)]
    history = trainer.train(as_objects + records[4:], batch_size=2, shuffle=False, callback=seen.append)
    assert len(history) == 3 and seen == history and [r["step"] for r in history] == [1, 2, 3]

    # The same steps from hand-padded batches: right padding with pad id 0, labels -100 on padding.
    by_hand = fresh()
    for chunk in (records[0:2], records[2:4], records[4:5]):
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[b, :n] = torch.tensor(r["input_ids"])
            labels[b, :n] = torch.tensor(r.get("labels", r["input_ids"]))
            mask[b, :n] = 1
        by_hand.training_step(ids, [r["task"] for r in chunk], attention_mask=mask, labels=labels)
    for name in configs:
        for key, value in params(by_hand.encoder(name)).items():
            assert torch.equal(params(trainer.encoder(name))[key], value), f"{name}.{key}"


def test_optimizer_factory_scheduler_and_clipping_are_per_adapter():
    """SGD(lr=1) makes each update minus the clipped gradient: its norm must be max_grad_norm per adapter. Each
    scheduler counts only its own adapter's updates."""
    max_norm = 1e-3
    trainer = MultiPrefixTrainer(tiny_model("llama"), optimizer_factory=lambda p: torch.optim.SGD(p, lr=1.0),
                                 scheduler_factory=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda n: 0.5 ** n),
                                 max_grad_norm=max_norm)
    torch.manual_seed(0)
    for name, kwargs in ADAPTERS.items():
        trainer.add_adapter(name, PrefixTuningConfig(**kwargs))
    for step, batch in enumerate(BATCHES):
        lrs = {name: trainer.optimizer(name).param_groups[0]["lr"] for name in ADAPTERS}
        before = {name: params(trainer.encoder(name)) for name in ADAPTERS}
        result = trainer.training_step(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"],
                                       labels=batch["labels"])
        for name in ADAPTERS:
            after = params(trainer.encoder(name))
            update = torch.cat([(after[k] - before[name][k]).flatten() for k in after])
            expected = lrs[name] * max_norm if name in result["updated"] else 0.0
            # The update is a difference of float32 parameters of size ~1 moved by ~1e-4: rounding alone makes
            # ~1e-4 of its norm, and the kernels' summation order moves that; an unclipped update is orders larger.
            assert float(update.norm()) == pytest.approx(expected, rel=1e-3), (step, name)
    # "tiny" sat out step 1: two updates, so its learning rate was halved twice; the others three times.
    assert trainer.optimizer("tiny").param_groups[0]["lr"] == pytest.approx(0.25)
    assert trainer.optimizer("short").param_groups[0]["lr"] == pytest.approx(0.125)


def test_bad_inputs_raise_clear_errors(tmp_path):
    trainer = MultiPrefixTrainer(tiny_model("llama"))
    trainer.add_adapter("a", PrefixTuningConfig(num_virtual_tokens=2))
    ids = torch.randint(1, VOCAB, (2, 4))
    with pytest.raises(KeyError, match="nobody"):
        trainer(ids, ["a", "nobody"])
    with pytest.raises(ValueError, match="adapters"):
        trainer(ids, ["a"])
    with pytest.raises(ValueError, match="attention_mask"):
        trainer(ids, ["a", "a"], attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="already exists"):
        trainer.add_adapter("a", PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prefix tuning"):
        trainer.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2))
    # An adapter made for a backbone with other KV heads.
    other = get_peft_model(tiny_model("llama", kv_heads=4), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                num_virtual_tokens=2))
    with pytest.raises(ValueError, match="num_attention_heads"):
        trainer.add_adapter("other", other)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="KV heads"):
        trainer.add_adapter("other", tmp_path / "other")
    with pytest.raises(ValueError, match="PeftModel"):
        MultiPrefixTrainer(other)
    trainer.remove_adapter("a")
    assert trainer.adapters == []
    with pytest.raises(KeyError, match="'a'"):
        trainer(ids, ["a", "a"])


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = BATCHES[0]
    references = peft_models()
    results = []
    for checkpointing in (False, True):
        trainer = trainer_from(references, gradient_checkpointing=checkpointing)
        trainer.model.train()
        calls = []
        handle = trainer.model.model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        out = trainer(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"])
        out.loss.backward()
        handle.remove()
        # Checkpointing recomputes the layer in the backward: its attention runs twice.
        assert len(calls) == (2 if checkpointing else 1)
        results.append({name: grads(trainer.encoder(name)) for name in ADAPTERS})
    for name in ADAPTERS:
        for key, expected in results[0][name].items():
            assert_close(results[1][name][key], expected, 1e-6, name=f"{name}.{key}.grad (checkpointed)")


def test_bf16_backbone_trains_with_fp32_adapters():
    """Mixed precision: a bf16 backbone, adapter parameters and AdamW states in fp32; gradients near fp32's."""
    batch = BATCHES[0]
    references = peft_models()
    full = trainer_from(references)
    full.model.train()
    out = full(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    out.loss.backward()
    trainer = MultiPrefixTrainer(tiny_model("llama").to(torch.bfloat16), lr=LR)
    for name, model in references.items():
        trainer.add_adapter(name, model)
    trainer.model.train()
    out = trainer(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"])
    out.loss.backward()
    for name in ADAPTERS:
        for key, p in trainer.encoder(name).named_parameters():
            assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
            assert_close(p.grad, dict(full.encoder(name).named_parameters())[key].grad, 5e-2, name=f"{name}.{key}")
    trainer.zero_grad()
    result = trainer.training_step(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"],
                                   labels=batch["labels"])
    assert sorted(result["updated"]) == sorted(ADAPTERS)
    state = trainer.optimizer("short").state[trainer.encoder("short").embedding.weight]
    assert state["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_backbone_trains(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    import transformers

    tiny_model("llama").save_pretrained(tmp_path / "base")
    quantization = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
                    if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True))
    quantized = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu",
                                                                  quantization_config=quantization)
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == ("Linear4bit" if bits == 4
                                                                          else "Linear8bitLt")
    trainer = MultiPrefixTrainer(quantized, lr=3e-2, gradient_checkpointing=True)
    torch.manual_seed(0)
    for name, kwargs in ADAPTERS.items():
        trainer.add_adapter(name, PrefixTuningConfig(**kwargs))
    batch = BATCHES[0]
    trainer.model.train()
    out = trainer(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"])
    out.loss.backward()
    for name in ADAPTERS:
        for key, p in trainer.encoder(name).named_parameters():
            assert torch.isfinite(p.grad).all() and float(p.grad.norm()) > 0, f"{name}.{key}"
    trainer.zero_grad()
    losses = [trainer.training_step(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"],
                                    labels=batch["labels"])["adapter_losses"] for _ in range(4)]
    for name in ADAPTERS:
        assert losses[-1][name] < losses[0][name], name


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_other_families_match_peft(family):
    """Absolute positions (GPT-2: the offset P matters directly) and Qwen3's q/k norms."""
    batch = make_batch(6, ["s", "p", "s"], [7, 5, 6], left_pad=[1])
    kwargs = {"s": dict(num_virtual_tokens=3), "p": dict(num_virtual_tokens=2, prefix_projection=True,
                                                          encoder_hidden_size=24)}
    trainer = MultiPrefixTrainer(tiny_model(family))
    trainer.model.train()
    references = {}
    for name, config in kwargs.items():
        torch.manual_seed(len(name))
        references[name] = get_peft_model(tiny_model(family), PrefixTuningConfig(task_type="CAUSAL_LM", **config))
        trainer.add_adapter(name, references[name])
    out = trainer(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"],
                  labels=batch["labels"])
    out.loss.backward()
    for name, reference in references.items():
        reference.train()
        expected = reference(**rows_of(batch, name))
        expected.loss.backward()
        keep = [b for b, n in enumerate(batch["adapters"]) if n == name]
        assert_close(out.logits[keep], expected.logits, 1e-5, name=f"{family} {name} logits")
        for key, p in reference.prompt_encoder["default"].named_parameters():
            assert_close(dict(trainer.encoder(name).named_parameters())[key].grad, p.grad, 1e-5,
                         name=f"{family} {name}.{key}.grad")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_mixed_precision(precision):
    """torch.autocast over the backbone (GPT-2: its attention inputs all come out of autocast matmuls), fp32
    adapters and optimizer states; fp16 scales the loss. Gradients stay near the fp32 ones."""
    batch = make_batch(7, ["s", "p", "s", "p"], [6, 7, 5, 7])
    kwargs = {"s": dict(num_virtual_tokens=3), "p": dict(num_virtual_tokens=2, prefix_projection=True,
                                                          encoder_hidden_size=24)}
    trainers = []
    for mixed_precision in (None, precision):
        trainer = MultiPrefixTrainer(tiny_model("gpt2"), lr=LR, mixed_precision=mixed_precision)
        torch.manual_seed(0)
        for name, config in kwargs.items():
            trainer.add_adapter(name, PrefixTuningConfig(**config))
        trainer.model.train()
        out = trainer(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"])
        out.loss.backward()
        trainers.append(trainer)
    assert out.logits.dtype == MIXED_PRECISION[precision]
    full, mixed = trainers
    for name in kwargs:
        for key, p in mixed.encoder(name).named_parameters():
            assert p.dtype == torch.float32
            assert_close(p.grad, dict(full.encoder(name).named_parameters())[key].grad, 5e-2, name=f"{name}.{key}")
    mixed.zero_grad()
    before = {name: params(mixed.encoder(name)) for name in kwargs}
    for _ in range(2):
        result = mixed.training_step(batch["input_ids"], batch["adapters"], attention_mask=batch["attention_mask"],
                                     labels=batch["labels"])
    for name in kwargs:
        for key, value in params(mixed.encoder(name)).items():
            assert torch.isfinite(value).all() and not torch.equal(value, before[name][key]), f"{name}.{key}"
    assert sorted(result["updated"]) == ["p", "s"]


# ---------------------------------------------------------------------------------------------- DDP (gloo, 2 CPU procs)

DDP_ADAPTERS = {"a": dict(num_virtual_tokens=3), "b": dict(num_virtual_tokens=4, prefix_projection=True,
                                                             encoder_hidden_size=32),
                "c": dict(num_virtual_tokens=2), "idle": dict(num_virtual_tokens=3)}
# Rank 0 takes rows 0-2, rank 1 rows 3-5: "a" lives only on rank 0, "c" only on rank 1, "idle" nowhere, and the
# token counts per adapter differ between ranks.
DDP_BATCH = make_batch(4, ["a", "b", "a", "c", "b", "b"], [8, 5, 6, 8, 7, 3], prompt=[2, 0, 0, 3, 0, 0])


def _ddp_trainer(seed):
    torch.manual_seed(seed)
    trainer = MultiPrefixTrainer(tiny_model("llama"), lr=LR, weight_decay=WEIGHT_DECAY)
    for name, kwargs in DDP_ADAPTERS.items():
        trainer.add_adapter(name, PrefixTuningConfig(**kwargs))
    trainer.model.train()
    return trainer


def _ddp_run(trainer, rows):
    """Gradients of one forward/backward on ``rows`` of DDP_BATCH, then two training steps; what the test compares."""
    batch = {k: (v[rows] if torch.is_tensor(v) else [v[r] for r in rows]) for k, v in DDP_BATCH.items()}
    args = (batch["input_ids"], batch["adapters"])
    kwargs = dict(attention_mask=batch["attention_mask"], labels=batch["labels"])
    out = trainer(*args, **kwargs)
    out.loss.backward()
    result = {"grads": {n: grads(trainer.encoder(n)) for n in ("a", "b", "c")}, "counts": out.token_counts,
              "losses": out.adapter_losses}
    trainer.zero_grad()
    result["steps"] = [trainer.training_step(*args, **kwargs) for _ in range(2)]
    result["params"] = {n: params(trainer.encoder(n)) for n in DDP_ADAPTERS}
    return result


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Rank 1 starts from other values: DDP must broadcast rank 0's adapters.
        trainer = _ddp_trainer(seed=rank)
        result = _ddp_run(trainer, [0, 1, 2] if rank == 0 else [3, 4, 5])
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tmp_path):
    run_workers(_ddp_worker, (2, str(tmp_path / "rendezvous"), str(tmp_path)), init_file=str(tmp_path / "rendezvous"))
    single = _ddp_run(_ddp_trainer(seed=0), list(range(6)))
    initial = params(_ddp_trainer(seed=0).encoder("idle"))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["counts"] == single["counts"]
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-6)
        for name, expected in single["grads"].items():
            for key, value in expected.items():
                assert_close(result["grads"][name][key], value, 1e-5, name=f"rank {rank} {name}.{key}.grad")
        for got, want in zip(result["steps"], single["steps"]):
            assert got["updated"] == want["updated"] == ["a", "b", "c"]
            assert got["adapter_losses"] == pytest.approx(want["adapter_losses"], rel=1e-6)
        for name, expected in single["params"].items():
            for key, value in expected.items():
                assert_close(result["params"][name][key], value, 1e-5, name=f"rank {rank} {name}.{key}")
        for key, value in initial.items():
            assert torch.equal(result["params"]["idle"][key], value)


def test_refuses_unsupported_family():
    from tests.accelerate_helpers import tiny_softcapped_gemma2

    model = tiny_softcapped_gemma2()
    previous = model.config._attn_implementation
    with pytest.raises(ValueError, match="gemma2"):
        MultiPrefixTrainer(model)
    assert model.config._attn_implementation == previous and all(p.requires_grad for p in model.parameters())
