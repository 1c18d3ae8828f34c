"""prefix_attention with an additive score bias (``attn_bias`` over ``[prefix ; k]``), on the reference and the sdpa
backends, against the float64 concatenation reference (concatenate, add the bias, mask, softmax): the forward and
every gradient (q, k, v, prefix_k, prefix_v and the bias, summed over its broadcast axes). Also the validation of
the argument, the dispatch (the Triton/CUDA kernels take no bias), torch.compile and the CUDA plumbing on meta
tensors."""

import warnings

import pytest
import torch

import fastpeft
from fastpeft.ops import environment
from fastpeft.ops import library, registry
from fastpeft.ops.arguments import canonicalize
from tests.cases import CASES, GRAD_NAMES, Case, make_inputs
from tests.reference import assert_close, concat_reference

BIAS_CASES = CASES + [
    Case("cache-gqa3-table-leftpad", B=3, Hq=6, Hkv=2, L=5, S=12, P=7, D=40, T=2, ragged=True, padding="left"),
    Case("cache-noncausal-rightpad", B=3, Hq=6, Hkv=3, L=5, S=12, P=4, D=33, padding="right", causal=False),
    Case("decode-mqa-table", B=4, Hq=8, Hkv=1, L=1, S=17, P=6, D=96, T=3, ragged=True, padding="left"),
    Case("d-small-odd-mqa", B=2, Hq=3, Hkv=1, L=6, S=6, P=5, D=7),
    Case("multiblock-gqa4", B=2, Hq=8, Hkv=2, L=70, S=70, P=9, D=24, T=2, ragged=True, padding="left"),
]
# "t5": [1, Hq, L, P+S], what T5 hands its attention; "rows": [B, 1, 1, P+S]; "2d": [L, P+S], broadcast over rows and
# heads; "full": [B, Hq, L, P+S]; "neginf": full, with -inf entries (and one query's whole row) masking keys.
BIAS_KINDS = ("t5", "rows", "2d", "full", "neginf")
ALL_GRADS = GRAD_NAMES + ("attn_bias",)


def make_bias(case, kind, dtype=torch.float32, seed=7):
    g = torch.Generator().manual_seed(seed)
    B, Hq, L, P, S = case.B, case.Hq, case.L, case.P, case.S
    shape = {"t5": (1, Hq, L, P + S), "rows": (B, 1, 1, P + S), "2d": (L, P + S)}.get(kind, (B, Hq, L, P + S))
    bias = torch.randn(shape, generator=g) * 2
    if kind == "neginf":
        bias = bias.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf"))
        bias[-1, 0, 0] = float("-inf")
    return bias.to(dtype)


def _with_bias(case, kind, dtype=torch.float32, requires_grad=True, seed=1):
    inputs = make_inputs(case, dtype, seed=seed, requires_grad=requires_grad)
    inputs["attn_bias"] = make_bias(case, kind, dtype).requires_grad_(requires_grad)
    return inputs


def _forward_and_grads(fn, inputs, dout):
    for name in ALL_GRADS:
        inputs[name].grad = None
    out = fn(**inputs)
    out.backward(dout)
    return out.detach(), {name: inputs[name].grad.detach().clone() for name in ALL_GRADS}


def _check_against_float64(inputs, dout, rtol):
    out, grads = _forward_and_grads(fastpeft.prefix_attention, inputs, dout)
    ref_inputs = {n: (t.detach().double().requires_grad_(n in ALL_GRADS) if torch.is_tensor(t) and
                      t.is_floating_point() else t) for n, t in inputs.items()}
    ref_out, ref_grads = _forward_and_grads(concat_reference, ref_inputs, dout.double())
    assert torch.isfinite(out).all()
    assert_close(out, ref_out, rtol, "out")
    for name in ALL_GRADS:
        assert torch.isfinite(grads[name]).all(), f"d{name}"
        assert_close(grads[name], ref_grads[name], rtol, f"d{name}")


