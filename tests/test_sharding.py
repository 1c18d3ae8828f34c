"""FSDP2 (``fully_shard``) over an accelerated PEFT model, two CPU processes over gloo, against one process: the loss
of every step, the parameters, the saved adapter (PEFT's own ``save_pretrained`` of the one-process model), the
resume from it, fastpeft's attention in every layer of every step, and the named error of a wrap that leaves a
prompt parameter unsharded.

The tests that spawn processes (tens of seconds each on a 2-core machine) run in ``.ci/run-distributed``
(``FASTPEFT_DISTRIBUTED_TESTS=1``), not in ``.ci/run``; the one-process tests at the end (FSDP2 over a process group of
one, the spec's tracking through FSDP2's input rebuilding, saving and resuming without sharding, the refusals) run in
both.
"""

import json
import os
import warnings

import pytest
import torch

from tests.distributed import run_workers
from tests.reference import assert_close

spawning = pytest.mark.skipif(os.environ.get("FASTPEFT_DISTRIBUTED_TESTS") != "1",
                              reason="spawns processes: bash .ci/run-distributed")

peft = pytest.importorskip("peft")

STEPS, LR = 3, 1e-2
# Four rows, two per process; every process holds the same number of labelled tokens (rows padded 0 and 1 on both), so
# FSDP's averaging of the two processes' gradients is the gradient of the whole batch's mean loss.
BATCH = dict(seed=5, batch=4, length=6, left_pad=(0, 1, 1, 0))


def _batch():
    from tests.accelerate_helpers import batch_and_labels

    return batch_and_labels("llama", **BATCH)


def _model(method, prompt_seed=0):
    """The accelerated PEFT model of ``method`` on the tiny Llama (always the same backbone), prompt parameters drawn
    from ``prompt_seed``."""
    import fastpeft
    from tests.accelerate_helpers import make_peft_model
    from tests.models import tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tiny_model("llama", attn_implementation="sdpa")
        model = fastpeft.accelerate(make_peft_model("llama", method, seed=prompt_seed, base=base))
    model.train()
    return model


def _train(model, rows):
    """STEPS AdamW steps on ``rows`` of the batch; the loss of each step."""
    ids, mask, labels = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return losses


def _init(rank, world, init_file):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _fsdp_worker(rank, world, init_file, out_dir, method):
    from fastpeft.integration import sharding
    from fastpeft.observe import attention_calls

    _init(rank, world, init_file)
    try:
        model = sharding.shard(_model(method))
        rows = slice(2 * rank, 2 * rank + 2)
        with attention_calls() as calls:
            losses = _train(model, rows)
        # The whole batch's loss of each step: the mean of the two processes' (equal token counts).
        losses = torch.stack(losses)
        torch.distributed.all_reduce(losses)
        sharding.save_pretrained(model, os.path.join(out_dir, "adapter"))
        result = {"losses": (losses / world).tolist(), "calls": dict(calls)}

        # Resume: a model started elsewhere takes the saved adapter and gives the trained model's loss.
        ids, mask, labels = _batch()
        with torch.no_grad():
            result["trained_loss"] = float(model(input_ids=ids[rows], attention_mask=mask[rows],
                                                 labels=labels[rows]).loss)
        resumed = sharding.shard(_model(method, prompt_seed=7))
        if method == "prefix_projection":
            with pytest.raises(ValueError, match="projection MLP"):
                sharding.load_adapter(resumed, os.path.join(out_dir, "adapter"))
        else:
            sharding.load_adapter(resumed, os.path.join(out_dir, "adapter"))
            with torch.no_grad():
                result["resumed_loss"] = float(resumed(input_ids=ids[rows], attention_mask=mask[rows],
                                                       labels=labels[rows]).loss)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("method", ["prefix", "prefix_projection", "prompt"])
