"""The ``fastpeft`` command line (also ``python -m fastpeft``).

Subcommands:
    train     prefix / prompt / p-tuning of a causal LM on a text or JSONL file -> a PEFT adapter directory
    generate  batched generation from one base model and several adapters (one output per prompt x adapter)
    bench     speed, memory and parity against the references on this machine -> table, JSON and a plot
    info      versions, device, and which kernel backends are available (and why not)

Nothing here needs the network: without ``--model``, ``train`` builds the small model of ``fastpeft.tiny``
and saves it next to the adapter. Arguments are checked before anything heavy is imported, so a mistake
costs a fraction of a second; user errors print one line on stderr and exit non-zero, without a traceback
(``FASTPEFT_DEBUG=1`` shows it).
"""

import argparse
import json
import os
import sys
import time

EXIT_USAGE = 2     # bad command line (argparse's convention)
EXIT_FAILURE = 1   # the command ran and failed

METHODS = ("prefix", "prefix-projection", "prompt", "ptuning")
BASE_MODEL_SUBDIR = "base-model"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status ``EXIT_USAGE``. ``prog`` names the (sub)command
    whose parser found it, when a parser did."""

    def __init__(self, message, prog=None):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump) that point to ``--help``."""

    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)", prog=self.prog)


# ----------------------------------------------------------------------------------------------------------
# argument parsing


def build_parser():
    parser = _Parser(prog="fastpeft", description="Fused prefix attention for PEFT prefix tuning and prompt "
                     "tuning: train soft prompts, serve many of them in one batch, benchmark the kernels.")
    parser.add_argument("--version", action="version", version=f"fastpeft {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser(
        "train", help="train a prefix / prompt / p-tuning adapter (PEFT format)",
        description="Train a soft prompt on a causal LM with PEFT, accelerated by fastpeft.accelerate, and save "
                    "a PEFT adapter (loadable with PeftModel.from_pretrained) plus train_log.json. Data: a text "
                    "file (one example per line) or JSONL with {\"text\": ...} or {\"prompt\": ..., "
                    "\"completion\": ...} (loss on the completion only). Without --model, the built-in small "
                    "model (fastpeft.tiny) is used and saved to OUT/base-model.")
    train.add_argument("--method", choices=METHODS, default="prefix",
                       help="prefix: prefix tuning; prefix-projection: prefix tuning with the MLP "
                            "reparametrization; prompt: prompt tuning; ptuning: p-tuning (default: prefix)")
    train.add_argument("--model", metavar="DIR", help="base model directory (transformers format); "
                       "default: the built-in small model")
    train.add_argument("--data", metavar="FILE", help="training data (.txt, or .jsonl); default: a few "
                       "built-in lines, enough for a smoke run")
    train.add_argument("--virtual-tokens", type=int, default=16, metavar="N",
                       help="number of virtual tokens P (default: 16)")
    train.add_argument("--out", metavar="DIR", required=True, help="output directory for the adapter")
    train.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: 1e-2)")
    train.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default: 1)")
    train.add_argument("--max-steps", type=int, metavar="N",
                       help="stop after N optimizer steps (overrides --epochs)")
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
    _add_device_arguments(train)
    train.add_argument("--seed", type=int, default=0, help="seed of the prompt initialization and data order")
    train.set_defaults(func=cmd_train)

    generate = sub.add_parser(
        "generate", help="batched generation with several adapters at once",
        description="Generate from one base model and several soft-prompt adapters in one batch "
                    "(fastpeft.AdapterBank): one output per (prompt, adapter) pair.")
    generate.add_argument("--model", metavar="DIR", help="base model directory; default: the base model the "
                          "first adapter was trained on (adapter_config.json's base_model_name_or_path)")
    generate.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                          help="a PEFT prompt-learning adapter directory, with a name (repeatable; a bare DIR "
                               "is named after its directory)")
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    generate.add_argument("--prompt-file", metavar="FILE", help="more prompts, one per line")
    generate.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                          help="tokens to generate per output (default: 32)")
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    generate.add_argument("--batch-size", type=int, default=64, help="rows per generate call (default: 64)")
    generate.add_argument("--engine", choices=("bank", "peft"), default="bank",
                          help="bank: every adapter in one batch through fastpeft.AdapterBank (default); "
                               "peft: plain PEFT, one request at a time, by its forward without a KV cache (a slow "
                               "reference to compare with)")
    generate.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    gen_quant = generate.add_mutually_exclusive_group()
    gen_quant.add_argument("--load-in-4bit", action="store_true", help="load the base model in 4-bit (bitsandbytes)")
    gen_quant.add_argument("--load-in-8bit", action="store_true", help="load the base model in 8-bit (bitsandbytes)")
    _add_device_arguments(generate)
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.set_defaults(func=cmd_generate)

    bench = sub.add_parser(
        "bench", help="benchmark speed, memory and parity against the references",
        description="Run the benchmark suites on this machine: prints a table, writes "
                    "OUT/<date>-<device>.json and a PNG plot. On CPU the shapes are small and the figures are "
                    "labelled as smoke figures, not kernel claims.")
    bench.add_argument("--suite", choices=("kernel", "training", "serving", "all"), default="kernel",
                       help="kernel: the fused op vs PEFT's concatenation, FlexAttention and plain SDPA; "
                            "training: a prefix-tuning step, PEFT vs fastpeft.accelerate; serving: decode with "
                            "AdapterBank vs PEFT; all: everything (default: kernel)")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke run)")
    bench.add_argument("--out", metavar="DIR", default=os.path.join("benchmarks", "results"),
                       help="where to write the JSON and PNG (default: benchmarks/results)")
    bench.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                       help="auto: CUDA when available (default)")
    bench.set_defaults(func=cmd_bench)

    info = sub.add_parser("info", help="versions, device and available backends",
                          description="Print library versions, the device, and which prefix-attention "
                                      "backends (CUDA extension, Triton, PyTorch reference) can run here, and "
                                      "why the others cannot.")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    return parser