def _dout(case, dtype=torch.float32, seed=2):
    return torch.randn(case.B, case.Hq, case.L, case.D, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("kind", BIAS_KINDS)
@pytest.mark.parametrize("case", BIAS_CASES, ids=str)
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_fp32_forward_and_every_gradient_match_float64(backend, case, kind, backend_env):
    backend_env(backend)
    _check_against_float64(_with_bias(case, kind), _dout(case), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", [BIAS_CASES[2], BIAS_CASES[5], BIAS_CASES[12]], ids=str)
def test_sdpa_low_precision_within_1e_2(case, dtype, backend_env):
    backend_env("sdpa")
    _check_against_float64(_with_bias(case, "t5", dtype), _dout(case, dtype), 1e-2)


def test_queries_whose_bias_masks_every_key_give_zeros_and_zero_gradients(backend_env):
    backend_env("sdpa")
    case = Case("blind-by-bias", B=2, Hq=4, Hkv=2, L=3, S=5, P=2, D=8, causal=False)
    inputs = _with_bias(case, "full")
    with torch.no_grad():
        inputs["attn_bias"][1, 2, 1] = float("-inf")     # row 1, head 2, query 1 sees nothing
    out = fastpeft.prefix_attention(**inputs)
    assert torch.equal(out[1, 2, 1], torch.zeros_like(out[1, 2, 1]))
    out.backward(_dout(case))
    assert torch.equal(inputs["attn_bias"].grad[1, 2, 1], torch.zeros(case.P + case.S))
    assert torch.isfinite(inputs["q"].grad).all() and torch.equal(inputs["q"].grad[1, 2, 1], torch.zeros(case.D))


def test_bias_without_grad_gets_none_and_the_rest_are_exact(backend_env):
    backend_env("sdpa")
    case = BIAS_CASES[5]
    inputs = _with_bias(case, "t5")
    inputs["attn_bias"].requires_grad_(False)
    fastpeft.prefix_attention(**inputs).sum().backward()
    assert inputs["attn_bias"].grad is None
    assert inputs["q"].grad is not None


def test_float64_gradcheck_including_the_bias(backend_env):
    backend_env("sdpa")
    case = Case("gradcheck", B=2, Hq=2, Hkv=1, L=3, S=4, P=2, D=3, T=2, ragged=True, padding="left")
    inputs = _with_bias(case, "t5", torch.float64)
    names = list(ALL_GRADS)

    def fn(*tensors):
        kwargs = dict(inputs)
        kwargs.update(zip(names, tensors))
        return fastpeft.prefix_attention(**kwargs)

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names))


def test_zero_bias_equals_no_bias(backend_env):
    backend_env("sdpa")
    case = BIAS_CASES[5]
    inputs = make_inputs(case, seed=3, requires_grad=False)
    biased = fastpeft.prefix_attention(**inputs, attn_bias=torch.zeros(case.P + case.S))
    assert_close(biased, fastpeft.prefix_attention(**inputs), 1e-6, "zero bias")


