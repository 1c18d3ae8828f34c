"""The ``torch.library`` ops of prefix attention (``fastpeft::prefix_attention_fwd``/``_bwd``,
``fastpeft::prefix_decode``, ``fastpeft::paged_prefix_decode``) through ``torch.library.opcheck`` (schema, fake
implementation with its strides, autograd registration, AOT dispatch with dynamic shapes) on every backend that runs
here: reference, sdpa (its split and its short path) and, on CPU, the Triton kernels under the interpreter; with the
layouts models hand over (``[B, L, H, D]`` buffers viewed as ``[B, H, L, D]``), a ragged prefix table, GQA, a cache
before the queries, left padding, an attention bias, and a power-of-two and an odd head size (the paged decode: ragged
block tables, a row without tokens, a block shared by two rows). Then ``torch.compile(fullgraph=True)`` of
``fastpeft.prefix_attention`` with the default compiler (inductor, which checks every output's strides against the
fake's), forward and backward, equal to eager on each backend, and of ``fastpeft.ops.paged_prefix_decode`` likewise.
The C++ kernel ops of the sdpa backend's short path are checked for their schema and autograd registration (they are
never traced: no fake)."""

import pytest
import torch

import fastpeft
from fastpeft.ops import environment
from fastpeft.ops import library, registry
from fastpeft.ops.arguments import canonicalize, canonicalize_paged
from fastpeft.ops.backends import sdpa_short
from fastpeft.ops.backends.base import Case
from tests.cases import GRAD_NAMES
from tests.paged_cases import PagedCase, make_paged_inputs
from tests.reference import assert_close

B, Hq, Hkv, L, S, P, T = 2, 4, 2, 5, 7, 3, 3
HEAD_SIZES = (16, 13)   # a power of two, and an odd size the kernels pad (and sdpa's fused ops take as it is)


def _model_layout(*shape, generator):
    """A ``[B, H, N, D]`` tensor viewed from a ``[B, N, H, D]`` buffer, as attention modules hand it over."""
    b, h, n, d = shape
    return torch.randn(b, n, h, d, generator=generator).transpose(1, 2)


def _inputs(head_size, queries=L, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :3] = False
    D = head_size
    inputs = dict(q=_model_layout(B, Hq, queries, D, generator=g), k=_model_layout(B, Hkv, S, D, generator=g),
                  v=_model_layout(B, Hkv, S, D, generator=g), prefix_k=torch.randn(T, Hkv, P, D, generator=g),
                  prefix_v=torch.randn(T, Hkv, P, D, generator=g), prefix_index=torch.tensor([2, 0]),
                  prefix_lengths=torch.tensor([3, 1, 2]), key_padding_mask=mask)
    if bias:   # T5's layout: one bias per head and query, broadcast over the rows, as a permuted view
        inputs["attn_bias"] = torch.randn(1, queries, Hq, P + S, generator=g).transpose(1, 2)
    return inputs


# (backend, sdpa path): the sdpa backend runs a call through its split or its short path, by size. (The reference
# backend is plain PyTorch: it runs through none of the ops, and torch.compile traces it as it is.)
OP_BACKENDS = [("sdpa", "split"), ("sdpa", "short"), ("triton", None)]


def _use(backend, monkeypatch):
    name, path = backend
    if path is not None:
        monkeypatch.setattr(sdpa_short, "SHORT_SCORES", 1 << 40 if path == "short" else -1)
    why = registry.get(name).unavailable(torch.device("cpu"), torch.float32)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    monkeypatch.setenv("FASTPEFT_BACKEND", name)
    return name


def _ids(backend):
    name, path = backend
    return name if path is None else f"{name}-{path}"


@pytest.fixture(params=OP_BACKENDS, ids=_ids)
def backend(request, monkeypatch):
    """Each backend that runs through the custom ops, forced."""
    return _use(request.param, monkeypatch)


@pytest.fixture(params=[("reference", None)] + OP_BACKENDS, ids=_ids)
def any_backend(request, monkeypatch):
    """Each backend, forced."""
    return _use(request.param, monkeypatch)


@pytest.fixture(params=HEAD_SIZES, ids=lambda d: f"d{d}")
def head_size(request):
    return request.param


def _forward_args(backend, head_size, bias, requires_grad):
    args = canonicalize(**_inputs(head_size, bias=bias))
    tensors = [t.detach().requires_grad_(requires_grad) if t is not None and t.is_floating_point() else t
               for t in args[:9]]
    return (*tensors, *args[9:], backend)


def _bias_cases(backend):
    """Without and, where the backend takes one, with an attention bias."""
    takes_bias = registry.get(backend).supports(Case(torch.device("cpu"), torch.float32, False, True)) is None
    return [False, True] if takes_bias else [False]


def test_forward_op_passes_opcheck(backend, head_size):
    for bias in _bias_cases(backend):
        torch.library.opcheck(library.prefix_attention_fwd,
                              _forward_args(backend, head_size, bias, requires_grad=True))