def _add_device_arguments(parser):
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available (default)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="backbone dtype; auto: bfloat16 on a GPU that supports it, else float32")


def _version():
    from .version import __version__
    return __version__


# ----------------------------------------------------------------------------------------------------------
# shared helpers (heavy imports stay inside)


def _require_model_dir(path, flag="--model"):
    if not os.path.isdir(path):
        raise CLIError(f"{flag} {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"{flag} {path}: not a transformers model directory (no config.json)")


def _resolve_device(name):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    return torch.device(name)


def _resolve_dtype(name, device):
    import torch
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def _prepare_transformers():
    """Before transformers is imported: never touch the network (every model and adapter here is a local
    directory; without this, PEFT looks base-model names up on the Hub when saving). Then keep stdout/stderr
    for our own output: no per-file progress bars or info logs from transformers, no deprecation notices that
    transformers/PEFT raise at each other, no notice from bitsandbytes (imported by PEFT) about optional CPU
    kernels it could not download."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    # PEFT drops the position ids generate() builds for prompt tuning and says so on every call
    warnings.filterwarnings("ignore", message="Position ids are not supported", module=r"peft\.")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_base(model_dir, device, dtype, load_in_4bit=False, load_in_8bit=False):
    """(model, tokenizer) from a transformers directory; the tokenizer pads on the left and has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise CLIError(f"the tokenizer of {model_dir} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype}
    if load_in_4bit or load_in_8bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype) if load_in_4bit
            else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if "quantization_config" not in kwargs:
        model = model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CLIError(f"{what}: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"{what}: {path} is not valid JSON ({exc.msg})") from None


def _check_adapter_fits(name, adapter_dir, model_dir, geometry, allow_pickle):
    """Refuse, before the model's weights load, an adapter that is not prompt learning or was trained for a base
    model of another shape: ``adapters.check_compatible`` against ``geometry`` (the ``BaseGeometry`` of the model
    in ``model_dir``)."""
    from .adapters import check_compatible, load_prompt_adapter

    try:
        adapter = load_prompt_adapter(adapter_dir, allow_pickle=allow_pickle)
    except ValueError as exc:
        raise CLIError(f"adapter {name!r}: {exc}") from None
    try:
        check_compatible(adapter, geometry)
    except ValueError as exc:
        raise CLIError(f"adapter {name!r} was trained for another base model than {model_dir}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# fastpeft info


def _collect_info():
    import importlib.util
    import warnings

    import torch

    from . import _backend
    from .bench.harness import package_version
    from .ops.sdpa_prefix_attention import unavailable_reason as _sdpa_unavailable_reason

    versions = {"fastpeft": _version(), "python": sys.version.split()[0]}
    for package in ("torch", "triton", "transformers", "peft", "bitsandbytes"):
        versions[package] = package_version(package)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                  "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                  "cuda": torch.version.cuda}
    else:
        device = {"type": "cpu", "name": "CPU", "threads": torch.get_num_threads(),
                  "why_no_cuda": ("torch was built without CUDA" if torch.version.cuda is None
                                  else "no CUDA device visible")}

    with warnings.catch_warnings():  # the lookup warns once when the extension is missing; we report it here
        warnings.simplefilter("ignore")
        extension, extension_reason = _backend.cuda_extension()
    triton_ok, triton_reason = _backend.triton_available()
    kernels_present = importlib.util.find_spec("fastpeft.kernels.prefix_attention") is not None
    backends = {}
    if extension is None:
        backends["cuda"] = {"available": False, "why": extension_reason}
    elif device["type"] != "cuda":
        backends["cuda"] = {"available": False, "why": "extension built, but no CUDA device here"}
    else:
        backends["cuda"] = {"available": True, "why": "fastpeft._C loaded (decode kernels)"}
    if not triton_ok:
        backends["triton"] = {"available": False, "why": triton_reason}
    elif not kernels_present:
        backends["triton"] = {"available": False, "why": "fastpeft.kernels.prefix_attention is not installed"}
    elif device["type"] == "cuda":
        backends["triton"] = {"available": True, "why": "CUDA tensors run the Triton kernels"}
    elif _backend.triton_interpreting():
        backends["triton"] = {"available": True, "why": "TRITON_INTERPRET=1: interpreted on CPU (slow)"}
    else:
        backends["triton"] = {"available": False,
                              "why": "no CUDA device (set TRITON_INTERPRET=1 to interpret the kernels on CPU)"}
    sdpa_missing = _sdpa_unavailable_reason(torch.device(device["type"]), torch.float32)
    backends["sdpa"] = {"available": sdpa_missing is None,
                        "why": sdpa_missing or "PyTorch's fused attention ops, parts merged by log-sum-exp"}
    backends["reference"] = {"available": True, "why": "PyTorch reference, always present"}
    forced = os.environ.get("FASTPEFT_BACKEND") or None

    features = {}
    for feature, module in (("fastpeft.accelerate", "fastpeft.integration.peft"),
                            ("fastpeft.AdapterBank", "fastpeft.bank"),
                            ("fastpeft.MultiPrefixTrainer", "fastpeft.multi")):
        features[feature] = importlib.util.find_spec(module) is not None
    from .integration.compat import TESTED_VERSIONS, version_status

    tested = {package: {"tested": f"{oldest} to {newest}", "status": version_status(package)[1]}
              for package, (oldest, newest) in TESTED_VERSIONS.items()}
    return {"versions": versions, "tested_versions": tested, "device": device, "backends": backends,
            "forced_backend": forced, "features": features}


def cmd_info(args):
    info = _collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("versions:")
    for package, version in info["versions"].items():
        tested = info["tested_versions"].get(package)
        note = f"  ({tested['status']}: fastpeft is tested with {tested['tested']})" if tested else ""
        print(f"  {package:<13} {version or 'not installed'}{note}")
    device = info["device"]
    if device["type"] == "cuda":
        print(f"device: {device['name']} (compute capability {device['capability']}, {device['memory_gib']} GiB, "
              f"CUDA {device['cuda']}, {device['count']} visible)")
    else:
        print(f"device: CPU, {device['threads']} threads ({device['why_no_cuda']})")
    print("prefix_attention backends (dispatch order):")
    for backend, state in info["backends"].items():
        print(f"  {backend:<10} {'yes' if state['available'] else 'no ':<4} {state['why']}")
    if info["forced_backend"]:
        print(f"  FASTPEFT_BACKEND={info['forced_backend']} forces that backend")
    print("integrations:")
    for feature, present in info["features"].items():
        print(f"  {feature:<28} {'installed' if present else 'not in this install'}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# fastpeft train

DEMO_TEXTS = [
    "fastpeft trains soft prompts with fused prefix attention.",
    "The prefix is read in place and never concatenated with the keys.",
    "Many tenants share one backbone and one batch.",
    "Prompt tuning adds virtual tokens in front of the input.",
    "Prefix tuning adds learned keys and values to every layer.",
    "A query that sees no key returns zeros, never NaN.",
    "Grouped-query attention shares each key head among several query heads.",
    "Gradient checkpointing works with prefix tuning here.",
]
"""The data of ``fastpeft train`` without ``--data``: a smoke run needs no file."""


def _peft_config(method, virtual_tokens, hidden_size):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    if method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens)
    if method == "prefix-projection":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens,
                                  prefix_projection=True, encoder_hidden_size=hidden_size)
    if method == "prompt":
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens)
    return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens,
                               encoder_hidden_size=hidden_size)