@spawning
def test_fsdp2_trains_and_saves_as_one_process(method, tmp_path):
    from peft import PeftModel

    from tests.accelerate_helpers import real_token_logits
    from tests.models import tiny_model

    init = str(tmp_path / "rendezvous")
    run_workers(_fsdp_worker, (2, init, str(tmp_path), method), init_file=init, timeout_s=150)

    # One process, plain PEFT (not accelerated), the whole batch; PEFT's own save_pretrained.
    from tests.accelerate_helpers import make_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = make_peft_model("llama", method)
    single.train()
    expected_losses = torch.stack(_train(single, slice(0, 4)))
    single.save_pretrained(str(tmp_path / "single"))

    layers = single.get_base_model().config.num_hidden_layers
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert_close(torch.tensor(result["losses"]), expected_losses, 1e-5, f"rank {rank} losses")
        # fastpeft's fused attention (sdpa on CPU) ran in every layer of every step, never its reference path.
        assert result["calls"] == {"sdpa": STEPS * layers}
        if method != "prefix_projection":
            assert result["resumed_loss"] == pytest.approx(result["trained_loss"], rel=1e-6)

    # The adapter written from the sharded model is PEFT's file for file.
    from safetensors.torch import load_file

    ours, theirs = tmp_path / "adapter", tmp_path / "single"
    assert sorted(os.listdir(ours)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((ours / "adapter_config.json").read_text()) == \
        json.loads((theirs / "adapter_config.json").read_text())
    saved, expected = load_file(ours / "adapter_model.safetensors"), load_file(theirs / "adapter_model.safetensors")
    assert saved.keys() == expected.keys() == {"prompt_embeddings"}
    assert saved["prompt_embeddings"].dtype == torch.float32
    assert_close(saved["prompt_embeddings"], expected["prompt_embeddings"], 1e-5, "prompt_embeddings")

    # And PEFT loads it: the same logits as the one-process model.
    ids, mask, labels = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(tiny_model("llama", attn_implementation="sdpa"), str(ours))
        single.eval()
        with torch.no_grad():
            got, want = loaded(input_ids=ids, attention_mask=mask).logits, single(input_ids=ids,
                                                                                  attention_mask=mask).logits
    P = single.peft_config["default"].num_virtual_tokens
    assert_close(real_token_logits(got, mask, P), real_token_logits(want, mask, P), 1e-5, "logits")


def _unsharded_prompt_worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    from fastpeft.integration import sharding

    _init(rank, world, init_file)
    try:
        model = _model("prefix_projection")
        base = model.get_base_model()
        for layer in base.model.layers:
            fully_shard(layer)
        fully_shard(base)  # the backbone alone: the prompt encoder stays outside every unit
        ids, mask, labels = _batch()
        with pytest.raises(sharding.UnshardedParameterError, match=r"prompt_encoder\.default\.embedding\.weight"):
            model(input_ids=ids[:2], attention_mask=mask[:2], labels=labels[:2])
        with pytest.raises(sharding.UnshardedParameterError, match="outside every fully_shard unit"):
            sharding.check_sharded(model)
        with torch.no_grad():  # inference needs no reduced gradient
            model(input_ids=ids[:2], attention_mask=mask[:2])
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        torch.distributed.destroy_process_group()


@spawning
def test_a_prompt_parameter_outside_every_unit_is_a_named_error(tmp_path):
    init = str(tmp_path / "rendezvous")
    run_workers(_unsharded_prompt_worker, (2, init, str(tmp_path)), init_file=init, timeout_s=120)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


# ------------------------------------------------------------------------ MultiPrefixTrainer over a sharded backbone


def _multi_trainer(rank):
    """test_multi's DDP trainer, its backbone sharded first when a process group exists. Rank 1's adapters start
    from other values: rank 0's must be broadcast."""
    from peft import PrefixTuningConfig

    from fastpeft.integration import sharding
    from fastpeft.multi import MultiPrefixTrainer
    from tests.models import tiny_model
    from tests.test_multi import DDP_ADAPTERS, LR, WEIGHT_DECAY

    base = tiny_model("llama")
    if torch.distributed.is_initialized():
        sharding.shard(base)
    if rank:
        torch.manual_seed(1000 + rank)
    trainer = MultiPrefixTrainer(base, lr=LR, weight_decay=WEIGHT_DECAY)
    for name, kwargs in DDP_ADAPTERS.items():
        trainer.add_adapter(name, PrefixTuningConfig(**kwargs))
    trainer.model.train()
    return trainer


def _multi_worker(rank, world, init_file, out_dir):
    from fastpeft.observe import attention_calls
    from tests.test_multi import _ddp_run

    _init(rank, world, init_file)
    try:
        trainer = _multi_trainer(rank)
        with attention_calls() as calls:
            result = _ddp_run(trainer, [0, 1, 2] if rank == 0 else [3, 4, 5])
        result["calls"] = dict(calls)
        trainer.save_pretrained(os.path.join(out_dir, "adapters"))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@spawning
def test_multi_prefix_trainer_over_a_sharded_backbone_equals_one_process(tmp_path):
    """test_multi's DDP case (adapters living on one process only, one on none, token counts differing between the
    processes) with the backbone sharded by FSDP2: gradients, per-adapter losses, two steps of each adapter's own
    AdamW and the saved adapters equal one process holding the whole batch."""
    from safetensors.torch import load_file

    from tests.test_multi import DDP_ADAPTERS, _ddp_run, params

    init = str(tmp_path / "rendezvous")
    run_workers(_multi_worker, (2, init, str(tmp_path)), init_file=init, timeout_s=150)
    single_trainer = _multi_trainer(0)
    initial_idle = params(single_trainer.encoder("idle"))
    single = _ddp_run(single_trainer, list(range(6)))
    single_trainer.save_pretrained(tmp_path / "single")
    layers = single_trainer.model.config.num_hidden_layers
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["counts"] == single["counts"]
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-5)
        for name, expected in single["grads"].items():
            for key, value in expected.items():
                assert_close(result["grads"][name][key], value, 1e-5, name=f"rank {rank} {name}.{key}.grad")
        for got, want in zip(result["steps"], single["steps"]):
            assert got["updated"] == want["updated"] == ["a", "b", "c"]
            assert got["adapter_losses"] == pytest.approx(want["adapter_losses"], rel=1e-5)
        for name, expected in single["params"].items():
            for key, value in expected.items():
                assert_close(result["params"][name][key], value, 1e-5, name=f"rank {rank} {name}.{key}")
        for key, value in initial_idle.items():
            assert torch.equal(result["params"]["idle"][key], value)
        # One forward and two steps, each through fastpeft's fused attention in every layer.
        assert result["calls"] == {"sdpa": 3 * layers}
    for name in DDP_ADAPTERS:
        ours, theirs = tmp_path / "adapters" / name, tmp_path / "single" / name
        assert json.loads((ours / "adapter_config.json").read_text()) == \
            json.loads((theirs / "adapter_config.json").read_text())
        assert_close(load_file(ours / "adapter_model.safetensors")["prompt_embeddings"],
                     load_file(theirs / "adapter_model.safetensors")["prompt_embeddings"], 1e-5, name)


