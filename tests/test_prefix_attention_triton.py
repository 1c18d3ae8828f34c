"""The Triton kernels of prefix_attention (forward and the five gradients) against the float64 concatenation
reference, on CPU tensors under the Triton interpreter (``FASTPEFT_TEST_DEVICE=cuda`` runs them on the GPU).

Low-precision tolerance: the kernel and PyTorch's own computation in that dtype
(``tests.lowp_reference.torch_lowp_attention``: gather, concatenate, mask, softmax, all in fp16/bf16) get
the same rounded inputs; both are measured against float64 on those inputs, and the kernel's relative error
must stay within twice PyTorch's (plus a floor of 1e-4 for outputs PyTorch happens to hit almost exactly).
Measured: fp16 about 0.6-0.9x PyTorch's error, bf16 up to about 1.5x (the kernel rounds P and dS to bf16
before their dots, as FlashAttention does)."""

import importlib
import os

import pytest
import torch

import fastpeft
from fastpeft.ops import registry

dispatch = importlib.import_module("fastpeft.ops.prefix_attention")   # fastpeft.ops re-exports the function
from tests.cases import CASES, GRAD_NAMES, Case, forward_and_grads, make_inputs
from tests.lowp_reference import torch_lowp_attention
from tests.reference import assert_close, concat_reference, relative_error

DEVICE = os.environ.get("FASTPEFT_TEST_DEVICE", "cpu")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    # A CUDA build of torch: conftest leaves the interpreter off; FASTPEFT_TEST_DEVICE=cuda runs this file on the GPU.
    pytest.skip("CPU Triton tests need the interpreter (CPU-only torch) or FASTPEFT_TEST_DEVICE=cuda",
                allow_module_level=True)

# Shapes large enough for several 16-wide interpreter tiles: the causal diagonal split (full, crossed and
# skipped blocks), S > L over several blocks, prefixes longer than one block, a query-heavy GQA group.
MULTI_BLOCK_CASES = [
    Case("multiblock-table-leftpad", B=3, Hq=2, Hkv=1, L=37, S=53, P=21, D=40, T=2, ragged=True, padding="left"),
    Case("multiblock-noncausal-rightpad", B=2, Hq=2, Hkv=1, L=33, S=33, P=18, D=24, causal=False,
         padding="right"),
    Case("multiblock-gqa4-cache", B=2, Hq=4, Hkv=1, L=20, S=40, P=17, D=64, T=3),
    Case("no-prefix-P0", B=2, L=17, S=17, P=0, D=16),
]
FP32_CASES = CASES + MULTI_BLOCK_CASES


@pytest.fixture(autouse=True)
def _triton_backend(backend_env):
    backend_env("triton")


def _reference_grads(inputs, dout):
    ref_inputs = {n: (t.detach().double().requires_grad_(n in GRAD_NAMES) if torch.is_tensor(t) and
                      t.is_floating_point() else t) for n, t in inputs.items()}
    return forward_and_grads(concat_reference, ref_inputs, dout.double())


def _dout(case, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.B, case.Hq, case.L, case.D, generator=g).to(dtype=dtype, device=DEVICE)


def _check_against_reference(case, dtype, seed=1):
    inputs = make_inputs(case, dtype, device=DEVICE, seed=seed)
    dout = _dout(case, dtype)
    out, grads = forward_and_grads(fastpeft.prefix_attention, inputs, dout)
    ref_out, ref_grads = _reference_grads(inputs, dout)
    results = {"out": (out, ref_out)}
    results.update({f"d{n}": (grads[n], ref_grads[n]) for n in GRAD_NAMES})
    return inputs, dout, results


@pytest.mark.parametrize("case", FP32_CASES, ids=str)
def test_fp32_forward_and_gradients_match_float64(case):
    # IEEE float32 dots (no TF32) and float32 accumulation: the observed error is ~3e-7, the SPEC bound 1e-5.
    _, _, results = _check_against_reference(case, torch.float32)
    for name, (actual, expected) in results.items():
        assert actual.dtype == torch.float32
        assert_close(actual, expected, 1e-5, name)


