"""Training suite: one prefix-tuning step (forward, backward, AdamW) with PEFT alone and with
``fastpeft.accelerate``, on the same model, batch and prefix.

GPU: a Llama-style 1.1B model (``models.LLAMA_1B_CONFIG``) in bfloat16, B=8, L=1024, P=64. CPU: the
built-in small model, a smoke run. Providers:

- ``peft``: ``get_peft_model`` with ``PrefixTuningConfig``; attention through SDPA with the materialized mask.
- ``fastpeft``: the same PeftModel after ``fastpeft.accelerate``.
- ``fastpeft+ckpt``: plus gradient checkpointing of the backbone, which PEFT refuses for prefix tuning.

Metrics: step time, tokens/s (``B * L`` real tokens per step), peak memory, speedup over ``peft``, and
parity of the accelerated model against PEFT before any step: the relative error of the loss and of the
prefix parameters' gradient.
"""

import torch

from . import harness
from ..integration.checkpointing import set_checkpointing
from .models import build_causal_lm, random_batch

SUITE = "training"
BASELINE = "peft"


def settings(device, quick):
    if device.type == "cuda":
        return dict(B=8, L=1024, P=64, dtype="bfloat16", warmup=1 if quick else 2, reps=3 if quick else 6)
    return dict(B=2, L=32 if quick else 64, P=8, dtype="float32", warmup=1 if quick else 2, reps=2 if quick else 6)


def _loss_and_grad(model, batch):
    """(loss, gradient of the prompt parameters flattened) of one forward/backward, gradients cleared after."""
    loss = model(**batch).loss
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters)
    return loss.detach().float(), torch.cat([g.flatten().float() for g in grads])


def run(recorder, device, quick=False):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    cfg = settings(device, quick)
    dtype = getattr(torch, cfg["dtype"])
    base, description = build_causal_lm(device, dtype)
    recorder.log(f"[training] {description}; B={cfg['B']} L={cfg['L']} P={cfg['P']} {cfg['dtype']}")
    shape = {"model": description, "B": cfg["B"], "L": cfg["L"], "P": cfg["P"], "dtype": cfg["dtype"],
             "method": "prefix tuning"}
    case = f"prefix B{cfg['B']} L{cfg['L']} P{cfg['P']} {cfg['dtype']}"
    input_ids, attention_mask = random_batch(base.config.vocab_size, cfg["B"], cfg["L"], device)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}
    tokens_per_step = int(attention_mask.sum())

    torch.manual_seed(0)
    model = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg["P"]))
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def measure(label):
        timing = harness.time_calls(step, device, warmup=cfg["warmup"], reps=cfg["reps"])
        recorder.add_time(SUITE, case, shape, label, timing)
        recorder.add(SUITE, case, shape, label, "throughput", tokens_per_step / (timing.median_ms * 1e-3),
                     "tokens/s")
        peak = harness.peak_memory_bytes(step, device)
        if peak is not None:
            recorder.add(SUITE, case, shape, label, "peak_memory", peak / 2**20, "MiB")
        return timing

    try:
        import fastpeft
        accelerate, restore = fastpeft.accelerate, fastpeft.restore
    except (ImportError, AttributeError) as exc:
        accelerate = restore = None
        recorder.note(f"fastpeft providers skipped: fastpeft.accelerate is unavailable ({exc})")

    # Parity first, on the untrained prefix: PEFT's loss and gradient, then the accelerated model's.
    reference_loss, reference_grad = _loss_and_grad(model, batch)
    parity = {}
    if accelerate is not None:
        try:
            accelerate(model)
            loss, grad = _loss_and_grad(model, batch)
            restore(model)
            parity = {"parity_loss": harness.relative_error(loss, reference_loss),
                      "parity_grad": harness.relative_error(grad, reference_grad)}
        except Exception as exc:  # report, keep the baseline's numbers
            recorder.note(f"fastpeft.accelerate failed: {exc.__class__.__name__}: {str(exc).strip()[:300]}")
            accelerate = None

    baseline = measure(BASELINE)
    for metric, error in parity.items():
        recorder.add(SUITE, case, shape, "fastpeft", metric, error, "rel",
                     reference="PEFT, same model, prefix and batch")
    recorder.note("peft+ckpt: not measured, PEFT refuses gradient checkpointing with prefix tuning (peft#869)")
    if accelerate is None:
        return
    try:
        accelerate(model)
        model.train()
        timing = measure("fastpeft")
        recorder.add(SUITE, case, shape, "fastpeft", "speedup", baseline.median_ms / timing.median_ms, "x")
        set_checkpointing(model.get_base_model(), True)
        timing = measure("fastpeft+ckpt")
        recorder.add(SUITE, case, shape, "fastpeft+ckpt", "speedup", baseline.median_ms / timing.median_ms, "x")
    except Exception as exc:  # report, keep the baseline's numbers
        recorder.note(f"fastpeft training step failed: {exc.__class__.__name__}: {str(exc).strip()[:300]}")
    finally:
        set_checkpointing(model.get_base_model(), False)
        restore(model)
