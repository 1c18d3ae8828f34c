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

PEFT, fastpeft and fastpeft+ckpt train three copies of the same model (same seed, prefix and batch; one copy per
provider, so that enabling checkpointing, which also hooks the input embeddings, touches only its own), and their
steps are interleaved (PEFT, fastpeft, fastpeft+ckpt, then again), so a change of machine load during the run reaches
every provider alike. Each timed step follows an untimed step of the same copy (``lead_in=1``), as every step of a
training run follows one of the same model: timed right after another copy's step, a step starts with that copy's
data in the caches (at L=64 on CPU this alone moved fastpeft from 0.99x to 0.96x of PEFT). ``length`` (``fastpeft bench --length``) replaces the default sequence length.

A second case trains mixed tenants on an encoder-decoder (``models.build_seq2seq_lm``: t5-base's shape in bfloat16 on
CUDA, the built-in small T5 on CPU): three tenants, one of each kind PEFT trains there (prompt tuning P=20, prefix
tuning P=10, p-tuning P=8), ``B`` rows of ``L`` encoder tokens and ``T`` targets each. ``peft``: three PEFT models,
one AdamW step per tenant on its own rows; ``fastpeft``: one ``MultiPrefixTrainer`` step on the three tenants' rows
mixed in one batch (each tenant its own AdamW). Parity before any step: the largest relative error over the tenants
of the loss and of the prompt parameters' gradient, against PEFT in the same dtype on CUDA, and on CPU against PEFT in
float64, for PEFT's float32 run too (on the built-in T5 at L=64 PEFT's own float32 gradient of the prefix lies 5.9e-3
from its float64 one, the fused path's 2.6e-5). The mixed encoder batch is as wide as its longest row (prompt
rows carry 20 virtual tokens, prefix rows none), which the per-tenant batches are not.
"""

import copy

import torch

from . import harness
from ..integration.checkpointing import set_checkpointing
from ..training_loop import Updater, optimizer_step
from .models import build_causal_lm, random_batch

SUITE = "training"
BASELINE = "peft"


def settings(device, quick, length=None):
    if device.type == "cuda":
        cfg = dict(B=8, L=1024, P=64, dtype="bfloat16", warmup=1 if quick else 2, reps=3 if quick else 6)
    else:
        cfg = dict(B=2, L=32 if quick else 64, P=8, dtype="float32", warmup=1 if quick else 2,
                   reps=2 if quick else 6)
    if length is not None:
        cfg["L"] = length
    if device.type != "cuda" and not quick and cfg["L"] <= 256:
        # A CPU step this short takes ~20-70 ms and its time moves by a few percent from one step to the next
        # (caches, the other process on the machine): a median of 30 is stable to ~1%, one of 6 is not.
        cfg["reps"] = 30
    return cfg


def _loss_and_grad(model, batch):
    """(loss, gradient of the prompt parameters flattened) of one forward/backward, gradients cleared after."""
    loss = model(**batch).loss
    parameters = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters)
    return loss.detach().float(), torch.cat([g.flatten().float() for g in grads])


def _prefix_model(device, dtype, P):
    """(the small model or the 1.1B one with a fresh prefix-tuning adapter, its description): same seeds, so two
    calls give two identical models."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    base, description = build_causal_lm(device, dtype)
    torch.manual_seed(0)
    model = get_peft_model(base, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P))
    model.train()
    return model, description