def test_backward_op_passes_opcheck(backend, head_size):
    for bias in _bias_cases(backend):
        fwd_args = _forward_args(backend, head_size, bias, requires_grad=False)
        out, lse = library.prefix_attention_fwd(*fwd_args)
        dout = torch.randn(B, L, Hq, head_size, generator=torch.Generator().manual_seed(5)).transpose(1, 2)
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, attn_bias, causal, scale, det, _ = fwd_args
        torch.library.opcheck(library.prefix_attention_bwd,
                              (dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, mask, attn_bias, out,
                               lse, causal, scale, det, bias, backend))


def test_decode_op_passes_opcheck(backend, head_size):
    args = canonicalize(**_inputs(head_size, queries=1))
    torch.library.opcheck(library.prefix_decode, (*args[:8], args.causal, args.softmax_scale, backend))


def test_cpu_kernel_ops_keep_their_schema():
    if environment.cpu_extension()[0] is None:
        pytest.skip(f"fastpeft._cpu: {environment.cpu_extension()[1]}")
    args = canonicalize(**_inputs(HEAD_SIZES[0]))
    host = (P, True, True)   # every entry attended; ragged lengths; padding keys
    causal_bias = torch.zeros(S, Hq // Hkv * L)
    kernel_args = (*args[:8], causal_bias, args.softmax_scale, *host)
    torch.library.opcheck(torch.ops.fastpeft._short_prefix_attention_fwd, (*kernel_args, True),
                          test_utils="test_schema")
    # The op with its C++ autograd: its autograd registration. (Not the schema check: its Autograd-key kernel runs ATen
    # calls below autograd that return their input when there is nothing to do, e.g. .to() of a float32 tensor, which
    # that check flags; the forward kernel it runs is the op checked above.)
    differentiable = tuple(t.detach().requires_grad_(True) if i < 5 else t for i, t in enumerate(kernel_args))
    torch.library.opcheck(torch.ops.fastpeft._short_prefix_attention, differentiable,
                          test_utils="test_autograd_registration")


def _leaves(inputs):
    grads = GRAD_NAMES + (("attn_bias",) if "attn_bias" in inputs else ())
    return {n: (t.detach().requires_grad_(n in grads) if torch.is_tensor(t) and t.is_floating_point() else t)
            for n, t in inputs.items()}, grads


def _forward_and_grads(fn, inputs, dout):
    leaves, grads = _leaves(inputs)
    out = fn(**leaves)
    out.backward(dout)
    return out.detach(), {n: leaves[n].grad for n in grads}


def test_compiled_forward_and_backward_equal_eager(any_backend, head_size):
    backend = any_backend
    torch._dynamo.reset()
    compiled = torch.compile(fastpeft.prefix_attention, fullgraph=True)
    dout = torch.randn(B, L, Hq, head_size, generator=torch.Generator().manual_seed(7)).transpose(1, 2)
    for bias in _bias_cases(backend):
        inputs = _inputs(head_size, bias=bias, seed=3)
        out_c, grads_c = _forward_and_grads(compiled, inputs, dout)
        out_e, grads_e = _forward_and_grads(fastpeft.prefix_attention, inputs, dout)
        assert_close(out_c, out_e, 1e-6, f"compiled out (bias={bias})")
        for name, grad in grads_e.items():
            assert_close(grads_c[name], grad, 1e-6, f"compiled d{name} (bias={bias})")


def test_compiled_decode_equals_eager(any_backend, head_size):
    torch._dynamo.reset()
    compiled = torch.compile(fastpeft.prefix_attention, fullgraph=True)
    inputs = _inputs(head_size, queries=1, seed=4)
    with torch.no_grad():
        assert_close(compiled(**inputs), fastpeft.prefix_attention(**inputs), 1e-6, "compiled decode")


def _paged_inputs(head_size, seed=0):
    """Paged decode over 4-token blocks: ragged rows, one without tokens, rows 0 and 1 sharing a block, a ragged
    prefix table."""
    case = PagedCase("opcheck", seq_lens=(9, 6, 0), prefix_index=(2, 0, 1), prefix_lengths=(3, 1, 0), P=3, Hq=Hq,
                     Hkv=Hkv, D=head_size, block_size=4, shared_blocks=1)
    return make_paged_inputs(case, seed=seed)


def test_paged_decode_op_passes_opcheck(backend, head_size):
    args = canonicalize_paged(**_paged_inputs(head_size))
    torch.library.opcheck(library.paged_prefix_decode, (*args, backend))


def test_compiled_paged_decode_equals_eager(any_backend, head_size):
    from fastpeft.ops import paged_prefix_decode

    torch._dynamo.reset()
    compiled = torch.compile(paged_prefix_decode, fullgraph=True)
    inputs = _paged_inputs(head_size, seed=6)
    with torch.no_grad():
        assert_close(compiled(**inputs), paged_prefix_decode(**inputs), 1e-6, "compiled paged decode")