def _validate_train_args(args):
    if args.data is not None and not os.path.isfile(args.data):
        raise CLIError(f"--data {args.data}: no such file")
    if args.model is not None:
        _require_model_dir(args.model)
    for flag, value, low in (("--virtual-tokens", args.virtual_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-length", args.max_length, 2)):
        if value < low:
            raise CLIError(f"{flag} must be at least {low}, got {value}")
    if args.max_steps is not None and args.max_steps < 1:
        raise CLIError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.epochs <= 0:
        raise CLIError(f"--epochs must be positive, got {args.epochs}")
    if not args.lr > 0:
        raise CLIError(f"--lr must be positive, got {args.lr}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} exists and is not a directory")
    from .bench.harness import package_version

    if (args.load_in_4bit or args.load_in_8bit) and package_version("bitsandbytes") is None:
        raise CLIError("--load-in-4bit/--load-in-8bit need bitsandbytes (pip install bitsandbytes)")
    if args.gradient_checkpointing and args.no_accelerate and args.method.startswith("prefix"):
        raise CLIError("PEFT refuses gradient checkpointing with prefix tuning; drop --no-accelerate "
                       "(fastpeft.accelerate supports it) or --gradient-checkpointing")
    if not args.no_accelerate:
        import importlib.util
        if importlib.util.find_spec("fastpeft.integration.peft") is None:
            raise CLIError("fastpeft.accelerate is not in this install (fastpeft/integration/peft.py is "
                           "missing); pass --no-accelerate to train with plain PEFT")


def _load_training_examples(args):
    """The examples of ``--data`` (or the built-in lines) and the task names they use (empty: one adapter).

    A file whose examples name two or more tasks trains one prefix per task (``fastpeft.MultiPrefixTrainer``);
    then every example needs a task, and task names become directory names under ``--out``."""
    from . import data as data_module

    if args.data is None:
        return [data_module.Example("", text) for text in DEMO_TEXTS], []
    try:
        examples = data_module.load_examples(args.data)
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from None
    tasks = list(dict.fromkeys(example.task for example in examples if example.task is not None))
    if len(tasks) < 2:
        return examples, []
    untagged = sum(example.task is None for example in examples)
    if untagged:
        raise CLIError(f"--data {args.data}: {untagged} examples have no \"task\" while others name {len(tasks)} "
                       f"tasks; give every example a task (one adapter is trained per task)")
    for task in tasks:
        if not task.strip() or task in (".", "..") or "/" in task or os.sep in task:
            raise CLIError(f"--data {args.data}: task name {task!r} cannot be a directory name under --out")
    if not args.method.startswith("prefix"):
        raise CLIError(f"--data {args.data} names {len(tasks)} tasks: training one adapter per task in shared "
                       f"batches supports --method prefix and prefix-projection, not {args.method}")
    if args.no_accelerate:
        raise CLIError("--no-accelerate: training several tasks in shared batches runs on fastpeft's fused "
                       "attention (fastpeft.MultiPrefixTrainer); PEFT has no such mode")
    import importlib.util
    if importlib.util.find_spec("fastpeft.multi") is None:
        raise CLIError("this data names several tasks, which needs fastpeft.MultiPrefixTrainer "
                       "(fastpeft/multi.py), missing from this install")
    return examples, tasks


def _run_steps(total_steps, stream, step_fn, description, device):
    """Drive ``total_steps`` training steps with a progress bar showing the loss and tokens/s.

    ``step_fn(batch, tasks) -> (loss, extra)`` runs one optimizer step on a batch already on ``device``; returns
    the per-step log records and the totals ``(tokens, seconds)``. Tokens are real (non-padding) tokens."""
    import torch
    from tqdm.auto import tqdm

    records, total_tokens, total_seconds = [], 0, 0.0
    bar = tqdm(total=total_steps, desc=description, unit="step", dynamic_ncols=True)
    for step in range(1, total_steps + 1):
        epoch, batch, tasks = next(stream)
        batch = {key: value.to(device) for key, value in batch.items()}
        start = time.perf_counter()
        loss, extra = step_fn(batch, tasks)  # loss is a float: the device has finished the step
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if loss != loss:  # NaN
            raise CLIError(f"the loss became NaN at step {step}; lower --lr")
        tokens = int(batch["attention_mask"].sum())
        total_tokens += tokens
        total_seconds += seconds
        records.append({"step": step, "epoch": epoch, "loss": loss, **extra, "tokens": tokens,
                        "seconds": seconds, "tokens_per_s": tokens / seconds})
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{total_tokens / total_seconds:,.0f}")
        bar.update(1)
    bar.close()
    return records, total_tokens, total_seconds


def cmd_train(args):
    _validate_train_args(args)
    examples, tasks = _load_training_examples(args)

    import torch

    from . import data as data_module

    _prepare_transformers()
    from peft import get_peft_model

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    os.makedirs(args.out, exist_ok=True)
    if args.model is None:
        from .tiny import save_tiny
        model_dir = os.path.join(args.out, BASE_MODEL_SUBDIR)
        save_tiny(model_dir)
    else:
        model_dir = args.model
    model_dir = os.path.abspath(model_dir)  # recorded in adapter_config.json as the base model

    model, tokenizer = _load_base(model_dir, device, dtype, args.load_in_4bit, args.load_in_8bit)
    rows, dropped = data_module.encode(examples, tokenizer, args.max_length)
    if not rows:
        raise CLIError(f"no example keeps a completion token within --max-length {args.max_length}")
    steps_per_epoch = -(-len(rows) // args.batch_size)
    total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))
    stream = data_module.batches(rows, args.batch_size, tokenizer.pad_token_id, args.seed)
    from .adapters import BaseGeometry

    hidden_size = BaseGeometry.of(model.config).hidden_size
    torch.manual_seed(args.seed)
    log = {"config": {key: value for key, value in vars(args).items() if key != "func"},
           "model_dir": model_dir, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
           "accelerated": not args.no_accelerate, "examples": len(rows), "dropped_examples": dropped}

    if tasks:
        return _train_tasks(args, model, model_dir, tasks, hidden_size, stream, total_steps, device, log)

    model = get_peft_model(model, _peft_config(args.method, args.virtual_tokens, hidden_size))
    if not args.no_accelerate:
        import fastpeft
        model = fastpeft.accelerate(model)
    if args.gradient_checkpointing:
        from .integration.checkpointing import set_checkpointing
        set_checkpointing(model.get_base_model(), True)
        model.get_base_model().config.use_cache = False
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)

    def step(batch, tasks):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), {}

    log["trainable_parameters"] = sum(p.numel() for p in parameters)
    log["steps"], total_tokens, total_seconds = _run_steps(total_steps, stream, step, f"train {args.method}",
                                                           device)
    log.update(final_loss=log["steps"][-1]["loss"], total_tokens=total_tokens, train_seconds=total_seconds,
               tokens_per_s=total_tokens / total_seconds)
    model.save_pretrained(args.out)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
    first = log["steps"][0]["loss"]
    print(f"saved {args.method} adapter ({args.virtual_tokens} virtual tokens) to {args.out}: {total_steps} steps, "
          f"loss {first:.4f} -> {log['final_loss']:.4f}, {log['tokens_per_s']:,.0f} tokens/s on {device}")
    print(f"base model: {model_dir}")
    return 0


