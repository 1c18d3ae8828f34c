"""The backend registry (``fastpeft.ops.registry``): SPEC's dispatch order in one place, each backend saying why it
cannot run a call, ``FASTPEFT_BACKEND`` forcing one, and the table ``fastpeft info`` and the self-check print."""

import warnings

import pytest
import torch

from fastpeft.ops import environment
from fastpeft.ops import library, registry
from fastpeft.ops.arguments import canonicalize
from fastpeft.ops.backends.base import Case
from tests.cases import CASES, make_inputs

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(environment, "_warned_messages", set())


def test_dispatch_order_is_the_specs():
    assert registry.NAMES == ("cuda", "triton", "sdpa", "reference")


def test_every_backend_says_why_it_cannot_run_a_case():
    training_with_bias = Case(CPU, torch.float32, decode=False, bias=True)
    assert "attn_bias" in registry.get("cuda").supports(training_with_bias)
    assert "attn_bias" in registry.get("triton").supports(training_with_bias)
    assert registry.get("sdpa").supports(training_with_bias) is None
    assert registry.get("reference").supports(training_with_bias) is None
    assert "decode" in registry.get("cuda").supports(Case(CPU, torch.float32, decode=False, bias=False))
    assert "CUDA tensors" in registry.get("cuda").supports(Case(CPU, torch.float32, decode=True, bias=False))
    assert "float64" in registry.get("triton").unavailable(torch.device("cuda"), torch.float64)


def test_backend_table_lists_every_backend_in_order_with_a_reason():
    rows = registry.backend_table(CPU)
    assert [name for name, _, _ in rows] == list(registry.NAMES)
    available = {name: ok for name, ok, _ in rows}
    assert available["cuda"] is False and available["sdpa"] is True and available["reference"] is True
    assert all(why for _, _, why in rows)


def test_forced_backend_that_cannot_run_a_call_raises_naming_why(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND=cuda cannot run here: needs CUDA tensors"):
        registry.select(CPU, torch.float32, decode=True, bias=False)


def test_forced_backend_hands_calls_it_never_implements_to_the_next_with_one_warning(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    monkeypatch.setattr(registry.get("triton"), "unavailable", lambda device, dtype: "triton is not installed")
    message = "FASTPEFT_BACKEND=cuda: the CUDA extension implements decode .* only; such calls run on the sdpa"
    with pytest.warns(RuntimeWarning, match=message):
        assert registry.select(CPU, torch.float32, decode=False, bias=False) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once
        assert registry.select(CPU, torch.float32, decode=False, bias=False) == "sdpa"


def test_passing_over_the_expected_backend_of_a_device_warns_once(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    cuda = torch.device("cuda")
    monkeypatch.setattr(registry.get("triton"), "unavailable", lambda device, dtype: "triton is not importable")
    with pytest.warns(RuntimeWarning, match=r"the triton backend cannot run here \(triton is not importable\); "
                                            "using the sdpa backend"):
        assert registry.select(cuda, torch.float32, decode=False, bias=False) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.select(cuda, torch.float32, decode=False, bias=False) == "sdpa"


def test_the_custom_ops_refuse_the_reference_backend():
    # The reference is plain PyTorch (traced by torch.compile as it is): no custom op runs it.
    args = canonicalize(**make_inputs(CASES[0], requires_grad=False))
    with pytest.raises(ValueError, match="reference backend is plain differentiable PyTorch"):
        library.prefix_attention_fwd(*args, "reference")