def _stepper(model, batch):
    """One training step (forward, backward, AdamW: ``training_loop.optimizer_step``) of ``model``'s trainable
    parameters."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    updater = Updater(parameters, torch.optim.AdamW(parameters, lr=1e-3))

    def step():
        output, _ = optimizer_step(lambda: model(**batch), [updater])
        return output.loss
    return step


def run(recorder, device, quick=False, length=None):
    _run_prefix_step(recorder, device, quick, length)
    _run_mixed_seq2seq(recorder, device, quick)


def _seq2seq_tenants(hidden_size):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    task = TaskType.SEQ_2_SEQ_LM
    return {"prompt": PromptTuningConfig(task_type=task, num_virtual_tokens=20),
            "prefix": PrefixTuningConfig(task_type=task, num_virtual_tokens=10),
            "p-tuning": PromptEncoderConfig(task_type=task, num_virtual_tokens=8, encoder_hidden_size=hidden_size)}


def _run_mixed_seq2seq(recorder, device, quick):
    from peft import get_peft_model

    from .models import build_seq2seq_lm

    if device.type == "cuda":
        cfg = dict(B=8, L=512, T=128, dtype="bfloat16", warmup=1 if quick else 2, reps=3 if quick else 6)
    else:
        cfg = dict(B=8, L=32 if quick else 64, T=16, dtype="float32", warmup=1, reps=2 if quick else 15)
    dtype = getattr(torch, cfg["dtype"])
    base, description = build_seq2seq_lm(device, dtype)
    tenants = _seq2seq_tenants(base.config.d_model)
    recorder.log(f"[training] mixed encoder-decoder tenants: {description}; {len(tenants)} tenants x B={cfg['B']} "
                 f"L={cfg['L']} T={cfg['T']} {cfg['dtype']}")
    shape = {"model": description, "tenants": len(tenants), "B": cfg["B"], "L": cfg["L"], "T": cfg["T"],
             "dtype": cfg["dtype"], "method": "prompt P=20, prefix P=10, p-tuning P=8"}
    case = f"mixed seq2seq tenants x{len(tenants)} B{cfg['B']} L{cfg['L']} T{cfg['T']} {cfg['dtype']}"
    batches = {}
    for i, name in enumerate(tenants):
        input_ids, attention_mask = random_batch(base.config.vocab_size, cfg["B"], cfg["L"], device, seed=i)
        labels, _ = random_batch(base.config.vocab_size, cfg["B"], cfg["T"], device, seed=100 + i)
        batches[name] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    peft_models = {}
    for name, config in tenants.items():
        torch.manual_seed(0)
        peft_models[name] = get_peft_model(build_seq2seq_lm(device, dtype)[0], config).train()
    updaters = {name: Updater(ps, torch.optim.AdamW(ps, lr=1e-3))
                for name, ps in ((n, [p for p in m.parameters() if p.requires_grad]) for n, m in peft_models.items())}

    def peft_step():
        for name, model in peft_models.items():
            optimizer_step(lambda: model(**batches[name]), [updaters[name]])

    steps = {BASELINE: peft_step}
    try:
        import fastpeft

        trainer = fastpeft.MultiPrefixTrainer(base, lr=1e-3)
        for name, model in peft_models.items():
            trainer.add_adapter(name, model)  # PEFT's initial values
        trainer.model.train()
        names = [name for name in tenants for _ in range(cfg["B"])]
        mixed = {key: torch.cat([batches[name][key] for name in tenants]) for key in batches[names[0]]}
        # On CPU the truth is PEFT in float64 (PEFT's float32 run is measured against it too).
        in_float64 = device.type == "cpu"
        reference_name = "PEFT per tenant on its own rows, same model and initial values" + (
            ", in float64" if in_float64 else "")
        errors = {"fastpeft": ([], []), BASELINE: ([], [])}
        out = trainer(mixed["input_ids"], names, attention_mask=mixed["attention_mask"], labels=mixed["labels"])
        for name, model in peft_models.items():
            reference = copy.deepcopy(model).double() if in_float64 else model
            reference_loss, reference_grad = _loss_and_grad(reference, batches[name])
            grad = torch.autograd.grad(out.loss, list(trainer.encoder(name).parameters()), retain_graph=True)
            measured = {"fastpeft": (torch.tensor(out.adapter_losses[name]),
                                     torch.cat([g.flatten().float() for g in grad]))}
            if in_float64:
                measured[BASELINE] = _loss_and_grad(model, batches[name])
            for provider, (loss, gradient) in measured.items():
                errors[provider][0].append(harness.relative_error(loss.cpu(), reference_loss.cpu()))
                errors[provider][1].append(harness.relative_error(gradient, reference_grad))
        for provider, (loss_errors, grad_errors) in errors.items():
            for metric, values in (("parity_loss", loss_errors), ("parity_grad", grad_errors)):
                if values:
                    recorder.add(SUITE, case, shape, provider, metric, max(values), "rel", reference=reference_name)
        del out

        def fastpeft_step():
            trainer.training_step(mixed["input_ids"], names, attention_mask=mixed["attention_mask"],
                                  labels=mixed["labels"])
        steps["fastpeft"] = fastpeft_step
    except Exception as exc:  # report, keep the baseline's numbers
        recorder.note(f"MultiPrefixTrainer on {description} failed: {exc.__class__.__name__}: "
                      f"{str(exc).strip()[:300]}")
    timings = harness.time_interleaved(steps, device, warmup=cfg["warmup"], reps=cfg["reps"], lead_in=1)
    tokens_per_step = len(tenants) * cfg["B"] * (cfg["L"] + cfg["T"])
    for label, timing in timings.items():
        recorder.add_time(SUITE, case, shape, label, timing)
        recorder.add(SUITE, case, shape, label, "throughput", tokens_per_step / (timing.median_ms * 1e-3), "tokens/s")
        peak = harness.peak_memory_bytes(steps[label], device)
        if peak is not None:
            recorder.add(SUITE, case, shape, label, "peak_memory", peak / 2**20, "MiB")
        if label != BASELINE:
            recorder.add(SUITE, case, shape, label, "speedup", timings[BASELINE].median_ms / timing.median_ms, "x")


def _run_prefix_step(recorder, device, quick, length):
    cfg = settings(device, quick, length)
    dtype = getattr(torch, cfg["dtype"])
    model, description = _prefix_model(device, dtype, cfg["P"])
    recorder.log(f"[training] {description}; B={cfg['B']} L={cfg['L']} P={cfg['P']} {cfg['dtype']}")
    shape = {"model": description, "B": cfg["B"], "L": cfg["L"], "P": cfg["P"], "dtype": cfg["dtype"],
             "method": "prefix tuning"}
    case = f"prefix B{cfg['B']} L{cfg['L']} P{cfg['P']} {cfg['dtype']}"
    input_ids, attention_mask = random_batch(model.config.vocab_size, cfg["B"], cfg["L"], device)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids}
    tokens_per_step = int(attention_mask.sum())
    steps = {BASELINE: _stepper(model, batch)}
    recorder.note("peft+ckpt: not measured, PEFT refuses gradient checkpointing with prefix tuning (peft#869)")

    # Parity first, on the untrained prefixes: PEFT's loss and gradient, then the accelerated copy's.
    reference_loss, reference_grad = _loss_and_grad(model, batch)
    try:
        import fastpeft

        accelerated, _ = _prefix_model(device, dtype, cfg["P"])
        fastpeft.accelerate(accelerated)
        accelerated.train()
        loss, grad = _loss_and_grad(accelerated, batch)
        for metric, error in (("parity_loss", harness.relative_error(loss, reference_loss)),
                              ("parity_grad", harness.relative_error(grad, reference_grad))):
            recorder.add(SUITE, case, shape, "fastpeft", metric, error, "rel",
                         reference="PEFT, same model, prefix and batch")
        steps["fastpeft"] = _stepper(accelerated, batch)
        # Its own copy: enabling checkpointing also makes transformers hook the input embeddings so that their output
        # requires grad (enable_input_require_grads), which disabling it does not undo. Toggling one copy left the
        # plain fastpeft steps computing that gradient too (on the CPU model ~5% of a step).
        checkpointed, _ = _prefix_model(device, dtype, cfg["P"])
        fastpeft.accelerate(checkpointed)
        checkpointed.train()
        set_checkpointing(checkpointed.get_base_model(), True)
        steps["fastpeft+ckpt"] = _stepper(checkpointed, batch)
    except Exception as exc:  # report, keep the baseline's numbers
        recorder.note(f"fastpeft.accelerate failed: {exc.__class__.__name__}: {str(exc).strip()[:300]}")
        steps = {BASELINE: steps[BASELINE]}

    try:
        timings = harness.time_interleaved(steps, device, warmup=cfg["warmup"], reps=cfg["reps"], lead_in=1)
    except Exception as exc:  # report, keep the baseline's numbers
        recorder.note(f"fastpeft training step failed: {exc.__class__.__name__}: {str(exc).strip()[:300]}")
        steps = {BASELINE: steps[BASELINE]}
        timings = harness.time_interleaved(steps, device, warmup=cfg["warmup"], reps=cfg["reps"], lead_in=1)
    for label, timing in timings.items():
        recorder.add_time(SUITE, case, shape, label, timing)
        recorder.add(SUITE, case, shape, label, "throughput", tokens_per_step / (timing.median_ms * 1e-3),
                     "tokens/s")
        peak = harness.peak_memory_bytes(steps[label], device)
        if peak is not None:
            recorder.add(SUITE, case, shape, label, "peak_memory", peak / 2**20, "MiB")
        if label != BASELINE:
            recorder.add(SUITE, case, shape, label, "speedup", timings[BASELINE].median_ms / timing.median_ms, "x")