def _train_tasks(args, model, model_dir, tasks, hidden_size, stream, total_steps, device, log):
    """One prefix per task, trained together in shared batches (``fastpeft.MultiPrefixTrainer``); each task's
    adapter goes to ``OUT/<task>/``. Each adapter's loss and gradient are those of its own rows."""
    import fastpeft

    trainer = fastpeft.MultiPrefixTrainer(model, lr=args.lr, max_grad_norm=1.0,
                                          gradient_checkpointing=args.gradient_checkpointing)
    for task in tasks:
        config = _peft_config(args.method, args.virtual_tokens, hidden_size)
        config.base_model_name_or_path = model_dir  # as get_peft_model records it, so generate finds the base
        trainer.add_adapter(task, config)

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
    trainer.save_pretrained(args.out)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=2)
    print(f"saved {len(tasks)} {args.method} adapters ({args.virtual_tokens} virtual tokens each) to "
          f"{args.out}/<task>: {total_steps} steps, mean task loss {log['steps'][0]['loss']:.4f} -> "
          f"{log['final_loss']:.4f}, {log['tokens_per_s']:,.0f} tokens/s on {device}")
    print(f"tasks: {', '.join(tasks)}")
    print(f"base model: {model_dir}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# fastpeft generate


def _parse_adapters(specs):
    """``NAME=DIR`` or ``DIR`` -> ordered {name: dir}; every directory must hold adapter_config.json."""
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = os.path.basename(os.path.normpath(spec))
        if not name or not path:
            raise CLIError(f"--adapter {spec!r}: expected NAME=DIR")
        if name in adapters:
            raise CLIError(f"--adapter: the name {name!r} is used twice")
        if not os.path.isdir(path):
            raise CLIError(f"--adapter {name}={path}: no such directory")
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise CLIError(f"--adapter {name}={path}: not a PEFT adapter directory (no adapter_config.json)")
        adapters[name] = path
    return adapters


def _read_prompts(args):
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise CLIError(f"--prompt-file {args.prompt_file}: no such file")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line for line in f.read().splitlines() if line.strip()]
    if not prompts:
        raise CLIError("give at least one --prompt or a --prompt-file")
    return prompts


