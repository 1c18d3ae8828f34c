"""Decode kernels (one query per row, split over the key range) against the float64 concat reference.

CPU: the Triton kernel under the interpreter. GPU (marked): the Triton kernel compiled, and the CUDA op
``torch.ops.fastpeft._cuda_prefix_decode`` from ``fastpeft._C``, in bf16/fp16/fp32.
"""

import importlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .reference import assert_close, concat_reference


@dataclass(frozen=True)
class DecodeCase:
    name: str
    B: int = 3
    Hq: int = 8
    Hkv: int = 2
    S: int = 37
    P: int = 11
    D: int = 64
    prefix_lengths: tuple = (0, 5, 11)   # one per table entry, ragged, including 0
    prefix_index: tuple = (2, 0, 1)      # one per row, mixing entries
    left_pad: tuple = (0, 7, 0)          # padding keys at the start of each row

    def __str__(self):
        return self.name


DECODE_CASES = [
    DecodeCase("gqa-8-2-d64"),
    DecodeCase("gqa-8-2-d40-leftpad", D=40, left_pad=(3, 0, 20)),
    DecodeCase("mqa-d16", Hq=4, Hkv=1, D=16, S=70, P=6, prefix_lengths=(6, 0), prefix_index=(1, 0, 0)),
    DecodeCase("mha-d128", Hq=2, Hkv=2, D=128, S=20, P=70, prefix_lengths=(70, 33, 1),
               prefix_index=(0, 1, 2, 1), B=4, left_pad=(0, 0, 5, 19)),
    # G = 40 > the per-program head cap at D = 128: the group is spread over two programs.
    DecodeCase("mqa-wide-group", B=2, Hq=40, Hkv=1, D=128, S=9, P=4, prefix_lengths=(4,), prefix_index=(0, 0),
               left_pad=(0, 2)),
]


@pytest.fixture
def decode_kernels():
    """The Triton decode module, in the mode this session imported triton in (see conftest.py)."""
    return importlib.import_module("fastpeft.kernels.prefix_decode")


@pytest.fixture
def kernel_device(decode_kernels):
    """Where the Triton kernels run in this session: CPU tensors under the interpreter (CPU-only torch),
    otherwise a CUDA device. Triton fixes the mode when it is first imported, for the whole process."""
    if decode_kernels.INTERPRETING:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton is neither interpreted (TRITON_INTERPRET=1 before importing triton) nor has a GPU")


