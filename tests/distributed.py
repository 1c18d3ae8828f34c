"""Run DDP test workers in spawned processes, never waiting without a bound."""

import time

import pytest


def run_workers(worker, args, nprocs=2, timeout_s=300):
    """``worker(rank, *args)`` in ``nprocs`` spawned processes (fresh interpreters: forking after torch's thread
    pools exist can leave a child in a futex wait forever). Fails the test, killing the workers, after
    ``timeout_s`` seconds; a worker's exception is re-raised by ``join``."""
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the DDP workers did not finish within {timeout_s} s")
