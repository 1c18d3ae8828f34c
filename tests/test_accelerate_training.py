"""Training an accelerated PEFT model: gradient checkpointing (which PEFT refuses for prefix tuning), under
transformers.Trainer, and under DistributedDataParallel (2 CPU processes, gloo)."""

import warnings

import pytest
import torch

import fastpeft
from fastpeft.integration.compat import checkpointing_names
from fastpeft.integration import attention
from tests.accelerate_helpers import (assert_same_step, assert_same_updates, batch_and_labels, make_peft_model,
                                      training_step)
from tests.distributed import run_workers
from tests.reference import assert_close


def _count_attention_calls(monkeypatch):
    calls = []
    original = attention.fastpeft_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, attention.ATTN_IMPLEMENTATION, counting)
    return calls


@pytest.mark.parametrize("family,method", [("llama", "prefix_projection"), ("gpt2", "prefix"), ("bert", "prefix"),
                                           ("qwen3", "prompt")])
def test_gradient_checkpointing_matches_peft_without(family, method, monkeypatch):
    peft_model = make_peft_model(family, method)
    ids, mask, labels = batch_and_labels(family)
    expected = training_step(peft_model, ids, mask, labels)

    fastpeft.accelerate(peft_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.get_base_model().gradient_checkpointing_enable()
    calls = _count_attention_calls(monkeypatch)
    assert_same_step(training_step(peft_model, ids, mask, labels), expected, what="checkpointed")
    # Each layer's attention ran twice: in the forward and again in the backward's recomputation.
    assert len(calls) == 2 * peft_model.get_base_model().config.num_hidden_layers


def test_reentrant_checkpointing_is_refused_with_the_fix():
    peft_model = fastpeft.accelerate(make_peft_model("llama", "prefix"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": True})
    ids, mask, labels = batch_and_labels("llama")
    # The fix is spelled with the installed transformers' names (5.2x deprecated gradient_checkpointing_kwargs).
    method, keyword = checkpointing_names(peft_model.get_base_model())
    with pytest.raises(ValueError, match=rf"model\.{method}\({keyword}=\{{'use_reentrant': False\}}\)"):
        training_step(peft_model, ids, mask, labels)


def _train_with_trainer(peft_model, output_dir, gradient_checkpointing):
    """Three SGD steps of transformers.Trainer over 8 left-padded rows; returns the logged losses."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    ids, mask, labels = batch_and_labels("llama", seed=3, batch=8, length=6, left_pad=(0, 2, 1, 0, 3, 0, 1, 2))
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(len(ids))]
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", warmup_steps=0,
                             weight_decay=0.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0, disable_tqdm=True, gradient_checkpointing=gradient_checkpointing,
                             dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=default_data_collator)
        trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_with_gradient_checkpointing_matches_peft(tmp_path):
    """PEFT (no checkpointing: it refuses it) and the accelerated model with checkpointing take the same
    steps under transformers.Trainer."""
    results = {}
    for accelerated in (False, True):
        peft_model = make_peft_model("llama", "prefix_projection")
        if accelerated:
            fastpeft.accelerate(peft_model)
        initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        losses = _train_with_trainer(peft_model, tmp_path / str(accelerated), gradient_checkpointing=accelerated)
        deltas = {n: p.detach() - initial[n] for n, p in peft_model.named_parameters() if p.requires_grad}
        results[accelerated] = losses, deltas
    assert_same_updates(results, "Trainer")


_DDP_BATCH = dict(batch=4, length=6, left_pad=(0, 3, 1, 2))


def _ddp_worker(rank, world_size, init_file, out_path):
    """One DDP rank: the same accelerated model on every rank, rank r trains on rows [2r, 2r+2)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        peft_model = fastpeft.accelerate(make_peft_model("llama", "prefix_projection"))
        peft_model.train()
        ddp_model = DistributedDataParallel(peft_model)
        ids, mask, labels = batch_and_labels("llama", **_DDP_BATCH)
        rows = slice(2 * rank, 2 * rank + 2)
        ddp_model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss.backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}, out_path)
        # Let gloo finish its work items, and drop DDP's reducer, before the process group goes: destroying the
        # group from the reducer's destructor can deadlock with a gloo thread that needs the GIL.
        dist.barrier()
        del ddp_model
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path):
    """DDP averages the two ranks' gradients: they must equal plain PEFT's gradient of the mean of the two
    half-batch losses in one process."""
    out_path = tmp_path / "grads.pt"
    run_workers(_ddp_worker, (2, str(tmp_path / "init"), str(out_path)), init_file=str(tmp_path / "init"))
    ddp_grads = torch.load(out_path)

    peft_model = make_peft_model("llama", "prefix_projection")
    peft_model.train()
    ids, mask, labels = batch_and_labels("llama", **_DDP_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = sum(peft_model(input_ids=ids[r], attention_mask=mask[r], labels=labels[r]).loss
                   for r in (slice(0, 2), slice(2, 4))) / 2
    loss.backward()
    expected = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert ddp_grads.keys() == expected.keys()
    for name in expected:
        assert_close(ddp_grads[name], expected[name], 1e-5, f"DDP grad {name}")


def test_training_loop_converges_like_peft():
    """A plain torch loop (Adam, 5 steps) gives the same loss curve with and without fastpeft."""
    curves = []
    for accelerated in (False, True):
        peft_model = make_peft_model("qwen2", "prefix")
        if accelerated:
            fastpeft.accelerate(peft_model)
        optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        ids, mask, labels = batch_and_labels("qwen2")
        curve = []
        for _ in range(5):
            loss, _, _ = training_step(peft_model, ids, mask, labels)
            optimizer.step()
            curve.append(float(loss))
        curves.append(curve)
    assert curves[0][-1] < curves[0][0]
    assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), 1e-5, "loss curve")

