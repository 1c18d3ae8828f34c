"""Which backend runs a call of prefix attention: SPEC's dispatch order, in one place.

    cuda       the CUDA extension fastpeft._C, where it implements the case (decode: one query per row, no gradient)
    triton     the Triton kernels, for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)
    sdpa       PyTorch's fused attention ops over the prefix and the sequence, merged by log-sum-exp (the CPU default)
    reference  the PyTorch reference, float64 semantics, for any case no faster backend covers (one warning naming it)

A call runs on the first backend in this order whose ``supports(case)`` says yes. ``FASTPEFT_BACKEND`` forces one:
calls it never implements (an attn_bias for the kernels, a gradient for the CUDA extension) go on to the next backend
in the order that runs them, with a one-time warning; where it cannot run at all (device, dtype, not built) the call
raises a ValueError that says why. Adding a backend is one module under ``backends/`` and one line in ``BACKENDS``.
"""

import os

import torch

from . import environment
from .backends.base import Case
from .backends.cuda import CudaBackend
from .backends.reference import ReferenceBackend
from .backends.sdpa import SdpaBackend
from .backends.triton import TritonBackend

BACKENDS = (CudaBackend(), TritonBackend(), SdpaBackend(), ReferenceBackend())
_BY_NAME = {backend.name: backend for backend in BACKENDS}
NAMES = tuple(_BY_NAME)


def get(name):
    """The backend called ``name`` (one of ``NAMES``)."""
    return _BY_NAME[name]


def forced_backend():
    """The backend named by ``FASTPEFT_BACKEND`` (lower case), or None. Read on every call so tests can set it."""
    name = os.environ.get("FASTPEFT_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in _BY_NAME:
        raise ValueError(f"FASTPEFT_BACKEND={name!r} is not one of {NAMES}")
    return name


def select(device, dtype, decode, bias):
    """The name of the backend that runs a call on ``device``/``dtype`` (``decode``: one query per row and no
    gradient; ``bias``: an attn_bias), warning once where it falls back (see the module docstring)."""
    case = Case(device, dtype, decode, bias)
    forced = forced_backend()
    if forced is None:
        return _first_supporting(case, BACKENDS)
    backend = _BY_NAME[forced]
    out_of_scope = backend.out_of_scope(case)
    if out_of_scope is None:
        why = backend.unavailable(device, dtype)
        if why is not None:
            raise ValueError(f"FASTPEFT_BACKEND={forced} cannot run here: {why}")
        return forced
    chosen = _first_supporting(case, BACKENDS[BACKENDS.index(backend) + 1:])
    environment.warn_once(f"FASTPEFT_BACKEND={forced}: {out_of_scope}; such calls run on the {chosen} backend")
    return chosen


# torch.compile evaluates the choice once while tracing (it depends on the environment and on cached imports,
# which Dynamo cannot trace) and bakes the result into the graph. This is exactly what
# `torch.compiler.assume_constant_result` does (it sets this attribute), but calling it imports torch._dynamo,
# and with it triton, which `import fastpeft` must not do.
select._dynamo_marked_constant = True


def _first_supporting(case, candidates):
    passed = None   # (backend, why) of the last one passed over because it cannot run here
    for backend in candidates:
        if backend.out_of_scope(case) is not None:
            continue
        why = backend.unavailable(case.device, case.dtype)
        if why is None:
            if passed is not None and backend.name == "reference":
                environment.warn_fallback_once(f"attn_bias with {passed[1]}" if case.bias else passed[1])
            elif passed is not None and case.device.type in passed[0].expected_on:
                environment.warn_once(f"the {passed[0].name} backend cannot run here ({passed[1]}); using the "
                                   f"{backend.name} backend ({backend.summary})")
            return backend.name
        passed = (backend, why)
    raise AssertionError("the reference backend runs every case")


def backend_table(device=None, dtype=torch.float32):
    """``[(name, available, why)]`` in dispatch order for tensors of ``device`` (default: CUDA where present, else
    CPU) and ``dtype``: what ``fastpeft info`` and ``python -m fastpeft.selfcheck`` print."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for backend in BACKENDS:
        why = backend.unavailable(torch.device(device), dtype)
        rows.append((backend.name, why is None, backend.summary if why is None else why))
    return rows