@pytest.mark.parametrize("bad, match", [
    (lambda c: torch.zeros(c.B, c.Hq, c.L, c.S), r"P \+ S = 5 \+ 7 columns"),
    (lambda c: torch.zeros(c.B, 3, c.L, c.P + c.S), "broadcastable to"),
    (lambda c: torch.zeros(1, 1, c.B, c.Hq, c.L, c.P + c.S), "broadcastable to"),
    (lambda c: torch.zeros(c.P + c.S, dtype=torch.int64), "floating-point"),
    (lambda c: torch.zeros(c.P + c.S, dtype=torch.float64), "attn_bias is torch.float64"),
    (lambda c: torch.zeros(c.P + c.S, device="meta"), "attn_bias is on meta"),
    (lambda c: [0.0] * (c.P + c.S), "attn_bias must be a torch.Tensor"),
])
def test_bad_bias_raises_value_error_naming_it(bad, match):
    case = CASES[0]
    inputs = make_inputs(case, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        fastpeft.prefix_attention(**inputs, attn_bias=bad(case))


def test_strided_bias_is_read_correctly(backend_env):
    backend_env("sdpa")
    case = CASES[5]
    inputs = _with_bias(case, "full", requires_grad=False)
    transposed = inputs["attn_bias"].transpose(-1, -2).contiguous().transpose(-1, -2)   # last axis strided
    expected = fastpeft.prefix_attention(**inputs)
    inputs["attn_bias"] = transposed
    assert_close(fastpeft.prefix_attention(**inputs), expected, 1e-6, "strided bias")


@pytest.mark.parametrize("forced", ["triton", "cuda"])
def test_forced_kernel_backend_sends_biased_calls_to_sdpa_with_one_warning(forced, backend_env, monkeypatch):
    backend_env(forced)
    monkeypatch.setattr(environment, "_warned_messages", set())
    with pytest.warns(RuntimeWarning, match=f"FASTPEFT_BACKEND={forced}: the {forced} kernels take no attn_bias"):
        assert registry.select(torch.device("cpu"), torch.float32, False, True) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.select(torch.device("cpu"), torch.float32, False, True) == "sdpa"


def test_default_dispatch_of_a_biased_call_is_sdpa_even_where_triton_runs(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    monkeypatch.setattr(registry.get("triton"), "unavailable", lambda device, dtype: None)
    for device in ("cpu", "cuda"):
        assert registry.select(torch.device(device), torch.float32, False, True) == "sdpa"
    with pytest.warns(RuntimeWarning, match="reference path: attn_bias"):
        assert registry.select(torch.device("meta"), torch.float32, False, True) == "reference"


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles_fullgraph_forward_and_backward_with_the_bias_gradient(dynamic, backend_env):
    backend_env("sdpa")
    case = Case("compiled", B=2, Hq=4, Hkv=2, L=5, S=7, P=3, D=16, T=3, ragged=True, padding="left")
    inputs = _with_bias(case, "t5")
    dout = _dout(case)
    compiled = torch.compile(fastpeft.prefix_attention, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    out_c, grads_c = _forward_and_grads(compiled, inputs, dout)
    out_e, grads_e = _forward_and_grads(fastpeft.prefix_attention, inputs, dout)
    assert_close(out_c, out_e, 1e-6, "compiled out")
    for name in ALL_GRADS:
        assert_close(grads_c[name], grads_e[name], 1e-6, f"compiled d{name}")


def test_custom_op_passes_opcheck():
    case = Case("opcheck", B=2, Hq=4, Hkv=2, L=4, S=6, P=3, D=8, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, seed=2, requires_grad=False)
    q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, *_, scale, _ = canonicalize(**inputs)
    bias = make_bias(case, "t5")
    args = tuple(t.clone().requires_grad_(True) for t in (q, k, v, prefix_k, prefix_v)) + (
        prefix_index, prefix_lengths, mask, bias.requires_grad_(True), True, scale, False, "sdpa")
    torch.library.opcheck(library.prefix_attention_fwd, args, test_utils=("test_schema", "test_faketensor",
                                                                          "test_autograd_registration"))


@pytest.mark.parametrize("case", [BIAS_CASES[2], BIAS_CASES[8], BIAS_CASES[12], BIAS_CASES[14]], ids=str)
def test_cuda_path_plumbing_on_meta_tensors(case):
    # On a non-CPU device the biased path runs PyTorch's memory-efficient ops (which have meta kernels) with the
    # bias in aligned storage, kv heads repeated, head sizes padded: shapes and the whole plan are exercised here
    # without a GPU, the numbers only by a GPU run.
    inputs = make_inputs(case, device="meta", requires_grad=False)
    args = canonicalize(**inputs, attn_bias=make_bias(case, "t5").to("meta"), deterministic=True,
                        check_values=False)
    sdpa = registry.get("sdpa")
    out, lse, _ = sdpa.forward(args, None, for_backward=True)
    q = args.q
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    grads = sdpa.backward(torch.empty_like(q), args, out, lse, (), None, True)
    for grad, like in zip(grads, (q, args.k, args.v, args.prefix_k, args.prefix_v, args.attn_bias)):
        assert grad.shape == like.shape


# ----------------------------------------------------------------------------------------------------------
# CUDA (PyTorch's memory-efficient kernels with the bias in aligned storage): forced sdpa on the GPU.

GPU_CASES = [BIAS_CASES[2], BIAS_CASES[5], BIAS_CASES[7], BIAS_CASES[8], BIAS_CASES[12], BIAS_CASES[14]]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["t5", "neginf"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_fp32_forward_and_every_gradient_match_float64(case, kind, backend_env):
    backend_env("sdpa")
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = {n: (t.detach().cuda().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t)
              for n, t in _with_bias(case, kind).items()}
    _check_against_float64(inputs, _dout(case).cuda(), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_low_precision_within_1e_2(case, dtype, backend_env):
    backend_env("sdpa")
    inputs = {n: (t.detach().cuda().requires_grad_(t.requires_grad) if torch.is_tensor(t) else t)
              for n, t in _with_bias(case, "t5", dtype).items()}
    _check_against_float64(inputs, _dout(case, dtype).cuda(), 1e-2)