def _multi_unsynced_worker(rank, world, init_file, out_dir):
    from peft import PrefixTuningConfig

    from fastpeft.integration import sharding
    from fastpeft.multi import MultiPrefixModel
    from tests.models import tiny_model
    from tests.test_multi import DDP_BATCH

    _init(rank, world, init_file)
    try:
        model = MultiPrefixModel(sharding.shard(tiny_model("llama")))
        model.add_adapter("a", PrefixTuningConfig(num_virtual_tokens=3))
        with pytest.raises(sharding.UnshardedParameterError, match=r"prefix_encoders\.0\.embedding\.weight"):
            model(input_ids=DDP_BATCH["input_ids"][:2], labels=DDP_BATCH["labels"][:2], adapter_ids=[0, 0])
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        torch.distributed.destroy_process_group()


@spawning
def test_multi_prefix_model_with_tables_outside_every_unit_is_a_named_error(tmp_path):
    """A MultiPrefixModel trained by a loop of one's own over a sharded backbone, its tables neither sharded nor
    averaged (MultiPrefixTrainer averages them; Trainer and accelerate shard them with the root)."""
    init = str(tmp_path / "rendezvous")
    run_workers(_multi_unsynced_worker, (2, init, str(tmp_path)), init_file=init, timeout_s=120)
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()