def _check_low_precision(case, dtype):
    inputs, dout, results = _check_against_reference(case, dtype)
    torch_out, torch_grads = forward_and_grads(torch_lowp_attention, inputs, dout)
    baseline = {"out": torch_out, **{f"d{n}": torch_grads[n] for n in GRAD_NAMES}}
    for name, (actual, expected) in results.items():
        assert actual.dtype == dtype, name
        assert torch.isfinite(actual).all(), name
        bound = 2 * relative_error(baseline[name], expected) + 1e-4
        err = relative_error(actual, expected)
        assert err <= bound, f"{name}: kernel error {err:.2e} > 2 x PyTorch {dtype} error + 1e-4 = {bound:.2e}"


@pytest.mark.parametrize("case", CASES + MULTI_BLOCK_CASES[:1], ids=str)
def test_fp16_error_within_twice_pytorch_fp16(case):
    _check_low_precision(case, torch.float16)


@pytest.mark.parametrize("case", [CASES[4], MULTI_BLOCK_CASES[0]], ids=str)
def test_bf16_error_within_twice_pytorch_bf16(case):
    # The interpreter upcasts bf16 dot operands to fp32 (its bf16 dot is wrong); P and dS are still rounded to
    # bf16 before their dots, as on the GPU.
    _check_low_precision(case, torch.bfloat16)


@pytest.mark.parametrize("case", MULTI_BLOCK_CASES[:3], ids=str)
def test_split_backward_matches_float64_like_the_fused_one(case, monkeypatch):
    # FASTPEFT_TRITON_BWD=split: the 7-matmul backward (separate dq pass, no dq atomics) kept for comparison on the
    # GPU; the default fused one is what the other tests run. Both against float64, and against each other.
    monkeypatch.setenv("FASTPEFT_TRITON_BWD", "split")
    _, _, split = _check_against_reference(case, torch.float32)
    monkeypatch.setenv("FASTPEFT_TRITON_BWD", "fused")
    _, _, fused = _check_against_reference(case, torch.float32)
    for name, (actual, expected) in split.items():
        assert_close(actual, expected, 1e-5, f"split {name}")
        assert_close(actual, fused[name][0], 1e-5, f"split vs fused {name}")


def test_unknown_backward_mode_is_refused(monkeypatch):
    from fastpeft.kernels.prefix_attention import bwd_mode

    monkeypatch.setenv("FASTPEFT_TRITON_BWD", "bogus")
    with pytest.raises(ValueError, match="FASTPEFT_TRITON_BWD"):
        bwd_mode()
    assert bwd_mode("fused", deterministic=True) == "split"


def test_deterministic_prefix_gradients_are_reproducible_and_match_atomics():
    # Several rows share each table entry, so the atomic path really sums concurrently.
    case = Case("shared-entries", B=5, Hq=2, Hkv=1, L=10, S=12, P=20, D=16, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.float32, device=DEVICE, seed=7)
    dout = _dout(case, torch.float32)

    def run(deterministic):
        return forward_and_grads(lambda **kw: fastpeft.prefix_attention(**kw, deterministic=deterministic),
                                 inputs, dout)[1]

    first, second, atomic = run(True), run(True), run(False)
    _, ref_grads = _reference_grads(inputs, dout)
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), f"d{name} differs between deterministic runs"
        assert_close(first[name], atomic[name], 1e-6, f"d{name} deterministic vs atomic")
        assert_close(first[name], ref_grads[name], 1e-5, f"d{name} deterministic vs float64")


