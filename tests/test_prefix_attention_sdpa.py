"""The ``sdpa`` backend of prefix_attention (PyTorch's fused attention ops per part of the key axis, merged by
log-sum-exp) against the float64 concatenation reference: the forward and all five gradients, on CPU. The numeric
tests run every CPU path (``cpu_path``): the split over the fused ops and the short-sequence path
(``fastpeft.ops.backends.sdpa_short``, matmuls over the score blocks), each forced on every case, the split with
its prefix part through the fused op and through matmuls, the short path in C++ (``fastpeft._cpu``, skipped where it
is not built) and in Python.

Low-precision tolerance as for the kernels (see ``tests/test_prefix_attention_triton.py``): within twice the
error of PyTorch's own computation in that dtype on the same rounded inputs, plus a floor of 1e-4.
The CUDA path (PyTorch's memory-efficient kernels) is checked for its plumbing on meta tensors here and for its
numbers by the ``gpu``-marked tests."""

import dataclasses
import importlib
import warnings

import pytest
import torch

import fastpeft
from fastpeft.ops import environment
from fastpeft.ops import library, registry
from fastpeft.ops.arguments import canonicalize
from fastpeft.ops.backends import aten_attention, sdpa, sdpa_short
from tests.cases import CASES, GRAD_NAMES, Case, forward_and_grads, make_inputs
from tests.lowp_reference import torch_lowp_attention
from tests.reference import assert_close, concat_reference, relative_error

dispatch = importlib.import_module("fastpeft.ops.prefix_attention")   # fastpeft.ops re-exports the function

# Beyond tests.cases: caches before the queries (S > L) with grouped heads and padding, odd head sizes, a long
# enough sequence for several of the CPU kernel's blocks (its causal block skipping), decode with MQA.
EXTRA_CASES = [
    Case("cache-gqa3-table-leftpad", B=3, Hq=6, Hkv=2, L=5, S=12, P=7, D=40, T=2, ragged=True, padding="left"),
    Case("cache-noncausal-rightpad", B=3, Hq=6, Hkv=3, L=5, S=12, P=4, D=33, padding="right", causal=False),
    Case("cache-long-mqa", B=2, Hq=4, Hkv=1, L=3, S=40, P=9, D=24, T=3, ragged=True, padding="right"),
    Case("decode-mqa-table", B=4, Hq=8, Hkv=1, L=1, S=17, P=6, D=96, T=3, ragged=True, padding="left"),
    Case("decode-noncausal", B=2, Hq=4, Hkv=2, L=1, S=6, P=3, D=20, causal=False),
    Case("d-small-odd", B=2, Hq=3, Hkv=1, L=6, S=6, P=5, D=7),
    Case("multiblock-gqa4", B=2, Hq=8, Hkv=2, L=300, S=300, P=40, D=72, T=2, ragged=True, padding="left"),
    Case("multiblock-cache", B=1, Hq=4, Hkv=2, L=130, S=700, P=33, D=64),
    Case("d-256", B=1, Hq=2, Hkv=1, L=9, S=11, P=4, D=256),
    # query chunks on CPU (sdpa.CPU_CAUSAL_CHUNK = 256): three chunks after a cache, with padding and a table
    Case("chunked-cache-table", B=2, Hq=4, Hkv=1, L=600, S=650, P=20, D=32, T=2, ragged=True, padding="left"),
    # the training suite's attention on the built-in model (the short path's default case)
    Case("tiny-llama-train", B=2, Hq=8, Hkv=2, L=64, S=64, P=8, D=32),
]
FP32_CASES = CASES + EXTRA_CASES


@pytest.fixture(autouse=True)
def _sdpa_backend(backend_env):
    backend_env("sdpa")


@pytest.fixture(params=["split", "split-matmul-prefix", "short", "short-python"])
def cpu_path(request, monkeypatch):
    """Force one of the CPU paths for every call of the test, whatever its sizes: the split with the prefix part
    through the fused op or through matmuls (``sdpa_short.block_attend``), or the short path through the
    C++ extension or in Python."""
    short = request.param.startswith("short")
    monkeypatch.setattr(sdpa_short, "SHORT_SCORES", 1 << 40 if short else -1)
    if request.param == "short-python":
        monkeypatch.setenv("FASTPEFT_CPU_EXTENSION", "0")
    elif request.param == "short" and environment.cpu_extension()[0] is None:
        pytest.skip(f"fastpeft._cpu: {environment.cpu_extension()[1]}")
    matmuls = request.param == "split-matmul-prefix"
    monkeypatch.setattr(sdpa, "CPU_MATMUL_PREFIX", (1 << 30, 1 << 60) if matmuls else (-1, -1))
    return request.param


