"""The ``fastpeft`` command line (also ``python -m fastpeft``).

Subcommands:
    train     prefix / prompt / p-tuning of a causal LM on a text or JSONL file -> a PEFT adapter directory
    generate  batched generation from one base model and several adapters (one output per prompt x adapter)
    serve     an OpenAI-compatible HTTP server for many adapters, with continuous batching
    bench     speed, memory and parity against the references on this machine -> table, JSON and a plot
    info      versions, device, and which kernel backends are available (and why not)

Nothing here needs the network: without ``--model``, ``train`` builds the small model of ``fastpeft.tiny``
and saves it next to the adapter. Arguments are checked before anything heavy is imported, so a mistake
costs a fraction of a second; user errors print one line on stderr and exit non-zero, without a traceback
(``FASTPEFT_DEBUG=1`` shows it).
"""

import os
import sys

from . import bench, common, generate, info, serve, train


def build_parser():
    parser = common.Parser(prog="fastpeft", description="Fused prefix attention for PEFT prefix tuning and prompt "
                           "tuning: train soft prompts, serve many of them in one batch, benchmark the kernels.")
    parser.add_argument("--version", action="version", version=f"fastpeft {common.package_version_string()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=common.Parser)
    for command in (train, generate, serve, bench, info):
        command.add_parser(sub)
    return parser


def main(argv=None):
    """Entry point of the ``fastpeft`` console script; returns the exit status."""
    parser = build_parser()
    command = "fastpeft"
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return common.EXIT_USAGE
        command = f"fastpeft {args.command}"
        return args.func(args) or 0
    except common.CLIError as exc:
        print(f"{exc.prog or command}: error: {exc}", file=sys.stderr)
        return common.EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`fastpeft info | head`): stop quietly, as Unix tools do. stdout now points at
        # /dev/null so that the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return common.EXIT_FAILURE
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
        return common.EXIT_FAILURE