def _generation_kwargs(args):
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    return kwargs


def _generate_with_bank(model, tokenizer, adapters, requests, args, device):
    """Every (prompt, adapter) request through one AdapterBank, ``--batch-size`` rows per call."""
    import torch

    import fastpeft

    sampling = {"generator": torch.Generator(device).manual_seed(args.seed)} if args.do_sample else {}
    completions = []
    with fastpeft.AdapterBank(model) as bank:
        for name, path in adapters.items():
            bank.add(name, path)
        for start in range(0, len(requests), args.batch_size):
            chunk = requests[start:start + args.batch_size]
            encoded = tokenizer([prompt for prompt, _ in chunk], return_tensors="pt", padding=True).to(device)
            generated = bank.generate(encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                      adapters=[name for _, name in chunk], **_generation_kwargs(args), **sampling)
            completions += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:],
                                                  skip_special_tokens=True)
    return completions


def _generate_with_peft(model, tokenizer, adapters, requests, args, device):
    """Plain PEFT, one adapter at a time and one request at a time, by PEFT's forward looped without a cache
    (``fastpeft.integration.reference_generate``): the reference the bank must equal, which PEFT's own ``generate``
    stopped being with transformers 5.24. One PeftModel cannot hold prompt-learning adapters of different types, so
    each gets its own wrapper; prompt learning leaves the base model's modules untouched, so unwrapping is
    ``get_base_model``."""
    from peft import PeftModel

    from .integration.reference_generate import generate_without_cache

    sampling = dict(temperature=args.temperature, top_p=args.top_p) if args.do_sample else {}
    completions = [None] * len(requests)
    for name, path in adapters.items():
        peft_model = PeftModel.from_pretrained(model, path).eval()
        config = peft_model.generation_config
        pad_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        for i, (prompt, adapter) in enumerate(requests):
            if adapter != name:
                continue
            encoded = tokenizer([prompt], return_tensors="pt").to(device)
            generated, _ = generate_without_cache(peft_model, encoded["input_ids"], encoded["attention_mask"],
                                                  max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                                  eos_token_id=config.eos_token_id, pad_token_id=pad_id, **sampling)
            completions[i] = tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        model = peft_model.get_base_model()
    return completions