def _dout(case, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.B, case.Hq, case.L, case.D, generator=g).to(dtype)


def _reference(inputs, dout):
    ref_inputs = {n: (t.detach().double().requires_grad_(n in GRAD_NAMES) if torch.is_tensor(t) and
                      t.is_floating_point() else t) for n, t in inputs.items()}
    return forward_and_grads(concat_reference, ref_inputs, dout.double())


def _results(fn, inputs, dout):
    out, grads = forward_and_grads(fn, inputs, dout)
    ref_out, ref_grads = _reference(inputs, dout)
    results = {"out": (out, ref_out)}
    results.update({f"d{n}": (grads[n], ref_grads[n]) for n in GRAD_NAMES})
    return results


def test_dispatcher_uses_sdpa_here():
    assert registry.select(torch.device("cpu"), torch.float32, False, False) == "sdpa"


def test_sdpa_is_the_cpu_default_without_the_triton_interpreter(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for decode in (False, True):
            assert registry.select(torch.device("cpu"), dtype, decode, False) == "sdpa"


@pytest.mark.parametrize("case", FP32_CASES, ids=str)
def test_fp32_forward_and_gradients_match_float64(case, cpu_path):
    inputs = make_inputs(case, torch.float32, seed=1)
    for name, (actual, expected) in _results(fastpeft.prefix_attention, inputs, _dout(case, torch.float32)).items():
        assert actual.dtype == torch.float32, name
        assert_close(actual, expected, 1e-5, name)


def _check_low_precision(case, dtype):
    inputs = make_inputs(case, dtype, seed=1)
    dout = _dout(case, dtype)
    results = _results(fastpeft.prefix_attention, inputs, dout)
    torch_out, torch_grads = forward_and_grads(torch_lowp_attention, inputs, dout)
    baseline = {"out": torch_out, **{f"d{n}": torch_grads[n] for n in GRAD_NAMES}}
    for name, (actual, expected) in results.items():
        assert actual.dtype == dtype, name
        assert torch.isfinite(actual).all(), name
        bound = 2 * relative_error(baseline[name], expected) + 1e-4
        err = relative_error(actual, expected)
        assert err <= bound, f"{name}: sdpa error {err:.2e} > 2 x PyTorch {dtype} error + 1e-4 = {bound:.2e}"
        assert err < 2e-2, f"{name}: {err:.2e}"


LOWP_CASES = [CASES[2], CASES[5], CASES[7], CASES[8], EXTRA_CASES[0], EXTRA_CASES[6]]


@pytest.mark.parametrize("case", LOWP_CASES, ids=str)
def test_bf16_error_within_twice_pytorch_bf16(case, cpu_path):
    _check_low_precision(case, torch.bfloat16)


@pytest.mark.parametrize("case", LOWP_CASES, ids=str)
def test_fp16_error_within_twice_pytorch_fp16(case, cpu_path):
    _check_low_precision(case, torch.float16)


def test_cpu_autocast_changes_nothing(cpu_path):
    # The integration casts q, k, v to the autocast dtype; inside, each path computes as without autocast.
    inputs = make_inputs(EXTRA_CASES[-1], torch.bfloat16, seed=1)
    dout = _dout(EXTRA_CASES[-1], torch.bfloat16)
    out, grads = forward_and_grads(fastpeft.prefix_attention, inputs, dout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_autocast, grads_autocast = forward_and_grads(fastpeft.prefix_attention, inputs, dout)
    assert torch.equal(out_autocast, out)
    for name in GRAD_NAMES:
        assert grads_autocast[name].dtype == torch.bfloat16 and torch.equal(grads_autocast[name], grads[name]), name


def test_decode_without_grad_matches_float64(cpu_path):
    case = EXTRA_CASES[3]
    inputs = make_inputs(case, torch.float32, seed=4, requires_grad=False)
    assert dispatch._select(_canonical(inputs), needs_grad=False) == "sdpa"
    with torch.no_grad():
        out = fastpeft.prefix_attention(**inputs)
    assert_close(out, concat_reference(**inputs), 1e-5, "decode out")


# Every case as a decode step (one query after the rest of its keys), and as a forward without a gradient: on CPU the
# short path then runs its per-query kernel (csrc/cpu), which must cover every masking rule the matmuls do.
DECODE_CASES = [dataclasses.replace(case, name=f"{case.name}-decode", L=1, S=max(case.S, 2)) for case in FP32_CASES
                if case.L > 1 and case.S <= 100]


@pytest.mark.parametrize("case", FP32_CASES + DECODE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_without_grad_matches_float64(case, dtype, cpu_path):
    inputs = make_inputs(case, dtype, seed=5, requires_grad=False)
    inputs["q"] = inputs["q"].transpose(1, 2).contiguous().transpose(1, 2)   # as models hand it over
    with torch.no_grad():
        out = fastpeft.prefix_attention(**inputs)
    assert out.dtype == dtype and out.shape == inputs["q"].shape
    assert_close(out, concat_reference(**{n: t.double() if torch.is_tensor(t) and t.is_floating_point() else t
                                         for n, t in inputs.items()}), 1e-5 if dtype == torch.float32 else 1e-12,
                 f"{case} out")


def test_queries_that_see_nothing_give_zeros_and_finite_exact_gradients(cpu_path):
    # Row 1 uses an empty prefix entry and its first queries see only padding (causal, left padding); row 2
    # sees no sequence key at all but has a prefix; with a cache (S > L), so both causal parts are involved.
    case = Case("blind", B=3, Hq=4, Hkv=2, L=4, S=6, P=3, D=16, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.float32, seed=3)
    inputs["prefix_index"] = torch.tensor([1, 0, 1])
    inputs["prefix_lengths"] = torch.tensor([0, 3])
    inputs["key_padding_mask"] = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]],
                                              dtype=torch.bool)
    dout = _dout(case, torch.float32)
    results = _results(fastpeft.prefix_attention, inputs, dout)
    out = results["out"][0]
    assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))   # row 1, queries 0-1: nothing visible
    assert (out[1, :, 2:].abs().sum(-1) > 0).all() and (out[2].abs().sum(-1) > 0).all()
    for name, (actual, expected) in results.items():
        assert torch.isfinite(actual).all(), name
        assert_close(actual, expected, 1e-5, name)
    _, lse, _ = registry.get("sdpa").forward(_canonical(inputs), None, for_backward=True)
    assert torch.isneginf(lse[1, :, :2]).all() and torch.isfinite(lse[1, :, 2:]).all()


