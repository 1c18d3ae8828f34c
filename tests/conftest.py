import os

import pytest
import torch

# Triton fixes interpreter mode when it is first imported: a kernel module imported (or even triton itself) before
# TRITON_INTERPRET=1 is set cannot be interpreted later ("Cannot call @triton.jit'd outside of the scope of a
# kernel"). On a CPU-only torch build the interpreter is the only way to run the kernels, so turn it on for the
# whole session before anything imports triton. Which backend a test uses is still FASTPEFT_BACKEND's choice.
CPU_ONLY_TORCH = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
if CPU_ONLY_TORCH:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # With the interpreter on, an unforced CPU call would pick the (interpreted, slow) Triton kernels, so the session
    # forces the backend a CPU user gets by default: sdpa (PyTorch's fused attention ops). Session-wide, not per
    # test: module-scoped fixtures and subprocesses see it too. Tests that want the Triton kernels or the reference
    # path set FASTPEFT_BACKEND themselves (monkeypatch restores "sdpa" afterwards).
    os.environ.setdefault("FASTPEFT_BACKEND", "sdpa")


def _cuda_available():
    # Only called when a gpu-marked test is about to run, never at collection.
    return torch.cuda.is_available()


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not _cuda_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture
def backend_env(monkeypatch):
    """Set FASTPEFT_BACKEND for one test. (TRITON_INTERPRET is session-wide, see above: setting it here, after
    triton was imported, would break the kernels instead of interpreting them.)"""

    def set_backend(name):
        monkeypatch.setenv("FASTPEFT_BACKEND", name)

    return set_backend


@pytest.fixture(scope="session")
def setup_module():
    """setup.py as a module: imported under another name than __main__, it defines its helpers without calling
    setup()."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("fastpeft_setup_under_test",
                                                  Path(__file__).resolve().parent.parent / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
