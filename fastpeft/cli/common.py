"""What the ``fastpeft`` subcommands share: exit codes, the one-line user error, argument parsing without usage
dumps, device/dtype choice, and loading a base model quietly and offline. Heavy imports stay inside functions."""

import argparse
import json
import os

EXIT_USAGE = 2     # bad command line (argparse's convention)
EXIT_FAILURE = 1   # the command ran and failed


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status ``EXIT_USAGE``. ``prog`` names the (sub)command
    whose parser found it, when a parser did."""

    def __init__(self, message, prog=None):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage dump) that point to ``--help``."""

    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)", prog=self.prog)


def add_device_arguments(parser):
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available (default)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="backbone dtype; auto: bfloat16 on a GPU that supports it, else float32")


def package_version_string():
    from ..version import __version__
    return __version__


def require_model_dir(path, flag="--model"):
    if not os.path.isdir(path):
        raise CLIError(f"{flag} {path}: no such directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CLIError(f"{flag} {path}: not a transformers model directory (no config.json)")


def resolve_device(name):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name, device):
    import torch
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def prepare_transformers():
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


def load_base(model_dir, device, dtype, load_in_4bit=False, load_in_8bit=False):
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


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CLIError(f"{what}: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"{what}: {path} is not valid JSON ({exc.msg})") from None
