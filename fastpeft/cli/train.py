"""``fastpeft train``: prefix / prompt / p-tuning of a causal LM, or of an encoder-decoder LM (T5, MT5, BART) on
prompt/completion examples, on a text or JSONL file -> a PEFT adapter directory (one per task when the data names
several tasks)."""

import contextlib
import json
import os
import shutil
import tempfile
import time

from .. import loading
from . import common, demo

DEFAULT_LR = 1e-2
METHODS = ("prefix", "prefix-projection", "prompt", "ptuning")
BASE_MODEL_SUBDIR = "base-model"


def add_parser(sub):
    train = sub.add_parser(
        "train", help="train a prefix / prompt / p-tuning adapter (PEFT format)",
        description="Train a soft prompt on a causal LM with PEFT, accelerated by fastpeft.accelerate, and save "
                    "a PEFT adapter (loadable with PeftModel.from_pretrained) plus train_log.json. Data: a text "
                    "file (one example per line) or JSONL with {\"text\": ...} or {\"prompt\": ..., "
                    "\"completion\": ...} (loss on the completion only). An encoder-decoder --model (T5, MT5, "
                    "BART) trains on prompt/completion examples: the prompt is the encoder's input, the completion "
                    "the decoder's target. Examples with a \"task\" train one adapter per task in shared batches "
                    "(fastpeft.MultiPrefixTrainer). Without --model, the built-in small model (fastpeft.tiny) is "
                    "used and saved to OUT/base-model.")
    train.add_argument("--method", choices=METHODS, default="prefix",
                       help="prefix: prefix tuning; prefix-projection: prefix tuning with the MLP "
                            "reparametrization; prompt: prompt tuning; ptuning: p-tuning (default: prefix)")
    train.add_argument("--model", metavar="DIR", help="base model directory (transformers format); "
                       "default: the built-in small model")
    train.add_argument("--data", metavar="FILE", help="training data (.txt, or .jsonl); default: the built-in "
                       "task (two kinds of prompts, one answer each), scored on held-out prompts after training")
    train.add_argument("--virtual-tokens", type=int, default=16, metavar="N",
                       help="number of virtual tokens P (default: 16)")
    train.add_argument("--out", metavar="DIR", required=True,
                       help="output directory for the adapter; written only when training succeeds (an existing "
                            "non-empty DIR is refused unless --overwrite)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    train.add_argument("--lr", type=float, help=f"AdamW learning rate (default: {DEFAULT_LR}; "
                       f"{demo.LEARNING_RATE} on the built-in task)")
    train.add_argument("--epochs", type=float, help="passes over the data (default: 1)")
    train.add_argument("--max-steps", type=int, metavar="N",
                       help=f"stop after N optimizer steps (overrides --epochs; default on the built-in task: "
                            f"{demo.STEPS})")
    train.add_argument("--batch-size", type=int, default=8, help="rows per step (default: 8)")
    train.add_argument("--max-length", type=int, default=512, help="truncate examples to this many tokens "
                       "(default: 512)")
    quant = train.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="load the base model in 4-bit (bitsandbytes)")
    quant.add_argument("--load-in-8bit", action="store_true", help="load the base model in 8-bit (bitsandbytes)")
    train.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute the backbone's activations in the backward (PEFT refuses this for "
                            "prefix tuning; with fastpeft.accelerate it works)")
    train.add_argument("--no-accelerate", action="store_true",
                       help="train with plain PEFT (no fastpeft.accelerate), e.g. to compare")
    common.add_device_arguments(train)
    train.add_argument("--seed", type=int, default=0, help="seed of the prompt initialization and data order")
    train.set_defaults(func=run)



def _peft_config(method, virtual_tokens, hidden_size, encoder_decoder=False):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    task_type = TaskType.SEQ_2_SEQ_LM if encoder_decoder else TaskType.CAUSAL_LM
    if method == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=virtual_tokens)
    if method == "prefix-projection":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=virtual_tokens,
                                  prefix_projection=True, encoder_hidden_size=hidden_size)
    if method == "prompt":
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=virtual_tokens)
    return PromptEncoderConfig(task_type=task_type, num_virtual_tokens=virtual_tokens,
                               encoder_hidden_size=hidden_size)


