"""Run benchmark suites and write their results: ``fastpeft bench`` and ``benchmarks/bench_*.py`` call this.

The machine's ceilings (copy bandwidth, matmul throughput) are always measured first so every other number
can be read against them. Output: a markdown table per suite on stdout, ``OUT/<date>-<device>.json``
(schema in ``harness``) and a PNG plot beside it.
"""

import os

from . import ceilings, harness

SUITES = ("kernel", "training", "serving")


def _suite_module(name):
    # Imported on demand: the training and serving suites pull in transformers and PEFT.
    if name == "kernel":
        from . import kernel as module
    elif name == "training":
        from . import training as module
    elif name == "serving":
        from . import serving as module
    else:
        raise ValueError(f"unknown benchmark suite {name!r}; choose from {SUITES}")
    return module


def run_suites(suites, device, quick=False, out_dir=os.path.join("benchmarks", "results"), log=print,
               training_length=None):
    """Run ``suites`` (names from ``SUITES``) on ``device``; writes ``OUT/<date>-<device>.json``, the markdown tables
    beside it (``.md``) and a plot (``.png``, with matplotlib). Returns ``(run, json_path, png_path or None)``.
    ``training_length``: the training suite's sequence length instead of its default."""
    modules = [(name, _suite_module(name)) for name in suites]
    run = harness.new_run(device, quick, ["ceilings", *suites])
    recorder = harness.Recorder(run, log=log)
    if run["note"]:
        log(f"*** {run['note']} (device: {run['device']['name']}) ***")
    machine = ceilings.run(recorder, device, quick)
    for name, module in modules:
        if name == "serving":
            module.run(recorder, device, quick, copy_gbps=machine["copy_gbps"])
        elif name == "training":
            module.run(recorder, device, quick, length=training_length)
        else:
            module.run(recorder, device, quick)
    markdown = harness.render_markdown(run)
    log("")
    log(markdown)
    json_path = harness.write_run(run, out_dir)
    stem = os.path.splitext(json_path)[0]
    with open(stem + ".md", "w") as f:  # the tables a README can show, beside the JSON they were rendered from
        f.write(markdown.rstrip("\n") + "\n")
    png_path = harness.plot_run(run, stem + ".png")
    log("")
    log(f"results: {json_path}")
    log(f"tables:  {stem}.md")
    log(f"plot:    {png_path}" if png_path else "plot:    skipped (matplotlib is not installed)")
    return run, json_path, png_path


def script_main(suites, description, argv=None):
    """Command line of the ``benchmarks/bench_*.py`` scripts: ``--quick``, ``--out DIR``, ``--device``."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions (a smoke run)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), metavar="DIR",
                        help="where to write the JSON, markdown and PNG (default: benchmarks/results)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when available (default)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    else:
        device = torch.device(args.device)
    run_suites(suites, device=device, quick=args.quick, out_dir=args.out)
    return 0
