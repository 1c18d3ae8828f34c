"""Static report of the Triton kernels without a GPU: every config the launchers keep at the benchmark shapes,
compiled for sm_90a (default) with real-launch specializations; registers, spills, shared memory, CTAs per SM,
wgmma vs mma.sync, TMA / cp.async / load widths, atomics and each kernel's main-loop instruction mix.

    python benchmarks/bench_static.py [--target sm_90a|sm_80] [--shapes main,d64,mask] [--quick] [--out DIR] [--check]

Writes benchmarks/results/static-<target>-triton-<version>.json and .md. The capture, compile and analysis live in
benchmarks/static_report.py; a developer tool, not part of the installed package.
"""

import argparse
import json
import os
import subprocess
import sys

import static_report as report


def main(argv=None):
    parser = argparse.ArgumentParser(description="Static report of the Triton kernels (no GPU): registers, spills, "
                                                 "shared memory, occupancy, wgmma, memory paths, main-loop mix.")
    parser.add_argument("--target", choices=sorted(report.TARGETS), default="sm_90a")
    parser.add_argument("--shapes", default=",".join(report.DEFAULT_SHAPES),
                        help=f"comma-separated, from {', '.join(report.SHAPES)} (default: "
                             f"{','.join(report.DEFAULT_SHAPES)})")
    parser.add_argument("--quick", action="store_true", help="only the first kept config of each launch")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), metavar="DIR")
    parser.add_argument("--json-only", action="store_true", help="print the JSON to stdout, write nothing")
    parser.add_argument("--only", default="", metavar="NAMES",
                        help="comma-separated parts of kernel names to compile (e.g. dkdv,fwd); default: all")
    parser.add_argument("--calls", default="", metavar="CALLS",
                        help="comma-separated calls to compile: fwd, bwd[fused], bwd[split], bwd[deterministic]")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="compile only every N-th kernel from the I-th (with --json-only; merge_reports joins)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a kept config at D <= 128 spills or a 64-row tile lost wgmma")
    args = parser.parse_args(argv)
    shape_names = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shape_names if s not in report.SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {sorted(report.SHAPES)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "fastpeft.kernels.prefix_attention" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET")
    elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The kernels were already decorated for the interpreter: run again in a clean interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=env)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json_only else print
    log(f"static report: {args.target}, shapes {', '.join(shape_names)}")
    shard = tuple(int(x) for x in args.shard.split("/"))
    if shard != (0, 1) and not args.json_only:
        parser.error("--shard needs --json-only (a partial report is not written)")
    only = [part for part in args.only.split(",") if part] or None
    calls = [part for part in args.calls.split(",") if part] or None
    result = report.build_report(args.target, shape_names, args.quick, shard=shard, only=only, calls=calls, log=log)
    problems = report.check(result)
    if args.json_only:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        json_path, md_path = report.write_report(result, args.out)
        print(report.render_markdown(result))
        print(f"results: {json_path}\ntables:  {md_path}")
    for problem in problems:
        log(f"PROBLEM: {problem}")
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
