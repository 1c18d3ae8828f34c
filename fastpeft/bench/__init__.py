"""Benchmarks of fastpeft against the references, inside the package so ``fastpeft bench`` works from any
install: ``harness`` (timing, FLOPs, memory, results schema, table, plot), one module per suite (``ceilings``,
``kernel``, ``training``, ``serving``), ``models`` (randomly initialized models built from configs) and
``runner`` (runs suites, writes results). ``benchmarks/bench_*.py`` in the repository are thin scripts over it."""
