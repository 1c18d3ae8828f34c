"""What the ``fastpeft`` subcommands share: exit codes, the one-line user error, argument parsing without usage
dumps, device/dtype choice (loading a base model is ``fastpeft.loading``'s). Heavy imports stay inside functions."""

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


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CLIError(f"{what}: {path} not found") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"{what}: {path} is not valid JSON ({exc.msg})") from None