def test_query_that_sees_nothing_gives_zero_output_lse_inf_and_zero_gradients():
    from fastpeft.kernels.prefix_attention import prefix_attention_bwd, prefix_attention_fwd

    case = Case("blind", B=2, Hq=2, Hkv=1, L=5, S=5, P=3, D=16, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.float32, device=DEVICE, seed=3, requires_grad=False)
    prefix_index = torch.tensor([1, 0], dtype=torch.int32, device=DEVICE)
    prefix_lengths = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)      # row 1 has no prefix
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    mask[1, :3] = False                                   # row 1, queries 0..2 see only padding
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"], prefix_index,
            prefix_lengths, mask, True, 0.25)
    out, lse = prefix_attention_fwd(*args)
    assert torch.equal(out[1, :, :3], torch.zeros_like(out[1, :, :3]))
    assert torch.isinf(lse[1, :, :3]).all() and (lse[1, :, :3] > 0).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[0]).all() and torch.isfinite(lse[1, :, 3:]).all()

    dout = _dout(case, torch.float32)
    grads = prefix_attention_bwd(dout, *args[:8], out, lse, True, 0.25, False)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][1, :, :3], torch.zeros_like(grads[0][1, :, :3]))      # dq of the blind queries
    assert torch.equal(grads[1][1, :, :3], torch.zeros_like(grads[1][1, :, :3]))      # dk of padding keys
    assert torch.equal(grads[3][0], torch.zeros_like(grads[3][0]))                    # entry of length 0
    leaves = [t.detach().double().requires_grad_(True) for t in args[:5]]
    ref = concat_reference(*leaves, prefix_index, prefix_lengths, mask, True, 0.25)
    ref.backward(dout.double())
    assert_close(out, ref, 1e-5, "out")
    for grad, leaf, name in zip(grads, leaves, GRAD_NAMES):
        assert_close(grad, leaf.grad, 1e-5, f"d{name}")


