"""fastpeft.prefix_attention vs PEFT's expand+concat+SDPA, FlexAttention and SDPA without a prefix:
fwd / bwd / fwd+bwd time, TFLOP/s, peak memory, speedup and parity. Shapes of issue #7 on a GPU
(bf16, D=128, B=8, Hq=32, Hkv=8, L=2048, P=128, causal, and variations); `--quick` for a CPU smoke run.

    python benchmarks/bench_prefix_attention.py [--quick] [--out DIR]

The measuring code lives in the package (fastpeft/bench/kernel.py) so `fastpeft bench` runs it too.
"""

import sys

from fastpeft.bench.runner import script_main

if __name__ == "__main__":
    sys.exit(script_main(["kernel"], __doc__.split("\n\n")[0]))