def test_every_query_blind_gives_zeros(cpu_path):
    case = Case("all-blind", B=2, Hq=2, Hkv=1, L=3, S=5, P=2, D=8, T=1, ragged=True, padding="left")
    inputs = make_inputs(case, torch.float32, seed=5)
    inputs["prefix_lengths"] = torch.tensor([0])
    inputs["key_padding_mask"] = torch.zeros(2, 5, dtype=torch.bool)
    out = fastpeft.prefix_attention(**inputs)
    assert torch.equal(out, torch.zeros_like(out))
    out.backward(torch.ones_like(out))
    for name in GRAD_NAMES:
        assert torch.equal(inputs[name].grad, torch.zeros_like(inputs[name].grad)), name


def test_blind_decode_without_grad_gives_zeros(cpu_path):
    # One query per row after the keys: row 0 sees only its prefix, row 1 only keys, row 2 nothing (empty entry,
    # every key padding).
    case = Case("blind-decode", B=3, Hq=4, Hkv=2, L=1, S=5, P=3, D=16, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.float32, seed=6, requires_grad=False)
    inputs["prefix_index"] = torch.tensor([0, 1, 1])
    inputs["prefix_lengths"] = torch.tensor([3, 0])
    inputs["key_padding_mask"] = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = fastpeft.prefix_attention(**inputs)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert (out[:2].abs().sum(-1) > 0).all()
    assert_close(out, concat_reference(**inputs), 1e-5, "blind decode out")