# ---------------------------------------------------------------- transformers.Trainer with its FSDP2 settings


TRAINER_STEPS = 4


def _trainer_rows():
    from tests.accelerate_helpers import batch_and_labels

    # Unpadded rows: every process's half-batch holds as many labelled tokens as the other's.
    ids, mask, labels = batch_and_labels("llama", seed=3, batch=8, length=6, left_pad=(0,) * 8)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(len(ids))]


def _run_trainer(model, output_dir, per_device_batch, fsdp, resume=None):
    """TRAINER_STEPS AdamW steps of transformers.Trainer, a checkpoint every 2 (each with the adapter as PEFT saves
    it); returns the logged losses."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    # Trainer's default state dict for FSDP is the full one: each checkpoint then holds the adapter as PEFT saves it.
    fsdp_args = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}) \
        if fsdp else {}
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=per_device_batch,
                             max_steps=TRAINER_STEPS, learning_rate=1e-2, optim="adamw_torch",
                             lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="steps",
                             save_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             dataloader_num_workers=0, **fsdp_args)
    trainer = Trainer(model=model, args=args, train_dataset=_trainer_rows(), data_collator=default_data_collator)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _trainer_process(rank, world, init_file):
    """A process as torchrun starts one for Trainer (its rank in the environment), with its process group already
    made from a file rendezvous (accelerate then takes it as it is): no port to clash on."""
    from tests.fsdp_on_cpu import allow_fsdp_on_cpu

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    _init(rank, world, init_file)
    allow_fsdp_on_cpu()


def _trainer_worker(rank, world, init_file, out_dir):
    from fastpeft.observe import attention_calls

    _trainer_process(rank, world, init_file)
    with attention_calls() as calls:
        trainer, losses = _run_trainer(_model("prefix_projection"), out_dir, 2, fsdp=True)
    result = {"losses": losses, "calls": dict(calls), "fsdp": trainer.is_fsdp_enabled,
              "parameter_types": sorted({type(p).__name__ for p in trainer.model.parameters()})}
    # Resume from the step-2 checkpoint in a model started elsewhere: steps 3 and 4 again.
    _, result["resumed_losses"] = _run_trainer(_model("prefix_projection", prompt_seed=7), out_dir, 2, fsdp=True,
                                               resume=os.path.join(out_dir, "checkpoint-2"))
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@spawning
def test_trainer_with_fsdp2_equals_one_process(tmp_path):
    """transformers.Trainer with ``fsdp="full_shard"`` and ``fsdp_config={"version": 2, ...}`` (accelerate's FSDP2
    path, taken on CPU through tests/fsdp_on_cpu.py), two processes of 2 rows against one process of 4 rows without
    FSDP: every step's loss, fastpeft's attention in every layer, each checkpoint's adapter (PEFT's files, written by
    the accelerated model's save_pretrained from the Trainer's full state dict) and ``resume_from_checkpoint``."""
    from safetensors.torch import load_file

    out, init = tmp_path / "fsdp", str(tmp_path / "rendezvous")
    run_workers(_trainer_worker, (2, init, str(out)), init_file=init, timeout_s=240)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, expected = _run_trainer(_model("prefix_projection"), tmp_path / "single", 4, fsdp=False)
    layers = 2
    for rank in range(2):
        result = torch.load(out / f"rank{rank}.pt")
        assert result["fsdp"] and result["parameter_types"] == ["DTensor"]
        assert_close(torch.tensor(result["losses"]), torch.tensor(expected), 1e-5, f"rank {rank} losses")
        # The resumed log: steps 1-2 from the checkpoint's trainer state, steps 3-4 computed again.
        assert_close(torch.tensor(result["resumed_losses"]), torch.tensor(expected), 1e-5,
                     f"rank {rank} resumed losses")
        assert result["calls"] == {"sdpa": TRAINER_STEPS * layers}
    for step in (2, 4):
        ours, theirs = out / f"checkpoint-{step}", tmp_path / "single" / f"checkpoint-{step}"
        assert json.loads((ours / "adapter_config.json").read_text()) == \
            json.loads((theirs / "adapter_config.json").read_text())
        assert_close(load_file(ours / "adapter_model.safetensors")["prompt_embeddings"],
                     load_file(theirs / "adapter_model.safetensors")["prompt_embeddings"], 1e-5, f"step {step}")


# ------------------------------------------------------------------- accelerate launch with an FSDP config file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _accelerate_launch(out_dir, *script_args, attempts=2):
    """``accelerate launch --config_file examples/accelerate_fsdp2.yaml`` of tests/fsdp_accelerate_script.py on two
    CPU processes, fp32 (the config's bf16 overridden); a run that fails on a taken port is tried once more on
    another."""
    import random
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo", ACCELERATE_USE_CPU="true", FASTPEFT_TEST_FSDP_ON_CPU="1")
    for attempt in range(attempts):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(ROOT, "examples", "accelerate_fsdp2.yaml"), "--num_processes", "2",
                   "--mixed_precision", "no", "--main_process_port", str(random.randint(20000, 40000)),
                   os.path.join(ROOT, "tests", "fsdp_accelerate_script.py"), "--out", str(out_dir), *script_args]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            return
        if "address already in use" not in result.stderr.lower() or attempt == attempts - 1:
            pytest.fail(f"accelerate launch failed:\n{result.stderr[-4000:]}")


@spawning
def test_accelerate_launch_with_the_fsdp2_config_equals_one_process(tmp_path):
    """The shipped config file (FSDP2, sharded checkpoints): every step's loss equals one process's, fastpeft's
    attention runs in every layer, the adapter written by the model's save_pretrained is PEFT's, and a second launch
    resumed from ``accelerator.save_state`` after step 2 takes step 3 as the first run did."""
    from safetensors.torch import load_file

    from tests.accelerate_helpers import make_peft_model

    _accelerate_launch(tmp_path, "--method", "prefix", "--save-state-at", "2")
    _accelerate_launch(tmp_path, "--method", "prefix", "--save-state-at", "2", "--resume", str(tmp_path / "state"))
    first = json.loads((tmp_path / "result.json").read_text())
    resumed = json.loads((tmp_path / "resumed.json").read_text())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = make_peft_model("llama", "prefix")
    single.train()
    expected = torch.stack(_train(single, slice(0, 4)))
    single.save_pretrained(str(tmp_path / "single"))

    assert first["distributed_type"] == "DistributedType.FSDP" and first["parameter_types"] == ["DTensor"]
    assert_close(torch.tensor(first["losses"]), expected, 1e-5, "losses")
    assert_close(torch.tensor(resumed["losses"]), expected[2:], 1e-5, "resumed losses")
    assert first["calls"] == {"sdpa": STEPS * 2} and resumed["calls"] == {"sdpa": 2}
    expected_prompt = load_file(tmp_path / "single" / "adapter_model.safetensors")["prompt_embeddings"]
    for adapter in ("adapter", "resumed"):
        assert json.loads((tmp_path / adapter / "adapter_config.json").read_text()) == \
            json.loads((tmp_path / "single" / "adapter_config.json").read_text())
        assert_close(load_file(tmp_path / adapter / "adapter_model.safetensors")["prompt_embeddings"],
                     expected_prompt, 1e-5, adapter)


# ------------------------------------------------------------------------------------- mixed precision (bf16)


def _bf16_worker(rank, world, init_file, out_dir, method):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fastpeft.integration import sharding
    from fastpeft.observe import attention_calls
    from tests.accelerate_helpers import make_peft_model
    from tests.models import tiny_model

    _init(rank, world, init_file)
    try:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        rows = slice(2 * rank, 2 * rank + 2)
        result = {}
        for accelerated in (False, True):
            if accelerated:
                model = _model(method)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = make_peft_model("llama", method, base=tiny_model("llama", attn_implementation="sdpa"))
                model.train()
            sharding.shard(model, mp_policy=policy)
            with attention_calls() as calls:
                losses = torch.stack(_train(model, rows)).float()
            torch.distributed.all_reduce(losses)
            prompt = sharding.full_parameters(model.prompt_encoder["default"])
            result["fastpeft" if accelerated else "peft"] = {
                "losses": (losses / world).tolist(), "calls": dict(calls), "prompt": prompt,
                "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("method", ["prefix_projection", "prompt"])
@spawning
def test_bf16_mixed_precision_within_peft_own_error(method, tmp_path):
    """``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: parameters stay float32 shards, layers
    and the prompt encoder compute in bf16, gradients are reduced in float32. The accelerated model's losses and
    trained prompt parameters are as close to one float32 process's as PEFT's own path under the same sharding and
    policy (at most twice its error, plus 1e-3), with fastpeft's attention in every layer."""
    from tests.accelerate_helpers import make_peft_model
    from tests.reference import relative_error

    init = str(tmp_path / "rendezvous")
    run_workers(_bf16_worker, (2, init, str(tmp_path), method), init_file=init, timeout_s=150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = make_peft_model("llama", method)
    single.train()
    exact_losses = torch.stack(_train(single, slice(0, 4)))
    exact_prompt = {name: p.detach() for name, p in single.prompt_encoder["default"].named_parameters()}
    result = torch.load(tmp_path / "rank0.pt")
    ours, peft_bf16 = result["fastpeft"], result["peft"]
    assert ours["dtypes"] == peft_bf16["dtypes"] == ["torch.float32"]
    assert ours["calls"] == {"sdpa": STEPS * 2}
    pairs = [("losses", torch.tensor(ours["losses"]), torch.tensor(peft_bf16["losses"]), exact_losses)]
    pairs += [(name, ours["prompt"][name], peft_bf16["prompt"][name], exact) for name, exact in exact_prompt.items()]
    for what, got, peft_got, exact in pairs:
        ours_error, peft_error = relative_error(got, exact), relative_error(peft_got, exact)
        assert peft_error > 0, f"{what}: PEFT's bf16 run equals float32, the check is void"
        assert ours_error < 2 * peft_error + 1e-3, f"{what}: {ours_error} against PEFT's own {peft_error}"


# ---------------------------------------------------------------------- 4-bit backbone (bitsandbytes, QLoRA-style)


def _four_bit_model(path):
    """The tiny Llama loaded in 4-bit nf4 with ``bnb_4bit_quant_storage=bfloat16`` (the storage FSDP shards as a
    floating tensor, as for QLoRA under FSDP), float32 compute, a prefix-tuning adapter accelerated."""
    import fastpeft
    from tests.accelerate_helpers import make_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_quant_storage=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, attn_implementation="sdpa",
                                                    device_map="cpu")
        model = fastpeft.accelerate(make_peft_model("llama", "prefix", base=base))
    model.train()
    return model


def _four_bit_worker(rank, world, init_file, out_dir, path):
    from fastpeft.integration import sharding
    from fastpeft.observe import attention_calls

    _init(rank, world, init_file)
    try:
        model = sharding.shard(_four_bit_model(path))
        weight = model.get_base_model().model.layers[0].self_attn.q_proj.weight
        with attention_calls() as calls:
            losses = torch.stack(_train(model, slice(2 * rank, 2 * rank + 2)))
        torch.distributed.all_reduce(losses)
        sharding.save_pretrained(model, os.path.join(out_dir, "adapter"))
        torch.save({"losses": (losses / world).tolist(), "calls": dict(calls), "weight": type(weight).__name__,
                    "storage": str(weight.dtype)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@spawning
def test_four_bit_backbone_sharded_equals_one_process(tmp_path):
    """A bitsandbytes 4-bit backbone (Linear4bit layers, bf16 quant storage) sharded with FSDP2 on CPU: its packed
    weights become DTensor shards, each layer gathers them, and the losses and the saved adapter equal one process
    training the same quantized model."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from tests.models import tiny_model

    path = str(tmp_path / "tiny-llama")
    tiny_model("llama").save_pretrained(path)
    init = str(tmp_path / "rendezvous")
    run_workers(_four_bit_worker, (2, init, str(tmp_path), path), init_file=init, timeout_s=150)
    single = _four_bit_model(path)
    assert type(single.get_base_model().model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    expected = torch.stack(_train(single, slice(0, 4)))
    single.save_pretrained(str(tmp_path / "single"))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["weight"] == "DTensor" and result["storage"] == "torch.bfloat16"
        assert_close(torch.tensor(result["losses"]), expected, 1e-5, f"rank {rank} losses")
        assert result["calls"] == {"sdpa": STEPS * 2}
    assert_close(load_file(tmp_path / "adapter" / "adapter_model.safetensors")["prompt_embeddings"],
                 load_file(tmp_path / "single" / "adapter_model.safetensors")["prompt_embeddings"], 1e-5, "adapter")


# ------------------------------------------------------------------------------- one process (run in .ci/run too)


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of this process alone (FSDP2 needs one), destroyed afterwards."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("policy", ["fp32", "bf16"])
def test_fsdp2_in_one_process_counts_every_layer(policy, group_of_one):
    """FSDP2 rebuilds every dataclass among a sharded layer's inputs, and under a MixedPrecisionPolicy copies the
    containers inside while casting: the layers must still read and record through the spec the forward handed
    down (the every-layer check failed on both before), and float32 sharding changes nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from fastpeft.integration import sharding
    from fastpeft.observe import attention_calls

    plain = _model("prefix_projection")
    ids, mask, labels = _batch()
    expected = plain(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if policy == "bf16" else None
    model = sharding.shard(_model("prefix_projection"), mp_policy=mp_policy)
    with attention_calls() as calls:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
    assert calls == {"sdpa": 2}
    grads = [p.grad for p in model.prompt_encoder.parameters()]
    assert all(g is not None and g.full_tensor().abs().sum() > 0 for g in grads)
    loss = loss.detach()
    if policy == "fp32":
        assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    else:
        assert float(loss) == pytest.approx(float(expected), rel=2e-2)


def test_save_pretrained_unsharded_is_peft_and_load_adapter_resumes(tmp_path):
    """Without sharding, sharding.save_pretrained writes PEFT's own files (a second adapter in its subfolder, as PEFT
    does) and load_adapter brings a prompt back; what load_adapter cannot resume is refused by name."""
    from safetensors.torch import load_file

    from fastpeft.integration import sharding
    from tests.accelerate_helpers import peft_config

    model = _model("prefix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", peft_config("prefix", "llama", num_virtual_tokens=3))
    sharding.save_pretrained(model, tmp_path / "ours")
    type(model).save_pretrained(model, str(tmp_path / "peft"))
    for sub in ("", "other"):
        ours, theirs = tmp_path / "ours" / sub, tmp_path / "peft" / sub
        assert json.loads((ours / "adapter_config.json").read_text()) == \
            json.loads((theirs / "adapter_config.json").read_text())
        assert torch.equal(load_file(ours / "adapter_model.safetensors")["prompt_embeddings"],
                           load_file(theirs / "adapter_model.safetensors")["prompt_embeddings"])

    resumed = _model("prefix", prompt_seed=7)
    sharding.load_adapter(resumed, tmp_path / "ours")
    assert torch.equal(resumed.prompt_encoder["default"].embedding.weight,
                       model.prompt_encoder["default"].embedding.weight)
    with pytest.raises(ValueError, match=r"shape \(3, 256\), adapter 'default' holds \(4, 256\)"):
        sharding.load_adapter(resumed, tmp_path / "ours" / "other")
    with pytest.raises(ValueError, match="PREFIX_TUNING adapter; adapter 'default' is PROMPT_TUNING"):
        sharding.load_adapter(_model("prompt"), tmp_path / "ours")
    with pytest.raises(ValueError, match="projection MLP"):
        sharding.load_adapter(_model("prefix_projection"), tmp_path / "ours")
    with pytest.raises(ValueError, match="selected_adapters: the model has no adapter 'nope'"):
        sharding.save_pretrained(model, tmp_path / "x", selected_adapters=["nope"])


def test_shard_needs_a_process_group():
    from fastpeft.integration import sharding

    with pytest.raises(ValueError, match="initialised process group"):
        sharding.shard(_model("prefix"))


# ----------------------------------------------------- MultiPrefixModel under transformers.Trainer with FSDP2


# test_multi_model's adapters with rows (one projected). Not its idle adapter: under FSDP2, Trainer's resume loads the
# optimizer state through torch's set_optimizer_state_dict, which refuses a trainable parameter that has none ("Missing
# optimizer state for parameter 'prefix_encoders.2.embedding.weight'"), as an adapter never stepped has none.
TRAINER_ADAPTERS = ("short", "projected")


def _multi_model():
    """TRAINER_ADAPTERS on the tiny Llama, the same everywhere."""
    from peft import PrefixTuningConfig

    from fastpeft.multi import MultiPrefixModel
    from tests.models import tiny_model
    from tests.test_multi_model import ADAPTERS

    model = MultiPrefixModel(tiny_model("llama"))
    for i, name in enumerate(TRAINER_ADAPTERS):
        torch.manual_seed(200 + i)
        model.add_adapter(name, PrefixTuningConfig(task_type="CAUSAL_LM", **ADAPTERS[name]))
    return model


def _run_multi_model_trainer(output_dir, per_device_batch, fsdp, resume=None):
    """Two AdamW steps of Trainer over test_multi_model's records (the whole set every step), a checkpoint after each
    with SaveAdaptersCallback's PEFT directories; returns the logged losses."""
    from transformers import Trainer, TrainingArguments

    from fastpeft.data import AdapterBatchCollator
    from fastpeft.multi import SaveAdaptersCallback
    from tests.test_multi_model import RECORDS

    model = _multi_model()
    fsdp_args = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}) \
        if fsdp else {}
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=per_device_batch, max_steps=2,
                             learning_rate=1e-2, optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="constant",
                             warmup_steps=0, max_grad_norm=0.0, logging_steps=1, save_strategy="steps", save_steps=1,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
                             **fsdp_args)
    trainer = Trainer(model=model, args=args, train_dataset=RECORDS,
                      data_collator=AdapterBatchCollator(model.adapters, pad_token_id=0),
                      callbacks=[SaveAdaptersCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _multi_model_trainer_worker(rank, world, init_file, out_dir):
    from fastpeft.observe import attention_calls

    _trainer_process(rank, world, init_file)
    with attention_calls() as calls:
        losses = _run_multi_model_trainer(os.path.join(out_dir, "run"), 3, fsdp=True)
    resumed = _run_multi_model_trainer(os.path.join(out_dir, "resumed"), 3, fsdp=True,
                                       resume=os.path.join(out_dir, "run", "checkpoint-1"))
    torch.save({"losses": losses, "resumed": resumed, "calls": dict(calls)}, os.path.join(out_dir, f"rank{rank}.pt"))


@spawning
def test_multi_prefix_model_under_trainer_with_fsdp2_equals_one_process(tmp_path):
    """MultiPrefixModel (encoders and backbone sharded whole by Trainer's FSDP2), three rows per process against one
    process holding all six: logged losses, the adapters SaveAdaptersCallback writes (gathered from the shards) and a
    resume from checkpoint-1."""
    from safetensors.torch import load_file

    init = str(tmp_path / "rendezvous")
    run_workers(_multi_model_trainer_worker, (2, init, str(tmp_path)), init_file=init, timeout_s=240)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _run_multi_model_trainer(tmp_path / "single", 6, fsdp=False)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["losses"] == pytest.approx(expected, rel=1e-5)
        assert result["resumed"] == pytest.approx(expected, rel=1e-5)
        assert result["calls"] == {"sdpa": 2 * 2}
    for run in ("run", "resumed"):
        for name in TRAINER_ADAPTERS:
            ours = tmp_path / run / "checkpoint-2" / name
            theirs = tmp_path / "single" / "checkpoint-2" / name
            assert json.loads((ours / "adapter_config.json").read_text()) == \
                json.loads((theirs / "adapter_config.json").read_text())
            assert_close(load_file(ours / "adapter_model.safetensors")["prompt_embeddings"],
                         load_file(theirs / "adapter_model.safetensors")["prompt_embeddings"], 1e-5, f"{run} {name}")
