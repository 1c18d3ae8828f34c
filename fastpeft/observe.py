"""Count fastpeft's attention calls by the backend that ran them, e.g. to check that a model's attention really went
through fastpeft (the PEFT-suite harness, ``tests/peft_suite/``, counts them per test)::

    from fastpeft.observe import attention_calls

    with attention_calls() as calls:
        model(**batch)
    calls    # collections.Counter, e.g. Counter({'sdpa': 4}): one per attention call (per layer and step)

Backends: ``'cuda'``, ``'triton'`` and ``'sdpa'`` (fastpeft's fused paths, ``fastpeft._backend``) and
``'reference'`` (its unfused PyTorch path: the fallback for cases no fused path covers, and attention dropout while
training). Every eager call of ``fastpeft.prefix_attention`` counts once, so every attention call of an accelerated
model, an ``AdapterBank`` or a ``MultiPrefixTrainer`` does; calls inside a ``torch.compile``'d graph do not (they run
without Python). Blocks nest: each open block counts every call. Observing costs one list test per call.
"""

import collections
import contextlib

import torch

_open_counters = []  # one Counter per open attention_calls() block


@contextlib.contextmanager
def attention_calls():
    """Within the block, count fastpeft's attention calls by backend into the Counter it yields."""
    calls = collections.Counter()
    _open_counters.append(calls)
    try:
        yield calls
    finally:
        # By identity: Counters compare by value, and two blocks may hold equal counts.
        del _open_counters[next(i for i, c in enumerate(_open_counters) if c is calls)]


def record_attention_call(backend):
    """Called by fastpeft's ops once per attention call, with the backend that runs it."""
    if torch.compiler.is_compiling() or not _open_counters:  # traced code runs later without Python: not counted
        return
    for calls in _open_counters:
        calls[backend] += 1