def make_decode_inputs(case, dtype=torch.float32, device="cpu", seed=0):
    """Canonical decode inputs: q [B,Hq,1,D], k/v [B,Hkv,S,D], a table [T,Hkv,P,D], int32 index/lengths, mask."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    B, T = case.B, len(case.prefix_lengths)
    mask = torch.ones(B, case.S, dtype=torch.bool)
    for b, pad in enumerate(case.left_pad):
        mask[b, :pad] = False
    return dict(
        q=randn(B, case.Hq, 1, case.D), k=randn(B, case.Hkv, case.S, case.D), v=randn(B, case.Hkv, case.S, case.D),
        prefix_k=randn(T, case.Hkv, case.P, case.D), prefix_v=randn(T, case.Hkv, case.P, case.D),
        prefix_index=torch.tensor(case.prefix_index, dtype=torch.int32, device=device),
        prefix_lengths=torch.tensor(case.prefix_lengths, dtype=torch.int32, device=device),
        key_padding_mask=mask.to(device) if any(case.left_pad) else None,
        causal=True, softmax_scale=1.0 / math.sqrt(case.D),
    )


def low_precision_tolerance(inputs, expected):
    """Error bound for a fp16/bf16 kernel: a multiple of what PyTorch's own fp32 computation on the same
    low-precision inputs, rounded to the output dtype, gets against the float64 truth (plus a small floor)."""
    torch_out = concat_reference(**{name: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                           else t) for name, t in inputs.items()})
    rounded = torch_out.to(inputs["q"].dtype).double()
    err = float((rounded - expected).norm() / expected.norm())
    return 4 * err + 1e-3


@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_fp32_matches_reference(decode_kernels, kernel_device, case, num_splits):
    inputs = make_decode_inputs(case, device=kernel_device)
    out = decode_kernels.prefix_decode_fwd(**inputs, num_splits=num_splits)
    assert out.shape == inputs["q"].shape and out.dtype == torch.float32
    assert_close(out, concat_reference(**inputs), 1e-5, name=f"out[{case}, splits={num_splits}]")


@pytest.mark.parametrize("num_splits", [2, 5, 64])
def test_triton_decode_split_counts(decode_kernels, kernel_device, num_splits):
    # More splits than tiles: the launcher drops the splits that would start past every row's end.
    case = DecodeCase("splits", S=150, P=40, prefix_lengths=(17, 40, 0), D=40)
    inputs = make_decode_inputs(case, seed=num_splits, device=kernel_device)
    out = decode_kernels.prefix_decode_fwd(**inputs, num_splits=num_splits)
    assert_close(out, concat_reference(**inputs), 1e-5, name=f"out[splits={num_splits}]")


def test_triton_decode_more_splits_than_one_combine_step(decode_kernels, kernel_device):
    # 20 splits: the combine kernel sums the accumulators in two steps of 16.
    case = DecodeCase("many-splits", B=1, Hq=2, Hkv=1, S=1250, P=30, D=16, prefix_lengths=(30,), prefix_index=(0,),
                      left_pad=(100,))
    inputs = make_decode_inputs(case, seed=13, device=kernel_device)
    out = decode_kernels.prefix_decode_fwd(**inputs, num_splits=20)
    assert_close(out, concat_reference(**inputs), 1e-5, name="out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_decode_low_precision(decode_kernels, kernel_device, dtype):
    inputs = make_decode_inputs(DECODE_CASES[1], dtype=dtype, seed=3, device=kernel_device)
    out = decode_kernels.prefix_decode_fwd(**inputs, num_splits=2)
    assert out.dtype == dtype
    expected = concat_reference(**inputs)
    assert_close(out, expected, low_precision_tolerance(inputs, expected), name=f"out[{dtype}]")


@pytest.mark.parametrize("num_splits", [1, 2])
def test_triton_decode_row_that_sees_nothing_is_zero(decode_kernels, kernel_device, num_splits):
    # Row 1 uses an empty table entry and all of its own keys are padding; row 0 sees both parts.
    case = DecodeCase("blind-row", B=2, S=20, P=8, D=16, prefix_lengths=(8, 0), prefix_index=(0, 1),
                      left_pad=(4, 20))
    inputs = make_decode_inputs(case, seed=5, device=kernel_device)
    out = decode_kernels.prefix_decode_fwd(**inputs, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out, concat_reference(**inputs), 1e-5, name="out")


def test_triton_decode_strided_cache_views(decode_kernels, kernel_device):
    # The shapes a KV cache hands over: q the query heads of a fused [B, 1, Hq + 2 Hkv, D] projection,
    # k/v the first S slots of a longer cache, the table a slice of a larger one. Strides are honoured.
    case = DECODE_CASES[0]
    inputs = make_decode_inputs(case, seed=7, device=kernel_device)
    g = torch.Generator().manual_seed(8)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(kernel_device)

    q = randn(case.B, 1, case.Hq + 2 * case.Hkv, case.D)[:, :, :case.Hq].transpose(1, 2)
    cache_k, cache_v = randn(case.B, case.Hkv, case.S + 13, case.D), randn(case.B, case.Hkv, case.S + 13, case.D)
    table_k = randn(len(case.prefix_lengths), case.Hkv, case.P + 3, case.D)
    table_v = randn(len(case.prefix_lengths), case.Hkv, case.P + 3, case.D)
    strided = dict(inputs, q=q, k=cache_k[:, :, :case.S], v=cache_v[:, :, :case.S],
                   prefix_k=table_k[:, :, :case.P], prefix_v=table_v[:, :, :case.P],
                   prefix_index=inputs["prefix_index"].repeat_interleave(2)[::2])
    assert not strided["k"].is_contiguous() and not strided["q"].is_contiguous()
    assert not strided["prefix_index"].is_contiguous()
    out = decode_kernels.prefix_decode_fwd(**strided, num_splits=2)
    assert_close(out, concat_reference(**strided), 1e-5, name="out")


def test_triton_decode_rejects_more_than_one_query(decode_kernels):
    inputs = make_decode_inputs(DECODE_CASES[0])
    inputs["q"] = inputs["q"].expand(-1, -1, 2, -1)
    with pytest.raises(ValueError, match="L == 1"):
        decode_kernels.prefix_decode_fwd(**inputs)


def test_dispatcher_runs_decode_kernel(decode_kernels, kernel_device, backend_env, monkeypatch):
    import fastpeft

    backend_env("triton")
    calls = []
    kernel = decode_kernels.prefix_decode_fwd

    def counting_kernel(*args, **kwargs):
        calls.append(args[0].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(decode_kernels, "prefix_decode_fwd", counting_kernel)
    case = DECODE_CASES[1]
    inputs = make_decode_inputs(case, seed=11, device=kernel_device)
    inputs["prefix_index"] = inputs["prefix_index"].long()   # the public API takes any integer dtype
    with torch.no_grad():
        out = fastpeft.prefix_attention(**inputs)
    assert calls == [inputs["q"].shape]
    assert_close(out, concat_reference(**inputs), 1e-5, name="out")


# The import order of a user script that loads peft (or transformers, bitsandbytes) before asking for the
# interpreter: triton is imported first, so its own @jit library functions (tl.max, tl.sum, tl.zeros, ...) are
# decorated for compiled mode, and an interpreted kernel that calls them fails with "Cannot call @triton.jit'd
# outside of the scope of a kernel". The kernels must not depend on them; decode and training both run here.
LATE_INTERPRETER = r"""
import os
import triton
import triton.language as tl
import peft  # noqa: F401  (the usual reason triton is already imported)
from triton.runtime.interpreter import InterpretedFunction

