"""The compiled Triton kernels of prefix_attention on a CUDA device (marked ``gpu``; skipped without one).

Same matrix as the interpreter tests, in bf16 and fp16, plus shapes large enough for the autotuned tiles
(L = 1025, D = 128, P = 128, D = 256). Low-precision tolerance as in flash-attn's tests: relative to
float64 on the same rounded inputs, the kernel's error is at most twice PyTorch's own computation in that
dtype (cuBLAS matmuls, softmax in the dtype), plus a floor of 1e-4. float32 uses IEEE dots: 1e-5.
Run these in their own process (the kernels must not have been imported under ``TRITON_INTERPRET=1``).
"""

import pytest
import torch

import fastpeft
from tests.cases import CASES, GRAD_NAMES, Case, forward_and_grads, make_inputs
from tests.lowp_reference import torch_lowp_attention
from tests.reference import assert_close, concat_reference, relative_error

pytestmark = pytest.mark.gpu

LARGE_CASES = [
    Case("large-table-leftpad", B=2, Hq=8, Hkv=2, L=1025, S=1025, P=128, D=128, T=3, ragged=True,
         padding="left"),
    Case("large-noncausal-rightpad", B=2, Hq=4, Hkv=4, L=1025, S=1025, P=128, D=128, causal=False,
         padding="right"),
    Case("large-cache", B=2, Hq=8, Hkv=1, L=257, S=1100, P=128, D=128, T=2),
    Case("d256", B=2, Hq=4, Hkv=2, L=200, S=230, P=70, D=256, T=2, ragged=True),
    Case("decode-grad-d96", B=4, Hq=8, Hkv=2, L=1, S=333, P=128, D=96, T=3, ragged=True, padding="left"),
]


@pytest.fixture(autouse=True)
def _compiled_triton(monkeypatch):
    import fastpeft.kernels.prefix_attention as kernels

    if kernels.INTERPRETING:
        pytest.skip("fastpeft.kernels.prefix_attention was imported under TRITON_INTERPRET=1 in this process; "
                    "run the gpu tests in a separate process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")


def _run_case(case, dtype, seed=1, fn=None):
    inputs = make_inputs(case, dtype, device="cuda", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(case.B, case.Hq, case.L, case.D, generator=g).to(dtype=dtype, device="cuda")
    out, grads = forward_and_grads(fn or fastpeft.prefix_attention, inputs, dout)
    ref_inputs = {n: (t.detach().double().requires_grad_(n in GRAD_NAMES) if torch.is_tensor(t) and
                      t.is_floating_point() else t) for n, t in inputs.items()}
    ref_out, ref_grads = forward_and_grads(concat_reference, ref_inputs, dout.double())
    actual = {"out": out, **{f"d{n}": grads[n] for n in GRAD_NAMES}}
    expected = {"out": ref_out, **{f"d{n}": ref_grads[n] for n in GRAD_NAMES}}
    return inputs, dout, actual, expected


def _check_low_precision(case, dtype):
    inputs, dout, actual, expected = _run_case(case, dtype)
    torch_out, torch_grads = forward_and_grads(torch_lowp_attention, inputs, dout)
    baseline = {"out": torch_out, **{f"d{n}": torch_grads[n] for n in GRAD_NAMES}}
    for name in actual:
        assert actual[name].dtype == dtype, name
        assert torch.isfinite(actual[name]).all(), f"{name} has NaN/Inf"
        err = relative_error(actual[name], expected[name])
        bound = 2 * relative_error(baseline[name], expected[name]) + 1e-4
        assert err <= bound, f"{name}: kernel error {err:.2e} > 2 x PyTorch {dtype} error + 1e-4 = {bound:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES + LARGE_CASES, ids=str)
def test_low_precision_error_within_twice_pytorch(case, dtype):
    _check_low_precision(case, dtype)


@pytest.mark.parametrize("case", CASES + LARGE_CASES[3:], ids=str)
def test_fp32_matches_float64(case):
    _, _, actual, expected = _run_case(case, torch.float32)
    for name in actual:
        assert_close(actual[name], expected[name], 1e-5, name)


def test_deterministic_mode_is_bitwise_reproducible_on_gpu():
    # 16 rows share 2 table entries: the atomic path adds concurrently, the deterministic path must not vary.
    case = Case("many-rows", B=16, Hq=8, Hkv=2, L=300, S=300, P=128, D=64, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.bfloat16, device="cuda", seed=3)
    dout = torch.randn(case.B, case.Hq, case.L, case.D, device="cuda", dtype=torch.bfloat16)

    def grads(deterministic):
        return forward_and_grads(lambda **kw: fastpeft.prefix_attention(**kw, deterministic=deterministic),
                                 inputs, dout)[1]

    first, second, atomic = grads(True), grads(True), grads(False)
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), f"d{name} differs between deterministic runs"
        assert_close(first[name], atomic[name], 1e-2, f"d{name} deterministic vs atomic")


def test_query_that_sees_nothing_gives_zeros_on_gpu():
    case = Case("blind", B=2, Hq=4, Hkv=2, L=70, S=70, P=16, D=64, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.bfloat16, device="cuda", seed=4)
    inputs["prefix_index"] = torch.tensor([1, 0], device="cuda")
    inputs["prefix_lengths"] = torch.tensor([0, 16], device="cuda")
    inputs["key_padding_mask"] = torch.ones(2, 70, dtype=torch.bool, device="cuda")
    inputs["key_padding_mask"][1, :40] = False          # row 1: no prefix, queries 0..39 see only padding
    out = fastpeft.prefix_attention(**inputs)
    assert torch.equal(out[1, :, :40], torch.zeros_like(out[1, :, :40]))
    out.float().square().sum().backward()
    for name in GRAD_NAMES:
        assert torch.isfinite(inputs[name].grad).all(), f"d{name} has NaN/Inf"
    assert torch.equal(inputs["q"].grad[1, :, :40], torch.zeros_like(inputs["q"].grad[1, :, :40]))


def test_transposed_inputs_on_gpu():
    # [B, L, H, D] activations viewed as [B, H, L, D], as the transformers integration passes them.
    case = Case("transposed", B=2, Hq=8, Hkv=2, L=130, S=130, P=32, D=128, T=2, ragged=True, padding="left")
    base = make_inputs(case, torch.bfloat16, device="cuda", seed=5, requires_grad=False)
    inputs = dict(base)
    for name in ("q", "k", "v"):
        inputs[name] = base[name].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    for name in ("prefix_k", "prefix_v"):
        inputs[name] = base[name].clone().requires_grad_(True)
    dout = torch.randn(case.B, case.Hq, case.L, case.D, device="cuda", dtype=torch.bfloat16)

    def deterministic(**kwargs):    # no atomics: both layouts must give the same numbers
        return fastpeft.prefix_attention(**kwargs, deterministic=True)

    out, grads = forward_and_grads(deterministic, inputs, dout)
    contiguous = {n: (t.detach().contiguous().requires_grad_(True) if n in GRAD_NAMES else t)
                  for n, t in inputs.items()}
    ref_out, ref_grads = forward_and_grads(deterministic, contiguous, dout)
    assert out.stride() == inputs["q"].stride()
    assert_close(out, ref_out, 1e-6, "out")
    for name in GRAD_NAMES:
        assert_close(grads[name], ref_grads[name], 1e-6, f"d{name}")