def test_lse_is_the_natural_log_normalizer():
    from fastpeft.kernels.prefix_attention import prefix_attention_fwd

    case = Case("lse", B=2, Hq=4, Hkv=2, L=18, S=21, P=6, D=40, T=2, ragged=True, padding="right")
    inputs = make_inputs(case, torch.float32, device=DEVICE, seed=11, requires_grad=False)
    scale = 0.3
    _, lse = prefix_attention_fwd(inputs["q"], inputs["k"], inputs["v"], inputs["prefix_k"], inputs["prefix_v"],
                                  inputs["prefix_index"].int(), inputs["prefix_lengths"].int(),
                                  inputs["key_padding_mask"], True, scale)
    expected = torch.empty_like(lse, dtype=torch.float64)
    for b in range(case.B):
        t = int(inputs["prefix_index"][b])
        plen = int(inputs["prefix_lengths"][t])
        keys = torch.cat([inputs["prefix_k"][t, :, :plen], inputs["k"][b]], dim=1).double()
        keys = keys.repeat_interleave(case.Hq // case.Hkv, dim=0)
        scores = torch.einsum("hld,hsd->hls", inputs["q"][b].double(), keys) * scale
        visible = torch.ones(case.L, plen + case.S, dtype=torch.bool, device=DEVICE)
        visible[:, plen:] &= inputs["key_padding_mask"][b][None, :]
        visible[:, plen:] &= torch.arange(case.S, device=DEVICE)[None, :] <= (
            torch.arange(case.L, device=DEVICE)[:, None] + case.S - case.L)
        expected[b] = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    assert_close(lse, expected, 1e-6, "lse")


def test_strided_and_transposed_inputs():
    # The integration passes [B, L, H, D] buffers transposed to [B, H, L, D]; a sliced head dim is not
    # unit-stride and is copied once at the boundary. Outputs and gradients keep the inputs' layout.
    case = Case("strided", B=2, Hq=4, Hkv=2, L=9, S=12, P=5, D=24, T=2, ragged=True, padding="left")
    base = make_inputs(case, torch.float32, device=DEVICE, seed=5, requires_grad=False)
    g = torch.Generator().manual_seed(6)
    q = base["q"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    k = base["k"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    v_wide = torch.randn(case.B, case.Hkv, case.S, 2 * case.D, generator=g).to(DEVICE)
    v = v_wide[..., ::2].detach().requires_grad_(True)                    # last stride 2
    prefix_k = base["prefix_k"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    prefix_v = base["prefix_v"].clone().requires_grad_(True)
    mask = torch.ones(case.B, 2 * case.S, dtype=torch.bool, device=DEVICE)[:, ::2]   # strided mask
    mask[1, :4] = False
    inputs = dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, prefix_index=base["prefix_index"],
                  prefix_lengths=base["prefix_lengths"], key_padding_mask=mask, causal=True)
    dout = _dout(case, torch.float32)
    out, grads = forward_and_grads(fastpeft.prefix_attention, inputs, dout)
    ref_out, ref_grads = _reference_grads(inputs, dout)
    assert_close(out, ref_out, 1e-5, "out")
    for name in GRAD_NAMES:
        assert_close(grads[name], ref_grads[name], 1e-5, f"d{name}")
    assert out.stride() == q.stride(), "out should share q's [B, L, H, D] memory layout"
    assert grads["q"].stride() == q.stride() and grads["k"].stride() == k.stride()


def test_dispatcher_runs_the_triton_kernels(monkeypatch):
    import fastpeft.kernels.prefix_attention as kernels

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference path ran instead of Triton")

    calls = []

    def counting(launcher):
        def wrapper(*args, **kwargs):
            calls.append(launcher.__name__)
            return launcher(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(registry.get("reference"), "forward", no_reference)
    monkeypatch.setattr(kernels, "prefix_attention_fwd", counting(kernels.prefix_attention_fwd))
    monkeypatch.setattr(kernels, "prefix_attention_bwd", counting(kernels.prefix_attention_bwd))
    inputs = make_inputs(CASES[0], torch.float32, device=DEVICE, seed=9)
    fastpeft.prefix_attention(**inputs).sum().backward()
    assert calls == ["prefix_attention_fwd", "prefix_attention_bwd"]
    assert all(inputs[n].grad is not None for n in GRAD_NAMES)


def test_no_grad_saves_nothing_and_matches():
    case = CASES[5]
    inputs = make_inputs(case, torch.float32, device=DEVICE, seed=4)
    with torch.no_grad():
        out = fastpeft.prefix_attention(**inputs)
    assert out.grad_fn is None
    ref = concat_reference(**{n: (t.detach() if torch.is_tensor(t) else t) for n, t in inputs.items()})
    assert_close(out, ref, 1e-5, "out")


def test_torch_compile_traces_the_custom_ops():
    # aot_eager runs the ops' fake implementations and the registered autograd at trace time (no C++ compiler
    # needed); the graph then calls the real kernels.
    case = CASES[4]
    inputs = make_inputs(case, torch.float32, device=DEVICE, seed=12)
    dout = _dout(case, torch.float32)
    compiled = torch.compile(dispatch.prefix_attention_prevalidated, backend="aot_eager", fullgraph=True)
    out, grads = forward_and_grads(compiled, inputs, dout)
    ref_out, ref_grads = _reference_grads(inputs, dout)
    assert_close(out, ref_out, 1e-5, "out")
    for name in GRAD_NAMES:
        assert_close(grads[name], ref_grads[name], 1e-5, f"d{name}")


def test_unchecked_indices_are_clamped_into_the_table():
    # prefix_attention_prevalidated skips the value checks; the kernels must still never read outside the
    # table: an index past T reads the last entry, a length past P is cut to P.
    case = Case("unchecked", B=3, Hq=2, Hkv=1, L=6, S=6, P=4, D=16, T=2)
    inputs = make_inputs(case, torch.float32, device=DEVICE, seed=13)
    bad = dict(inputs, prefix_index=torch.tensor([5, -3, 1], device=DEVICE),
               prefix_lengths=torch.tensor([9, 2], device=DEVICE))
    clamped = dict(inputs, prefix_index=torch.tensor([1, 0, 1], device=DEVICE),
                   prefix_lengths=torch.tensor([4, 2], device=DEVICE))
    dout = _dout(case, torch.float32)
    out, grads = forward_and_grads(dispatch.prefix_attention_prevalidated, bad, dout)
    ref_out, ref_grads = _reference_grads(clamped, dout)
    assert_close(out, ref_out, 1e-5, "out")
    for name in GRAD_NAMES:
        assert_close(grads[name], ref_grads[name], 1e-5, f"d{name}")