assert not isinstance(tl.max, InterpretedFunction), "precondition: triton's library decorated for compiled mode"
os.environ["TRITON_INTERPRET"] = "1"
os.environ["FASTPEFT_BACKEND"] = "triton"

import torch
import fastpeft
from fastpeft.kernels import prefix_attention as training_kernels, prefix_decode as decode_kernels
from tests.cases import CASES, GRAD_NAMES, forward_and_grads, make_inputs
from tests.reference import assert_close, concat_reference

assert decode_kernels.INTERPRETING and training_kernels.INTERPRETING
calls = []
for module, name in ((decode_kernels, "prefix_decode_fwd"), (training_kernels, "prefix_attention_fwd"),
                     (training_kernels, "prefix_attention_bwd")):
    def counting(*args, _launcher=getattr(module, name), _name=name, **kwargs):
        calls.append(_name)
        return _launcher(*args, **kwargs)
    setattr(module, name, counting)

decode_case = next(case for case in CASES if case.name == "decode")
inputs = make_inputs(decode_case, seed=21, requires_grad=False)
with torch.no_grad():
    out = fastpeft.prefix_attention(**inputs)
assert_close(out, concat_reference(**inputs), 1e-5, name="decode out")

train_case = next(case for case in CASES if case.name == "table-ragged-leftpad")
inputs = make_inputs(train_case, seed=22)
dout = torch.randn(train_case.B, train_case.Hq, train_case.L, train_case.D,
                   generator=torch.Generator().manual_seed(23))
out, grads = forward_and_grads(fastpeft.prefix_attention, inputs, dout)
reference_inputs = {name: (t.detach().double().requires_grad_(name in GRAD_NAMES)
                           if torch.is_tensor(t) and t.is_floating_point() else t) for name, t in inputs.items()}
ref_out, ref_grads = forward_and_grads(concat_reference, reference_inputs, dout.double())
assert_close(out, ref_out, 1e-5, name="training out")
for name in GRAD_NAMES:
    assert_close(grads[name], ref_grads[name], 1e-5, name=f"d{name}")
assert calls == ["prefix_decode_fwd", "prefix_attention_fwd", "prefix_attention_bwd"], calls
print("interpreted after a late TRITON_INTERPRET")
"""


def test_kernels_interpret_when_triton_was_imported_before_triton_interpret():
    env = {name: value for name, value in os.environ.items()
           if name not in ("TRITON_INTERPRET", "FASTPEFT_BACKEND")}
    result = subprocess.run([sys.executable, "-c", LATE_INTERPRETER], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert result.returncode == 0 and "interpreted after a late" in result.stdout, result.stderr[-4000:]


# Compiles the kernels for sm_90 without a GPU (Triton's bundled ptxas), in a process without the interpreter:
# errors that only the compiler sees (non-constexpr globals, tl.dot shapes, dtype mismatches) fail on CPU CI.
OFFLINE_COMPILE = r"""
import inspect, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastpeft.kernels.decode as kernels
import fastpeft.kernels.prefix_decode as pd

def signature(kernel, types, constexprs):
    return {name: "constexpr" if name in constexprs else types.get(name, "i32")
            for name in inspect.signature(kernel.fn).parameters}

