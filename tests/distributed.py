"""Run DDP test workers in spawned processes, never waiting without a bound."""

import os
import time

import pytest


def run_workers(worker, args, init_file, nprocs=2, timeout_s=90, attempts=2):
    """``worker(rank, *args)`` in ``nprocs`` spawned processes (fresh interpreters: forking after torch's thread
    pools exist can leave a child in a futex wait forever). Gloo talks over the loopback interface (it otherwise
    picks one from the host name, which can stall its rendezvous). A run that does not finish within ``timeout_s``
    seconds is killed and tried once more (a rare stalled rendezvous was seen here even on an idle machine), and so
    is a run in which a worker died of a signal (once, on a slow moment of this VM: gloo's teardown aborted with
    "terminate called without an active exception"); a second failure fails the test. ``init_file`` (the workers'
    ``file://`` rendezvous) is removed before a retry, since a killed run leaves it stale. A worker's Python
    exception is re-raised by ``join``, never retried."""
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # inherited by the spawned workers
    failures = []
    for _ in range(attempts):
        if os.path.exists(init_file):
            os.remove(init_file)
        context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not context.join(timeout=5):
                if time.monotonic() > deadline:
                    for process in context.processes:
                        process.kill()
                    failures.append(f"did not finish within {timeout_s} s")
                    break
            else:
                return
        except mp.ProcessExitedException as error:  # killed by a signal (a Python exception is ProcessRaisedException)
            failures.append(str(error))
    pytest.fail(f"the DDP workers failed {attempts} times: {'; '.join(failures)}")
