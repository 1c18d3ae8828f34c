"""``fastpeft bench``: speed, memory and parity against the references on this machine -> a table, JSON,
markdown and a plot."""

import os

from . import common


def add_parser(sub):
    bench = sub.add_parser(
        "bench", help="benchmark speed, memory and parity against the references",
        description="Run the benchmark suites on this machine: prints a table, writes OUT/<date>-<device>.json, "
                    "its tables as markdown (.md) and a PNG plot. On CPU the shapes are small and the figures are "
                    "labelled as smoke figures, not kernel claims.")
    bench.add_argument("--suite", choices=("kernel", "training", "serving", "all"), default="kernel",
                       help="kernel: the fused op vs PEFT's concatenation, FlexAttention and plain SDPA; "
                            "training: a prefix-tuning step, PEFT vs fastpeft.accelerate; serving: decode with "
                            "AdapterBank vs PEFT; all: everything (default: kernel). The static compile report of "
                            "the Triton kernels is a developer tool of the repository: benchmarks/bench_static.py")
    bench.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke run)")
    bench.add_argument("--out", metavar="DIR", default=os.path.join("benchmarks", "results"),
                       help="where to write the JSON, markdown and PNG (default: benchmarks/results)")
    bench.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                       help="auto: CUDA when available (default)")
    bench.add_argument("--length", metavar="L", type=int, default=None,
                       help="training suite: the sequence length (default: the suite's, 1024 on a GPU, 64 on CPU)")
    bench.set_defaults(func=run)



def run(args):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise common.CLIError(f"--out {args.out} exists and is not a directory")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suites build their models locally; never reach out
    from ..bench.runner import SUITES, run_suites

    suites = list(SUITES) if args.suite == "all" else [args.suite]
    device = common.resolve_device(args.device)
    if args.length is not None and args.length < 1:
        raise common.CLIError(f"--length must be a positive sequence length, got {args.length}")
    run_suites(suites, device=device, quick=args.quick, out_dir=args.out, training_length=args.length)
    return 0
