"""The PyTorch reference path of prefix_attention against the float64 concatenation reference."""

import pytest
import torch

import fastpeft
from tests.cases import CASES, GRAD_NAMES, Case, forward_and_grads, make_inputs
from tests.reference import assert_close, concat_reference


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "reference")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients_match_float64_concat(case):
    inputs = make_inputs(case, torch.float32, seed=1)
    dout = torch.randn(case.B, case.Hq, case.L, case.D, generator=torch.Generator().manual_seed(2))
    out, grads = forward_and_grads(fastpeft.prefix_attention, inputs, dout)

    ref_inputs = {n: (t.detach().double().requires_grad_(n in GRAD_NAMES) if torch.is_tensor(t) and
                      t.is_floating_point() else t) for n, t in inputs.items()}
    ref_out, ref_grads = forward_and_grads(concat_reference, ref_inputs, dout.double())
    assert_close(out, ref_out, 1e-5, "out")
    for name in GRAD_NAMES:
        assert_close(grads[name], ref_grads[name], 1e-5, f"d{name}")


def test_query_that_sees_nothing_gives_zeros_not_nan():
    case = Case("blind", B=2, L=3, S=3, P=2, T=1, ragged=True, padding="left")
    inputs = make_inputs(case, seed=3)
    inputs["prefix_lengths"] = torch.tensor([0])
    inputs["key_padding_mask"] = torch.tensor([[True, True, True], [False, False, True]])
    out = fastpeft.prefix_attention(**inputs)
    # Row 1, queries 0 and 1 see no key: no prefix, and their causal keys are all padding.
    assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))
    assert torch.isfinite(out).all()
    out.sum().backward()
    for name in GRAD_NAMES:
        assert torch.isfinite(inputs[name].grad).all(), name


def test_shared_prefix_gradient_is_sum_over_rows():
    case = Case("sum", B=3, T=0)
    inputs = make_inputs(case, seed=4)
    fastpeft.prefix_attention(**inputs).sum().backward()
    total = inputs["prefix_k"].grad.clone()
    per_row = torch.zeros_like(total)
    for b in range(case.B):
        row = {n: (t[b:b + 1].detach() if n in ("q", "k", "v") else t.detach()) for n, t in inputs.items()
               if torch.is_tensor(t)}
        row["causal"] = case.causal
        row["prefix_k"].requires_grad_(True)
        fastpeft.prefix_attention(**row).sum().backward()
        per_row += row["prefix_k"].grad
        row["prefix_k"].grad = None
    assert_close(total, per_row, 1e-6, "dprefix_k")


def test_float64_gradcheck():
    case = Case("gradcheck", B=2, Hq=2, Hkv=1, L=3, S=4, P=2, D=3, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.float64, seed=5)
    names = list(GRAD_NAMES)

    def fn(*tensors):
        kwargs = dict(inputs)
        kwargs.update(zip(names, tensors))
        return fastpeft.prefix_attention(**kwargs)

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names))


def test_empty_sequence_gives_empty_output():
    q, k = torch.randn(2, 4, 0, 8), torch.randn(2, 2, 0, 8)
    out = fastpeft.prefix_attention(q, k, k, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    assert out.shape == (2, 4, 0, 8)


def test_compiles_fullgraph_with_a_prefix_table():
    # The value checks of prefix_index/prefix_lengths are data-dependent; under torch.compile they are skipped.
    case = Case("compiled", B=2, T=3, ragged=True, padding="left")
    inputs = make_inputs(case, seed=6, requires_grad=False)
    compiled = torch.compile(fastpeft.prefix_attention, backend="aot_eager", fullgraph=True)
    assert_close(compiled(**inputs), fastpeft.prefix_attention(**inputs), 1e-6, "compiled")