def _canonical(inputs):
    """The inputs' ``AttentionArgs`` (detached)."""
    return canonicalize(**{n: (t.detach() if torch.is_tensor(t) else t) for n, t in inputs.items()})


def test_prefix_gradients_are_summed_per_table_entry(cpu_path):
    case = Case("entries", B=5, Hq=4, Hkv=2, L=6, S=8, P=5, D=16, T=3, ragged=True, padding="right")
    inputs = make_inputs(case, torch.float32, seed=8)
    inputs["prefix_index"] = torch.tensor([2, 0, 2, 2, 0])   # entry 1 unused: zero gradient
    dout = _dout(case, torch.float32)
    results = _results(fastpeft.prefix_attention, inputs, dout)
    for name in ("dprefix_k", "dprefix_v"):
        actual, expected = results[name]
        assert torch.equal(actual[1], torch.zeros_like(actual[1]))
        assert_close(actual, expected, 1e-5, name)


def test_deterministic_flag_gives_the_same_gradients(cpu_path):
    case = Case("det", B=4, Hq=4, Hkv=2, L=5, S=7, P=4, D=16, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.float32, seed=9)
    dout = _dout(case, torch.float32)
    first = forward_and_grads(lambda **kw: fastpeft.prefix_attention(**kw, deterministic=True), inputs, dout)[1]
    second = forward_and_grads(lambda **kw: fastpeft.prefix_attention(**kw, deterministic=True), inputs, dout)[1]
    plain = forward_and_grads(fastpeft.prefix_attention, inputs, dout)[1]
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]) and torch.equal(first[name], plain[name]), name


def test_float64_gradcheck(cpu_path):
    # PyTorch's CPU op also runs float64: the split and merge are exact, so gradcheck holds.
    case = Case("gradcheck", B=2, Hq=4, Hkv=2, L=3, S=5, P=2, D=3, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.float64, seed=5)
    names = list(GRAD_NAMES)

    def fn(*tensors):
        kwargs = dict(inputs)
        kwargs.update(zip(names, tensors))
        return fastpeft.prefix_attention(**kwargs)

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names))


def test_empty_query_and_batch_give_empty_outputs(cpu_path):
    out = fastpeft.prefix_attention(torch.randn(2, 4, 0, 8), torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 8),
                                    torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    assert out.shape == (2, 4, 0, 8)
    q = torch.randn(0, 4, 3, 8, requires_grad=True)
    out = fastpeft.prefix_attention(q, torch.randn(0, 2, 5, 8), torch.randn(0, 2, 5, 8), torch.randn(2, 3, 8),
                                    torch.randn(2, 3, 8))
    out.sum().backward()
    assert out.shape == (0, 4, 3, 8) and q.grad.shape == q.shape


def test_prefix_is_broadcast_not_copied_per_row():
    case = Case("shared", B=3, Hq=4, Hkv=2, L=4, S=4, P=5, D=8)
    q, k, v, pk, pv, index, lengths, mask, _, causal, _, _ = _canonical(make_inputs(case, seed=1, requires_grad=False))
    parts = sdpa._plan(q, k, v, pk, pv, index, lengths, mask, None, causal)
    prefix = [p for p in parts if p.kind == "prefix"][0]
    assert prefix.k.stride(0) == 0 and prefix.mask is None and prefix.folded
    assert prefix.k.data_ptr() == pk.data_ptr()


def test_plan_splits_a_cache_into_a_folded_part_and_a_causal_square():
    case = Case("cache", B=2, Hq=4, Hkv=2, L=3, S=8, P=2, D=8, padding="left")
    q, k, v, pk, pv, index, lengths, mask, _, causal, _, _ = _canonical(make_inputs(case, seed=1, requires_grad=False))
    parts = sdpa._plan(q, k, v, pk, pv, index, lengths, mask, None, causal)
    keys = [(p.columns.start - case.P, p.k.shape[2], p.causal, p.folded) for p in parts if p.kind == "keys"]
    assert keys == [(0, 5, False, True), (5, 3, True, False)]