def _is_encoder_decoder(args):
    """Whether ``--model`` is an encoder-decoder LM (its config says ``is_encoder_decoder``); the built-in model is
    not."""
    if args.model is None:
        return False
    config = common.read_json(os.path.join(args.model, "config.json"), "--model")
    return bool(isinstance(config, dict) and config.get("is_encoder_decoder"))


def _validate_train_args(args):
    if args.data is not None and not os.path.isfile(args.data):
        raise common.CLIError(f"--data {args.data}: no such file")
    if args.model is not None:
        common.require_model_dir(args.model)
    args.encoder_decoder = _is_encoder_decoder(args)
    if args.encoder_decoder and args.data is None:
        raise common.CLIError(f"--model {args.model} is an encoder-decoder; the built-in task is for causal LMs: pass "
                              "--data with {\"prompt\": ..., \"completion\": ...} examples")
    for flag, value, low in (("--virtual-tokens", args.virtual_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-length", args.max_length, 2)):
        if value < low:
            raise common.CLIError(f"{flag} must be at least {low}, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        raise common.CLIError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.epochs is not None and args.epochs <= 0:
        raise common.CLIError(f"--epochs must be positive, got {args.epochs}")
    if args.lr is not None and not args.lr > 0:
        raise common.CLIError(f"--lr must be positive, got {args.lr}")
    built_in = args.data is None
    if args.lr is None:
        args.lr = demo.LEARNING_RATE if built_in else DEFAULT_LR
    if args.epochs is None:
        args.epochs = 1.0
        if built_in and args.max_steps is None:
            args.max_steps = demo.STEPS
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise common.CLIError(f"--out {args.out} exists and is not a directory")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        raise common.CLIError(f"--out {args.out} exists and is not empty; pass --overwrite to replace it")
    from ..version import installed_version

    if (args.load_in_4bit or args.load_in_8bit) and installed_version("bitsandbytes") is None:
        raise common.CLIError("--load-in-4bit/--load-in-8bit need bitsandbytes (pip install bitsandbytes)")
    if args.gradient_checkpointing and args.no_accelerate and args.method.startswith("prefix"):
        raise common.CLIError("PEFT refuses gradient checkpointing with prefix tuning; drop --no-accelerate "
                       "(fastpeft.accelerate supports it) or --gradient-checkpointing")
    if not args.no_accelerate:
        import importlib.util
        if importlib.util.find_spec("fastpeft.integration.peft") is None:
            raise common.CLIError("fastpeft.accelerate is not in this install (fastpeft/integration/peft/ is "
                           "missing); pass --no-accelerate to train with plain PEFT")


def _load_training_examples(args):
    """The examples of ``--data`` (or the built-in lines) and the task names they use (empty: one adapter).

    A file whose examples name two or more tasks trains one prefix per task (``fastpeft.MultiPrefixTrainer``);
    then every example needs a task, and task names become directory names under ``--out``."""
    from .. import data as data_module

    if args.data is None:
        return demo.examples()[0], []
    try:
        examples = data_module.load_examples(args.data)
    except (ValueError, OSError) as exc:
        raise common.CLIError(str(exc)) from None
    tasks = list(dict.fromkeys(example.task for example in examples if example.task is not None))
    if len(tasks) < 2:
        return examples, []
    untagged = sum(example.task is None for example in examples)
    if untagged:
        raise common.CLIError(f"--data {args.data}: {untagged} examples have no \"task\" while others name {len(tasks)} "
                       f"tasks; give every example a task (one adapter is trained per task)")
    for task in tasks:
        if not task.strip() or task in (".", "..") or "/" in task or os.sep in task:
            raise common.CLIError(f"--data {args.data}: task name {task!r} cannot be a directory name under --out")
    if not args.method.startswith("prefix") and not args.encoder_decoder:
        raise common.CLIError(f"--data {args.data} names {len(tasks)} tasks: training one adapter per task in shared "
                       f"batches of a causal LM supports --method prefix and prefix-projection, not {args.method} "
                       "(an encoder-decoder --model takes every method)")
    if args.no_accelerate:
        raise common.CLIError("--no-accelerate: training several tasks in shared batches runs on fastpeft's fused "
                       "attention (fastpeft.MultiPrefixTrainer); PEFT has no such mode")
    import importlib.util
    if importlib.util.find_spec("fastpeft.multi") is None:
        raise common.CLIError("this data names several tasks, which needs fastpeft.MultiPrefixTrainer "
                       "(fastpeft/multi.py), missing from this install")
    return examples, tasks


def _run_steps(total_steps, stream, step_fn, description, device):
    """Drive ``total_steps`` training steps (``training_loop.run_steps``) with a progress bar showing the loss and
    tokens/s.

    ``step_fn(batch, tasks) -> (loss, extra)`` runs one optimizer step on a batch already on ``device``; returns
    the per-step log records and the totals ``(tokens, seconds)``. Tokens are real (non-padding) tokens."""
    import torch
    from tqdm.auto import tqdm

    from ..training_loop import run_steps

    totals = {"tokens": 0, "seconds": 0.0}
    bar = tqdm(total=total_steps, desc=description, unit="step", dynamic_ncols=True)

    def timed_step(batch_and_tasks):
        batch, tasks = batch_and_tasks
        batch = {key: value.to(device) for key, value in batch.items()}
        start = time.perf_counter()
        loss, extra = step_fn(batch, tasks)  # loss is a float: the device has finished the step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        tokens = int(batch["attention_mask"].sum())
        totals["tokens"] += tokens
        totals["seconds"] += seconds
        return {"loss": loss, **extra, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    def show(record):
        if record["loss"] != record["loss"]:  # NaN
            raise common.CLIError(f"the loss became NaN at step {record['step']}; lower --lr")
        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{totals['tokens'] / totals['seconds']:,.0f}")
        bar.update(1)

    records = run_steps(((epoch, (batch, tasks)) for epoch, batch, tasks in stream), timed_step,
                        max_steps=total_steps, callback=show)
    bar.close()
    return records, totals["tokens"], totals["seconds"]


@contextlib.contextmanager
def _staged_output(out):
    """A fresh folder beside ``out`` to write everything into, renamed to ``out`` when the block succeeds (an
    existing ``out``, which ``--overwrite`` allowed, is replaced only then). On any error or interrupt the folder
    is deleted and ``out`` is left as it was: never a base model without its adapter, never half an adapter."""
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if os.path.isdir(out):
        replaced = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.replaced-", dir=parent)
        os.rename(out, os.path.join(replaced, "old"))
        os.rename(staging, out)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(staging, out)


def run(args):
    _validate_train_args(args)
    examples, tasks = _load_training_examples(args)
    with _staged_output(args.out) as staging:
        status = _train(args, examples, tasks, staging)
    print(f"saved to {args.out}")
    return status


def _train(args, examples, tasks, staging):
    """Train and write everything into ``staging`` (renamed to ``--out`` afterwards), recording the final paths."""

    import torch

    from .. import data as data_module
    from ..training_loop import Updater, optimizer_step

    loading.prepare_transformers()
    from peft import get_peft_model

    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    if args.model is None:
        from ..tiny import save_tiny
        load_dir = save_tiny(os.path.join(staging, BASE_MODEL_SUBDIR))
        model_dir = os.path.join(os.path.abspath(args.out), BASE_MODEL_SUBDIR)  # where it will be
    else:
        load_dir = model_dir = os.path.abspath(args.model)
    # model_dir is recorded in adapter_config.json as the base model (what `fastpeft generate` loads)

    model, tokenizer = loading.load_base(load_dir, device, dtype, args.load_in_4bit, args.load_in_8bit)
    try:
        rows, dropped = data_module.encode(examples, tokenizer, args.max_length, args.encoder_decoder)
    except ValueError as exc:
        raise common.CLIError(f"--data {args.data}: {exc}") from None
    if not rows:
        raise common.CLIError(f"no example keeps a completion token within --max-length {args.max_length}")
    steps_per_epoch = -(-len(rows) // args.batch_size)
    total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))
    stream = data_module.batches(rows, args.batch_size, tokenizer.pad_token_id, args.seed, args.encoder_decoder)
    from ..integration.geometry import BaseGeometry

    hidden_size = BaseGeometry.of(model.config).hidden_size
    torch.manual_seed(args.seed)
    log = {"config": {key: value for key, value in vars(args).items() if key != "func"},
           "model_dir": model_dir, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "accelerated": not args.no_accelerate, "examples": len(rows), "dropped_examples": dropped}

    if tasks:
        return _train_tasks(args, model, model_dir, tasks, hidden_size, stream, total_steps, device, log, staging)

    model = get_peft_model(model, _peft_config(args.method, args.virtual_tokens, hidden_size, args.encoder_decoder))
    if not args.no_accelerate:
        import fastpeft
        model = fastpeft.accelerate(model)
    if args.gradient_checkpointing:
        from ..integration.checkpointing import set_checkpointing
        set_checkpointing(model.get_base_model(), True)
        model.get_base_model().config.use_cache = False
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]

    updater = Updater(parameters, torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0))

    def step(batch, tasks):
        output, _ = optimizer_step(lambda: model(**batch), [updater], max_grad_norm=1.0)
        return output.loss.item(), {}

    log["trainable_parameters"] = sum(p.numel() for p in parameters)
    log["steps"], total_tokens, total_seconds = _run_steps(total_steps, stream, step, f"train {args.method}",
                                                           device)
    log.update(final_loss=log["steps"][-1]["loss"], total_tokens=total_tokens, train_seconds=total_seconds,
               tokens_per_s=total_tokens / total_seconds)
    if args.data is None:
        log["built_in_task"] = demo.evaluate(model, tokenizer, demo.examples()[1])
        print(demo.report(log["built_in_task"]))
    model.save_pretrained(staging)
    _record_base_model(staging, model_dir)
    with open(os.path.join(staging, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
    first = log["steps"][0]["loss"]
    print(f"trained a {args.method} adapter ({args.virtual_tokens} virtual tokens): {total_steps} steps, "
          f"loss {first:.4f} -> {log['final_loss']:.4f}, {log['tokens_per_s']:,.0f} tokens/s on {device}")
    print(f"base model: {model_dir}")
    return 0


def _record_base_model(adapter_dir, model_dir):
    """Name the base model by the path it will have once the staging folder is renamed (PEFT recorded the staging
    path it was loaded from; recording the final path before saving would make PEFT look for a config there)."""
    path = os.path.join(adapter_dir, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = model_dir
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _train_tasks(args, model, model_dir, tasks, hidden_size, stream, total_steps, device, log, staging):
    """One prefix per task, trained together in shared batches (``fastpeft.MultiPrefixTrainer``); each task's
    adapter goes to ``OUT/<task>/``. Each adapter's loss and gradient are those of its own rows."""
    import fastpeft

    trainer = fastpeft.MultiPrefixTrainer(model, lr=args.lr, max_grad_norm=1.0,
                                          gradient_checkpointing=args.gradient_checkpointing)
    for task in tasks:
        trainer.add_adapter(task, _peft_config(args.method, args.virtual_tokens, hidden_size, args.encoder_decoder))

    def step(batch, row_tasks):
        result = trainer.training_step(batch["input_ids"], row_tasks, attention_mask=batch["attention_mask"],
                                       labels=batch["labels"])
        losses = result["adapter_losses"]
        return sum(losses.values()) / len(losses), {"adapter_losses": losses, "updated": result["updated"]}

    log["tasks"] = tasks
    log["steps"], total_tokens, total_seconds = _run_steps(total_steps, stream, step,
                                                           f"train {args.method} x{len(tasks)} tasks", device)
    log.update(final_loss=log["steps"][-1]["loss"], total_tokens=total_tokens, train_seconds=total_seconds,
               tokens_per_s=total_tokens / total_seconds)
    trainer.save_pretrained(staging)
    for task in tasks:  # so that `fastpeft generate` finds the base model
        _record_base_model(os.path.join(staging, task), model_dir)
    with open(os.path.join(staging, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
    print(f"trained {len(tasks)} {args.method} adapters ({args.virtual_tokens} virtual tokens each) into "
          f"{args.out}/<task>: {total_steps} steps, mean task loss {log['steps'][0]['loss']:.4f} -> "
          f"{log['final_loss']:.4f}, {log['tokens_per_s']:,.0f} tokens/s on {device}")
    print(f"tasks: {', '.join(tasks)}")
    print(f"base model: {model_dir}")
    return 0