target = GPUTarget("cuda", 90, 32)
for dtype, name, group, head_dim in ((torch.bfloat16, "bf16", 8, 128), (torch.float32, "fp32", 4, 40)):
    block_g, block_n, block_d, num_warps = pd.launch_config(group, head_dim, dtype)
    types = {arg: "*" + name for arg in ("q_ptr", "k_ptr", "v_ptr", "prefix_k_ptr", "prefix_v_ptr", "out_ptr")}
    types.update(prefix_index_ptr="*i32", prefix_lengths_ptr="*i32", mask_ptr="*u8", block_table_ptr="*i32",
                 seq_lens_ptr="*i32", part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32", qk_scale="fp32")
    # dense K/V with a padding mask, and a paged cache of 16-token blocks, each with and without splits
    for (paged, single_split) in ((False, False), (False, True), (True, False), (True, True)):
        constexprs = dict(GROUP=group, HEAD_CHUNKS=triton.cdiv(group, block_g), BLOCK_G=block_g, BLOCK_N=block_n,
                          BLOCK_D=block_d, HAS_MASK=not paged, SINGLE_SPLIT=single_split,
                          DOT_IN_FP32=dtype == torch.float32, PAGED=paged, KV_BLOCK_SIZE=16 if paged else 1)
        kernel = kernels._prefix_decode_split_kernel
        triton.compile(ASTSource(kernel, signature(kernel, types, constexprs), constexprs), target=target,
                       options={"num_warps": num_warps})
    constexprs = dict(BLOCK_SPLITS=128, SPLIT_TILE=pd.COMBINE_SPLIT_TILE, BLOCK_D=block_d)
    types = dict(part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32", out_ptr="*" + name)
    kernel = kernels._prefix_decode_combine_kernel
    triton.compile(ASTSource(kernel, signature(kernel, types, constexprs), constexprs), target=target,
                   options={"num_warps": 4})
print("compiled")
"""


def test_triton_decode_compiles_for_sm90_without_gpu():
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", OFFLINE_COMPILE], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GPU_CASES = DECODE_CASES + [
    DecodeCase("d256-long", B=2, Hq=8, Hkv=1, D=256, S=1500, P=300, prefix_lengths=(300, 120),
               prefix_index=(1, 0), left_pad=(0, 600)),
    DecodeCase("d96-many-rows", B=24, Hq=32, Hkv=8, D=96, S=700, P=64, prefix_lengths=(64, 0, 31),
               prefix_index=tuple(i % 3 for i in range(24)), left_pad=tuple(i * 11 for i in range(24))),
]


def _gpu_tolerance(inputs, expected):
    if inputs["q"].dtype == torch.float32:
        return 1e-5
    return low_precision_tolerance(inputs, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_triton_decode_gpu(decode_kernels, case, dtype):
    if decode_kernels.INTERPRETING:
        pytest.skip("triton was imported with TRITON_INTERPRET=1; run the GPU tests in a session without it")
    inputs = make_decode_inputs(case, dtype=dtype, device="cuda")
    expected = concat_reference(**inputs)
    for num_splits in (None, 1, 4):
        out = decode_kernels.prefix_decode_fwd(**inputs, num_splits=num_splits)
        assert_close(out, expected, _gpu_tolerance(inputs, expected), name=f"triton[{dtype}, splits={num_splits}]")


def _cuda_op():
    from fastpeft.ops import environment

    module, reason = environment.cuda_extension()
    if module is None or not hasattr(torch.ops.fastpeft, "_cuda_prefix_decode"):
        pytest.skip(f"CUDA extension not available: {reason}")
    return torch.ops.fastpeft._cuda_prefix_decode


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_decode_op(case, dtype):
    op = _cuda_op()
    inputs = make_decode_inputs(case, dtype=dtype, device="cuda")
    expected = concat_reference(**inputs)
    out = op(*inputs.values())
    assert out.shape == inputs["q"].shape and out.dtype == dtype
    assert_close(out, expected, _gpu_tolerance(inputs, expected), name=f"cuda[{dtype}]")


@pytest.mark.gpu
def test_cuda_decode_op_blind_row_and_strided_inputs():
    op = _cuda_op()
    case = DecodeCase("blind-row", B=2, S=40, P=8, D=40, prefix_lengths=(8, 0), prefix_index=(0, 1),
                      left_pad=(4, 40))
    inputs = make_decode_inputs(case, dtype=torch.float16, device="cuda")
    cache_k = torch.randn(case.B, case.Hkv, 64, case.D, device="cuda", dtype=torch.float16)
    cache_v = torch.randn_like(cache_k)
    inputs.update(k=cache_k[:, :, :case.S], v=cache_v[:, :, :case.S],
                  prefix_index=inputs["prefix_index"].repeat_interleave(2)[::2])
    out = op(*inputs.values())
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    expected = concat_reference(**inputs)
    assert_close(out, expected, _gpu_tolerance(inputs, expected), name="cuda")


@pytest.mark.gpu
def test_cuda_decode_op_rejects_bad_arguments():
    op = _cuda_op()
    inputs = make_decode_inputs(DECODE_CASES[0], device="cuda")
    bad = dict(inputs, prefix_index=inputs["prefix_index"].long())
    with pytest.raises(RuntimeError, match="prefix_index"):
        op(*bad.values())
    bad = dict(inputs, q=inputs["q"].expand(-1, -1, 2, -1))
    with pytest.raises(RuntimeError, match="one query"):
        op(*bad.values())
