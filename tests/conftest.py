import os

import pytest


def _cuda_available():
    # Only called when a gpu-marked test is about to run, never at collection.
    import torch

    return torch.cuda.is_available()


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not _cuda_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture
def backend_env(monkeypatch):
    """Set FASTPEFT_BACKEND (and TRITON_INTERPRET for triton on CPU) for one test."""

    def set_backend(name):
        monkeypatch.setenv("FASTPEFT_BACKEND", name)
        if name == "triton" and os.environ.get("FASTPEFT_TEST_DEVICE", "cpu") == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    return set_backend
