"""Tokens/s and peak memory of a prefix-tuning training step, PEFT vs fastpeft.accelerate (and with
gradient checkpointing, which PEFT refuses): a Llama-style 1.1B model in bf16 on a GPU (B=8, L=1024,
P=64); the built-in small model on CPU.

    python benchmarks/bench_training_step.py [--quick] [--out DIR]

The measuring code lives in the package (fastpeft/bench/training.py) so `fastpeft bench` runs it too.
"""

import sys

from fastpeft.bench.runner import script_main

if __name__ == "__main__":
    sys.exit(script_main(["training"], __doc__.split("\n\n")[0]))