def test_cpu_causal_queries_run_in_chunks():
    q = torch.empty(1, 1, 1024, 8)
    assert sdpa._query_chunks(q[:, :, :600], causal=True) == [(0, 200), (200, 400), (400, 600)]
    assert sdpa._query_chunks(q[:, :, :600], causal=False) == [(0, 600)]
    assert sdpa._query_chunks(q[:, :, :256], causal=True) == [(0, 256)]
    assert sdpa._query_chunks(q[:, :, :257], causal=True) == [(0, 129), (129, 257)]
    assert sdpa._query_chunks(q[:, :, :769], causal=True) == [(0, 769)]   # the kernel's own skipping


def test_short_path_takes_small_score_matrices_on_cpu():
    train = torch.empty(2, 8, 64, 32), torch.empty(2, 2, 64, 32)                  # the training suite, P=8
    assert sdpa_short.use_short_path(*train, sdpa.Host(8, False, False))
    long = torch.empty(2, 8, 2048, 64), torch.empty(2, 2, 2048, 64)               # the kernel suite, P=128
    assert not sdpa_short.use_short_path(*long, sdpa.Host(128, False, False))
    long = torch.empty(2, 8, 256, 32), torch.empty(2, 2, 256, 32)                 # the training suite at L=256
    assert not sdpa_short.use_short_path(*long, sdpa.Host(8, False, False))
    meta = torch.empty(2, 8, 64, 32, device="meta"), torch.empty(2, 2, 64, 32, device="meta")
    assert not sdpa_short.use_short_path(*meta, sdpa.Host(8, False, False))


def test_short_prefix_parts_run_as_matmuls_on_cpu():
    def prefix_part(case):
        args = _canonical(make_inputs(case, seed=1, requires_grad=False))
        return [p for p in sdpa._plan(*args[:10]) if p.kind == "prefix"][0]

    assert prefix_part(EXTRA_CASES[-1]).matmuls                 # P=8, D=32
    assert not prefix_part(EXTRA_CASES[6]).matmuls              # P=40
    assert not prefix_part(Case("long-d64", B=1, Hq=8, Hkv=2, L=2048, S=2048, P=8, D=64)).matmuls


def test_eager_calls_take_the_path_their_size_selects(monkeypatch):
    paths = []
    for module, name, path in ((sdpa_short, "forward", "short"), (sdpa_short, "autograd_forward", "short"),
                               (sdpa, "_split_forward", "split")):
        function = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _f=function, _path=path: paths.append(_path) or _f(*args))
    small = make_inputs(EXTRA_CASES[-1], seed=1)
    # the short path (in C++ where fastpeft._cpu is built, in Python otherwise)
    assert fastpeft.prefix_attention(**small).grad_fn is not None and paths == ["short"]
    large = make_inputs(EXTRA_CASES[6], seed=1)   # multiblock-gqa4: 2 * 8 * 300 * (40 + 300) scores
    assert fastpeft.prefix_attention(**large).grad_fn is not None and paths == ["short", "split"]


def test_backward_reuses_the_forward_plan(monkeypatch, cpu_path):
    # The plan's data-dependent reads (prefix lengths, key padding) happen once per forward + backward.
    calls = []
    host_plan = sdpa.host_plan
    monkeypatch.setattr(sdpa, "host_plan", lambda *args: calls.append(1) or host_plan(*args))
    inputs = make_inputs(CASES[5], seed=1)
    fastpeft.prefix_attention(**inputs).sum().backward()
    assert len(calls) == 1


def test_non_contiguous_output_gradient(cpu_path):
    """Models hand the backward the gradient of ``out.transpose(1, 2)`` (a strided view), not a contiguous one; with
    as many kv heads as query heads (GPT-2) no reshape of it copies."""
    for case in (Case("mha", B=2, Hq=3, Hkv=3, L=7, S=9, P=5, D=16), CASES[2]):   # Hq == Hkv, and grouped
        inputs = make_inputs(case, torch.float32, seed=3)
        dout = _dout(case, torch.float32).transpose(1, 2).contiguous().transpose(1, 2)
        assert not dout.is_contiguous()
        for name, (actual, expected) in _results(fastpeft.prefix_attention, inputs, dout).items():
            assert_close(actual, expected, 1e-5, f"{case}: {name}")


