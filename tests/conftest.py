import os

import pytest
import torch

# Triton fixes interpreter mode when it is first imported: a kernel module imported (or even triton itself) before
# TRITON_INTERPRET=1 is set cannot be interpreted later ("Cannot call @triton.jit'd outside of the scope of a
# kernel"). On a CPU-only torch build the interpreter is the only way to run the kernels, so turn it on for the
# whole session before anything imports triton. Which backend a test uses is still FASTPEFT_BACKEND's choice:
# `_default_reference_backend` below keeps tests that do not ask for Triton on the fast reference path.
CPU_ONLY_TORCH = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
if CPU_ONLY_TORCH:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _cuda_available():
    # Only called when a gpu-marked test is about to run, never at collection.
    return torch.cuda.is_available()


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not _cuda_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _default_reference_backend(monkeypatch):
    """Tests run the reference path unless they set FASTPEFT_BACKEND themselves (monkeypatch overrides this)."""
    if CPU_ONLY_TORCH and "FASTPEFT_BACKEND" not in os.environ:
        monkeypatch.setenv("FASTPEFT_BACKEND", "reference")


@pytest.fixture
def backend_env(monkeypatch):
    """Set FASTPEFT_BACKEND for one test. (TRITON_INTERPRET is session-wide, see above: setting it here, after
    triton was imported, would break the kernels instead of interpreting them.)"""

    def set_backend(name):
        monkeypatch.setenv("FASTPEFT_BACKEND", name)

    return set_backend
