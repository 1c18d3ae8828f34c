"""This machine's ceilings: large device copy (GB/s, read + write) and a large matmul (TFLOP/s; bf16 on a
GPU, fp32 on CPU). Every suite measures them first; this script measures only them.

    python benchmarks/bench_ceilings.py [--quick] [--out DIR]
"""

import sys

from fastpeft.bench.runner import script_main

if __name__ == "__main__":
    sys.exit(script_main([], __doc__.split("\n\n")[0]))