def _prevalidated(inputs, plan_cache, mask="inputs"):
    args = dict(inputs)
    if mask != "inputs":
        args["key_padding_mask"] = mask
    return dispatch.prefix_attention_prevalidated(plan_cache=plan_cache, **args)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5], CASES[6]], ids=str)
def test_plan_cache_is_reused_per_signature_and_changes_nothing(case, monkeypatch):
    """prefix_attention_prevalidated's plan_cache (one per model forward): the first call of a signature plans, the
    next ones with the same shapes and the same index/lengths/mask objects reuse that plan, and the results and
    gradients are those of an unplanned call."""
    inputs = make_inputs(case, torch.float32, seed=4)
    dout = _dout(case, torch.float32)
    plans = []
    monkeypatch.setattr(dispatch, "canonicalize", lambda *a, **k: plans.append(1) or canonicalize(*a, **k))
    cache = {}
    expected = _results(lambda **args: _prevalidated(args, None), inputs, dout)
    plans.clear()
    for _ in range(3):   # three "layers" of one forward
        for name, (actual, want) in _results(lambda **args: _prevalidated(args, cache), inputs, dout).items():
            assert torch.equal(actual, expected[name][0]), name
    assert len(plans) == 1 and len(cache) == 1
    # another mask object (a new forward's, possibly other values) is another signature: planned afresh
    mask = inputs.get("key_padding_mask")
    other = torch.ones(case.B, case.S, dtype=torch.bool) if mask is None else mask.clone()
    _prevalidated(inputs, cache, mask=other)
    assert len(plans) == 2 and len(cache) == 2


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(dispatch, "_PLAN_CACHE_LIMIT", 3)
    inputs = make_inputs(CASES[0], torch.float32, seed=4)
    cache = {}
    for _ in range(7):
        _prevalidated(inputs, cache, mask=torch.ones(CASES[0].B, CASES[0].S, dtype=torch.bool))
        assert 1 <= len(cache) <= 3


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles_fullgraph_forward_and_backward(dynamic):
    # dynamic=True: symbolic lengths, as after a recompile for a new sequence length (the dispatcher's choice
    # must still fold to a constant).
    case = Case("compiled", B=2, Hq=4, Hkv=2, L=5, S=7, P=3, D=16, T=3, ragged=True, padding="left")
    inputs = make_inputs(case, seed=6)
    dout = _dout(case, torch.float32)
    compiled = torch.compile(fastpeft.prefix_attention, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    out_c, grads_c = forward_and_grads(compiled, inputs, dout)
    out_e, grads_e = forward_and_grads(fastpeft.prefix_attention, inputs, dout)
    assert_close(out_c, out_e, 1e-6, "compiled out")
    for name in GRAD_NAMES:
        assert_close(grads_c[name], grads_e[name], 1e-6, f"compiled d{name}")


def test_custom_ops_pass_opcheck():
    case = Case("opcheck", B=2, Hq=4, Hkv=2, L=4, S=6, P=3, D=8, T=2, ragged=True, padding="left")
    args = _canonical(make_inputs(case, seed=2, requires_grad=False))
    fwd_args = tuple(t.clone().requires_grad_(i < 5) if torch.is_tensor(t) and t.is_floating_point() else t
                     for i, t in enumerate(args)) + ("sdpa",)
    torch.library.opcheck(library.prefix_attention_fwd, fwd_args, test_utils=("test_schema", "test_faketensor",
                                                                               "test_autograd_registration"))


def test_missing_aten_ops_fall_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.delenv("FASTPEFT_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aten_attention, "_missing_ops",
                        lambda device_type: ("_scaled_dot_product_flash_attention_for_cpu",))
    monkeypatch.setattr(environment, "_warned_messages", set())
    with pytest.warns(RuntimeWarning, match="reference path.*lacks aten::_scaled_dot_product_flash_attention"):
        assert registry.select(torch.device("cpu"), torch.float32, False, False) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the second time: no warning
        assert registry.select(torch.device("cpu"), torch.float32, False, False) == "reference"
    monkeypatch.setenv("FASTPEFT_BACKEND", "sdpa")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND=sdpa"):
        registry.select(torch.device("cpu"), torch.float32, False, False)


def test_forced_sdpa_refuses_a_device_without_the_ops():
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND=sdpa cannot run here"):
        registry.select(torch.device("meta"), torch.float32, False, False)


@pytest.mark.parametrize("Hq, Hkv, D, bias", [(4, 4, 64, False), (8, 2, 59, True), (2, 1, 256, True)])
def test_cuda_path_plumbing_on_meta_tensors(Hq, Hkv, D, bias):
    # The efficient-attention ops have meta kernels: shapes, head-size padding, kv-head repetition, the aligned
    # bias and the padded lse are exercised here; the numbers are checked by the gpu tests.
    B, L, S = 2, 37, 37
    q = torch.empty(B, Hq, L, D, device="meta")
    k = v = torch.empty(B, Hkv, S, D, device="meta")
    mask = torch.empty(B, 1, 1, S, device="meta") if bias else None
    out, lse = aten_attention._cuda_attend(q, k, v, mask, True, 0.1)
    assert out.shape == q.shape and lse.shape == (B, Hq, L) and lse.dtype == torch.float32
    dq, dk, dv = aten_attention._cuda_attend_backward(torch.empty_like(q), q, k, v, mask, out, lse, True, 0.1)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


# ----------------------------------------------------------------------------------------------------------
# CUDA (PyTorch's memory-efficient kernels): forced sdpa on the GPU.

GPU_CASES = [CASES[0], CASES[2], CASES[5], CASES[7], CASES[8], CASES[9], EXTRA_CASES[0], EXTRA_CASES[3],
             EXTRA_CASES[6], EXTRA_CASES[7]]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_fp32_matches_float64(case):
    inputs = make_inputs(case, torch.float32, device="cuda", seed=1)
    dout = _dout(case, torch.float32).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    for name, (actual, expected) in _results(fastpeft.prefix_attention, inputs, dout).items():
        assert_close(actual, expected, 1e-5, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_low_precision_within_twice_pytorch(case, dtype):
    inputs = make_inputs(case, dtype, device="cuda", seed=1)
    dout = _dout(case, dtype).cuda()
    results = _results(fastpeft.prefix_attention, inputs, dout)
    torch_out, torch_grads = forward_and_grads(torch_lowp_attention, inputs, dout)
    baseline = {"out": torch_out, **{f"d{n}": torch_grads[n] for n in GRAD_NAMES}}
    for name, (actual, expected) in results.items():
        assert torch.isfinite(actual).all(), name
        bound = 2 * relative_error(baseline[name], expected) + 1e-4
        assert relative_error(actual, expected) <= bound, name


@pytest.mark.gpu
def test_cuda_blind_queries_and_deterministic_prefix_gradients():
    case = Case("blind-gpu", B=3, Hq=4, Hkv=2, L=4, S=6, P=3, D=16, T=2, ragged=True, padding="left")
    inputs = make_inputs(case, torch.float32, device="cuda", seed=3)
    inputs["prefix_index"] = torch.tensor([1, 0, 1], device="cuda")
    inputs["prefix_lengths"] = torch.tensor([0, 3], device="cuda")
    inputs["key_padding_mask"] = torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1], [0] * 6], dtype=torch.bool,
                                              device="cuda")
    dout = _dout(case, torch.float32).cuda()
    fn = lambda **kw: fastpeft.prefix_attention(**kw, deterministic=True)  # noqa: E731
    for name, (actual, expected) in _results(fn, inputs, dout).items():
        assert torch.isfinite(actual).all(), name
        assert_close(actual, expected, 1e-5, name)


def test_short_path_runs_the_cpu_extension_unless_switched_off(monkeypatch):
    if environment.cpu_extension()[0] is None:
        pytest.skip(f"fastpeft._cpu: {environment.cpu_extension()[1]}")
    calls = []
    compiled = sdpa_short.autograd_forward
    monkeypatch.setattr(sdpa_short, "autograd_forward", lambda *args: calls.append(1) or compiled(*args))
    inputs = make_inputs(EXTRA_CASES[-1], seed=1)
    fastpeft.prefix_attention(**inputs).sum().backward()
    assert calls == [1]
    monkeypatch.setenv("FASTPEFT_CPU_EXTENSION", "0")
    fastpeft.prefix_attention(**inputs).sum().backward()
    assert calls == [1]
