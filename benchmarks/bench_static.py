"""Static report of the Triton kernels without a GPU: every config the launchers keep at the benchmark shapes,
compiled for sm_90a (default) with real-launch specializations; registers, spills, shared memory, CTAs per SM,
wgmma vs mma.sync, TMA / cp.async / load widths, atomics and each kernel's main-loop instruction mix.

    python benchmarks/bench_static.py [--target sm_90a|sm_80] [--shapes main,d64,mask] [--quick] [--out DIR] [--check]

Writes benchmarks/results/static-<target>-triton-<version>.json and .md. The code lives in fastpeft/bench/static.py
so that `fastpeft bench --suite static` runs it too.
"""

import sys

from fastpeft.bench.static import main

if __name__ == "__main__":
    sys.exit(main())