def cmd_generate(args):
    adapters = _parse_adapters(args.adapter)
    prompts = _read_prompts(args)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.do_sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise CLIError("sampling needs --temperature > 0 and 0 < --top-p <= 1")
    from .bench.harness import package_version

    if (args.load_in_4bit or args.load_in_8bit) and package_version("bitsandbytes") is None:
        raise CLIError("--load-in-4bit/--load-in-8bit need bitsandbytes (pip install bitsandbytes)")
    adapter_configs = {name: _read_json(os.path.join(path, "adapter_config.json"), f"adapter {name!r}")
                       for name, path in adapters.items()}
    model_dir = args.model
    if model_dir is None:
        first = next(iter(adapters))
        model_dir = adapter_configs[first].get("base_model_name_or_path")
        if not model_dir or not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise CLIError(f"--model is needed: adapter {first!r} names base model {model_dir!r}, which is not "
                           f"a local model directory")
        flag = f"base model of adapter {first!r}"
    else:
        flag = "--model"
    _require_model_dir(model_dir, flag)
    _prepare_transformers()
    from transformers import AutoConfig

    from .adapters import BaseGeometry

    geometry = BaseGeometry.of(AutoConfig.from_pretrained(model_dir))
    for name, path in adapters.items():
        # PEFT's own loader reads a pickle-only adapter (adapter_model.bin, weights only); the bank refuses it.
        _check_adapter_fits(name, path, model_dir, geometry, allow_pickle=args.engine == "peft")
    if args.engine == "bank":
        import importlib.util
        if importlib.util.find_spec("fastpeft.bank") is None:
            raise CLIError("fastpeft.AdapterBank is not in this install (fastpeft/bank.py is missing); "
                           "pass --engine peft to generate with plain PEFT, one adapter at a time")

    import torch
    device = _resolve_device(args.device)
    model, tokenizer = _load_base(model_dir, device, _resolve_dtype(args.dtype, device), args.load_in_4bit,
                                  args.load_in_8bit)
    model.eval()
    torch.manual_seed(args.seed)
    requests = [(prompt, name) for prompt in prompts for name in adapters]
    engine = _generate_with_bank if args.engine == "bank" else _generate_with_peft
    with torch.inference_mode():
        completions = engine(model, tokenizer, adapters, requests, args, device)

    if args.json:
        print(json.dumps([{"prompt": prompt, "adapter": name, "completion": completion}
                          for (prompt, name), completion in zip(requests, completions)], indent=2,
                         ensure_ascii=False))
        return 0
    width = max(len(name) for name in adapters)
    for index, prompt in enumerate(prompts):
        print(f"prompt {index + 1}: {prompt!r}")
        for (_, name), completion in zip(requests[index * len(adapters):(index + 1) * len(adapters)],
                                         completions[index * len(adapters):(index + 1) * len(adapters)]):
            print(f"  [{name:<{width}}] {completion!r}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# fastpeft bench


def cmd_bench(args):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} exists and is not a directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suites build their models locally; never reach out
    from .bench.runner import SUITES, run_suites

    suites = list(SUITES) if args.suite == "all" else [args.suite]
    device = _resolve_device(args.device)
    run_suites(suites, device=device, quick=args.quick, out_dir=args.out)
    return 0


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    """Entry point of the ``fastpeft`` console script; returns the exit status."""
    parser = build_parser()
    command = "fastpeft"
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        command = f"fastpeft {args.command}"
        return args.func(args) or 0
    except CLIError as exc:
        print(f"{exc.prog or command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # errors raised by transformers/PEFT/fastpeft on this input: one line, no traceback
        if os.environ.get("FASTPEFT_DEBUG") == "1":
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else "(no message)"
        if isinstance(exc, KeyError):  # KeyError's str() is the repr of its argument
            message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else message
        print(f"{command}: error: {exc.__class__.__name__}: {message} (FASTPEFT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
