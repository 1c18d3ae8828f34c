"""``fastpeft.ops.paged_prefix_decode``: one query per row over its prefix entry and its own tokens in a paged KV
cache, on every backend, against a float64 reference built from first principles (walk each row's block table token
by token, concatenate the prefix entry in front, softmax, multiply).

The block pools are random everywhere, and every slot that holds none of a row's tokens (unused blocks, the tail of
a row's last block) holds NaN: a backend that reads a stale slot into its arithmetic fails. Block tables are ragged
(entries past a row's last token are -1), rows may share blocks (the prompt of n > 1 continuations), block sizes
include 1 and a size that is not a power of two, and prefixes are ragged with empty entries.

CPU: the reference and sdpa backends, and the Triton kernels under the interpreter. GPU (marked): the Triton kernels
compiled and the CUDA extension's op, in bf16/fp16/fp32.
"""

import importlib
import math

import pytest
import torch

from fastpeft import observe
from fastpeft.ops import paged_prefix_decode, registry
from fastpeft.ops.backends import sdpa_short

from .paged_cases import PagedCase, make_paged_inputs, paged_reference
from .reference import assert_close


CASES = [
    PagedCase("gqa-8-2-d64-bs16", seq_lens=(1, 37, 0, 16), prefix_index=(2, 0, 1, 1)),
    PagedCase("mqa-d40-bs5", seq_lens=(23, 5, 1), prefix_index=(1, 0, 0), Hq=4, Hkv=1, D=40, block_size=5,
              prefix_lengths=(6, 0), P=6),
    PagedCase("mha-d13-bs1", seq_lens=(7, 3), prefix_index=(0, 1), Hq=2, Hkv=2, D=13, block_size=1,
              prefix_lengths=(4, 0), P=4),
    # G = 40 > the Triton kernel's per-program head cap at D = 128: the group is spread over two programs.
    PagedCase("mqa-wide-group-d128", seq_lens=(9, 30), prefix_index=(0, 0), Hq=40, Hkv=1, D=128, block_size=8,
              prefix_lengths=(4,), P=4),
    PagedCase("shared-prompt-blocks", seq_lens=(35, 41, 12), prefix_index=(1, 1, 2), block_size=8,
              shared_blocks=4),
    PagedCase("blind-rows", seq_lens=(0, 0, 6), prefix_index=(0, 0, 0), prefix_lengths=(0,), P=3, D=16,
              block_size=4),
]

# sdpa: on CPU the C++ per-query kernel reads the blocks in place (float32/64, where fastpeft._cpu is built);
# sdpa-gather: the same backend with the extension switched off, gathering the blocks (as for 16-bit inputs).
BACKENDS = ["reference", "sdpa", "sdpa-gather", "triton"]


def low_precision_tolerance(inputs, expected):
    """A fp16/bf16 result's bound: a multiple of what float32 arithmetic on the same low-precision inputs, rounded to
    the output dtype, gets against the float64 truth (plus a small floor)."""
    rounded = paged_reference(**inputs).to(inputs["q"].dtype).double()
    return 4 * float((rounded - expected).norm() / expected.norm()) + 1e-3


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each backend, forced (its registry name is returned); the Triton kernels where this session runs them
    (interpreted on CPU)."""
    name = request.param.split("-")[0]
    why = registry.get(name).unavailable(torch.device("cpu"), torch.float32)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    if request.param == "sdpa-gather":
        monkeypatch.setenv("FASTPEFT_CPU_EXTENSION", "0")
    monkeypatch.setenv("FASTPEFT_BACKEND", name)
    return name


@pytest.fixture
def decode_kernels():
    return importlib.import_module("fastpeft.kernels.prefix_decode")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_matches_float64_reference(backend, case):
    inputs = make_paged_inputs(case, seed=1)
    with torch.no_grad(), observe.attention_calls() as calls:
        out = paged_prefix_decode(**inputs)
    assert calls == {backend: 1}
    assert out.shape == inputs["q"].shape and out.dtype == torch.float32
    assert not out.isnan().any()
    assert_close(out, paged_reference(**inputs), 1e-5, name=f"{backend}[{case}]")


def test_float64_on_the_pytorch_backends(backend):
    if backend == "triton":
        pytest.skip("the Triton kernels take no float64 inputs")
    inputs = make_paged_inputs(CASES[1], dtype=torch.float64, seed=2)
    with torch.no_grad():
        out = paged_prefix_decode(**inputs)
    assert out.dtype == torch.float64
    assert_close(out, paged_reference(**inputs), 1e-12, name=backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(backend, dtype):
    inputs = make_paged_inputs(CASES[0], dtype=dtype, seed=3)
    with torch.no_grad():
        out = paged_prefix_decode(**inputs)
    assert out.dtype == dtype
    expected = paged_reference(**inputs)
    assert_close(out, expected, low_precision_tolerance(inputs, expected), name=f"{backend}[{dtype}]")


def test_flash_attention_cache_layout_passes_as_a_transposed_view(backend):
    # A [num_blocks, block_size, Hkv, D] buffer (FlashAttention's, vLLM v1's) read through its strides, not copied.
    inputs = make_paged_inputs(CASES[0], seed=4)
    flash = {name: inputs[name].transpose(1, 2).contiguous().transpose(1, 2) for name in ("key_cache", "value_cache")}
    assert not flash["key_cache"].is_contiguous()
    with torch.no_grad():
        out = paged_prefix_decode(**dict(inputs, **flash))
    assert_close(out, paged_reference(**inputs), 1e-5, name=backend)


def test_shared_prefix_and_default_lengths(backend):
    # A 3-D prefix shared by every row, without prefix_index / prefix_lengths.
    inputs = make_paged_inputs(CASES[0], seed=5)
    inputs["prefix_k"], inputs["prefix_v"] = inputs["prefix_k"][1], inputs["prefix_v"][1]
    del inputs["prefix_index"], inputs["prefix_lengths"]
    with torch.no_grad():
        out = paged_prefix_decode(**inputs, softmax_scale=0.3)
    assert_close(out, paged_reference(**inputs, softmax_scale=0.3), 1e-5, name=backend)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_kernel_split_counts(decode_kernels, case, num_splits):
    if not decode_kernels.INTERPRETING and not torch.cuda.is_available():
        pytest.skip("Triton is neither interpreted nor has a GPU")
    device = "cpu" if decode_kernels.INTERPRETING else "cuda"
    inputs = make_paged_inputs(case, device=device, seed=6)
    args = (*inputs.values(), 1 / math.sqrt(case.D))
    out = decode_kernels.paged_prefix_decode_fwd(*args, num_splits=num_splits)
    assert_close(out, paged_reference(**inputs), 1e-5, name=f"splits={num_splits}")


def test_cpu_extension_reads_the_blocks_in_place(monkeypatch):
    # The sdpa backend on CPU runs the C++ per-query kernel over the pool, not the default gather-then-decode path.
    from fastpeft.ops import environment

    if environment.cpu_extension()[0] is None:
        pytest.skip(f"fastpeft._cpu: {environment.cpu_extension()[1]}")
    monkeypatch.setenv("FASTPEFT_BACKEND", "sdpa")
    monkeypatch.setenv("FASTPEFT_CPU_EXTENSION", "1")
    calls = []
    in_cpp = sdpa_short.paged_decode
    monkeypatch.setattr(sdpa_short, "paged_decode", lambda args: calls.append(1) or in_cpp(args))
    monkeypatch.setattr(registry.get("sdpa"), "decode", lambda *args: pytest.fail("gathered"))
    inputs = make_paged_inputs(CASES[4], seed=7)
    with torch.no_grad():
        out = paged_prefix_decode(**inputs)
    assert calls == [1]
    assert_close(out, paged_reference(**inputs), 1e-5, name="sdpa C++")


def test_triton_backend_reads_the_blocks_in_its_kernel(decode_kernels, monkeypatch):
    # The Triton backend runs its paged kernel, not the default gather-then-decode path.
    if registry.get("triton").unavailable(torch.device("cpu"), torch.float32) is not None:
        pytest.skip("the Triton kernels do not run on CPU in this session")
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
    calls = []
    kernel = decode_kernels.paged_prefix_decode_fwd
    monkeypatch.setattr(decode_kernels, "paged_prefix_decode_fwd",
                        lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    monkeypatch.setattr(decode_kernels, "prefix_decode_fwd", lambda *args, **kwargs: pytest.fail("gathered"))
    inputs = make_paged_inputs(CASES[0], seed=7)
    with torch.no_grad():
        out = paged_prefix_decode(**inputs)
    assert calls == [1]
    assert_close(out, paged_reference(**inputs), 1e-5, name="triton")


def test_integer_inputs_of_any_integer_dtype(backend):
    inputs = make_paged_inputs(CASES[0], seed=8)
    wide = {name: inputs[name].long() for name in ("block_table", "seq_lens", "prefix_index", "prefix_lengths")}
    with torch.no_grad():
        out = paged_prefix_decode(**dict(inputs, **wide))
    assert_close(out, paged_reference(**inputs), 1e-5, name=backend)


# ----- bad input: a ValueError / IndexError naming the argument, before any kernel runs ---------------------------


def _bad_inputs():
    inputs = make_paged_inputs(CASES[0], seed=9)
    table = inputs["block_table"]
    unused = table.clone()
    unused[0, 1:] = 10 ** 6   # past row 0's one token: never read, so any value is fine there
    bad_used = table.clone()
    bad_used[1, 2] = inputs["key_cache"].shape[0]   # holds tokens 32..36 of row 1
    return inputs, [
        (dict(q=inputs["q"].expand(-1, -1, 2, -1)), ValueError, "one query per row"),
        (dict(value_cache=inputs["value_cache"][:-1]), ValueError, "key_cache and value_cache must have the same"),
        (dict(key_cache=inputs["key_cache"][..., :32], value_cache=inputs["value_cache"][..., :32]), ValueError,
         "key_cache must be"),
        (dict(q=inputs["q"][:, :3]), ValueError, "multiple of the kv heads"),
        (dict(key_cache=inputs["key_cache"].double()), ValueError, "key_cache is torch.float64"),
        (dict(block_table=table.float()), ValueError, "block_table must have an integer dtype"),
        (dict(block_table=table[:2]), ValueError, "block_table must have shape"),
        (dict(block_table=table[:, :0]), ValueError, "block_table must have shape"),
        (dict(block_table=[[0]]), ValueError, "block_table must be an integer torch.Tensor"),
        (dict(seq_lens=inputs["seq_lens"][:2]), ValueError, "seq_lens must have shape"),
        (dict(seq_lens=inputs["seq_lens"] + 100), ValueError, "seq_lens values must lie in"),
        (dict(seq_lens=inputs["seq_lens"] - 2), ValueError, "seq_lens values must lie in"),
        (dict(block_table=bad_used), IndexError, r"block_table\[1, 2\]"),
        (dict(block_table=unused), None, None),
        (dict(prefix_index=inputs["prefix_index"] + 1), IndexError, "prefix_index"),
        (dict(prefix_lengths=inputs["prefix_lengths"] + 1), ValueError, "prefix_lengths"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    ]


def test_bad_input_is_refused_naming_the_argument(backend, monkeypatch):
    inputs, cases = _bad_inputs()
    for backend_object in registry.BACKENDS:   # nothing may reach a backend before the checks passed
        monkeypatch.setattr(backend_object, "paged_decode",
                            lambda args, _original=backend_object.paged_decode: calls.append(1) or _original(args))
    for change, error, match in cases:
        calls = []
        with torch.no_grad():
            if error is None:
                assert_close(paged_prefix_decode(**dict(inputs, **change)), paged_reference(**inputs), 1e-5,
                             name="unused block table entries")
                assert calls == [1]
                continue
            with pytest.raises(error, match=match):
                paged_prefix_decode(**dict(inputs, **change))
        assert calls == [], f"{match}: a backend ran before the argument was refused"


def test_inputs_that_require_grad_are_refused():
    inputs = make_paged_inputs(CASES[0], seed=10)
    inputs["q"].requires_grad_(True)
    with pytest.raises(ValueError, match="inference only"):
        paged_prefix_decode(**inputs)


# ----- GPU: the compiled Triton kernels and the CUDA extension ------------------------------------------------------

GPU_CASES = CASES + [
    PagedCase("d256-long", seq_lens=(1500, 333), prefix_index=(1, 0), prefix_lengths=(300, 120), P=300, Hq=8,
              Hkv=1, D=256, block_size=16),
    PagedCase("d96-many-rows", seq_lens=tuple(17 * i + 1 for i in range(24)), prefix_index=tuple(i % 3 for i in
              range(24)), prefix_lengths=(64, 0, 31), P=64, Hq=32, Hkv=8, D=96, block_size=32),
]
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _gpu_tolerance(inputs, expected):
    return 1e-5 if inputs["q"].dtype == torch.float32 else low_precision_tolerance(inputs, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_triton_paged_decode_gpu(decode_kernels, case, dtype):
    if decode_kernels.INTERPRETING:
        pytest.skip("triton was imported with TRITON_INTERPRET=1; run the GPU tests in a session without it")
    inputs = make_paged_inputs(case, dtype=dtype, device="cuda", seed=11)
    expected = paged_reference(**inputs)
    for num_splits in (None, 1, 4):
        out = decode_kernels.paged_prefix_decode_fwd(*inputs.values(), 1 / math.sqrt(case.D), num_splits=num_splits)
        assert_close(out, expected, _gpu_tolerance(inputs, expected), name=f"triton[{dtype}, splits={num_splits}]")


def _cuda_op():
    from fastpeft.ops import environment

    module, reason = environment.cuda_extension()
    if module is None or not hasattr(torch.ops.fastpeft, "_cuda_paged_prefix_decode"):
        pytest.skip(f"CUDA extension not available: {reason}")
    return torch.ops.fastpeft._cuda_paged_prefix_decode


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_cuda_paged_decode_op(case, dtype):
    op = _cuda_op()
    inputs = make_paged_inputs(case, dtype=dtype, device="cuda", seed=12)
    expected = paged_reference(**inputs)
    out = op(*inputs.values(), 1 / math.sqrt(case.D))
    assert out.shape == inputs["q"].shape and out.dtype == dtype
    assert_close(out, expected, _gpu_tolerance(inputs, expected), name=f"cuda[{dtype}]")


@pytest.mark.gpu
def test_cuda_paged_decode_through_the_public_op_and_flash_layout(monkeypatch):
    _cuda_op()
    monkeypatch.delenv("FASTPEFT_BACKEND", raising=False)
    inputs = make_paged_inputs(CASES[0], dtype=torch.float16, device="cuda", seed=13)
    flash = {name: inputs[name].transpose(1, 2).contiguous().transpose(1, 2) for name in ("key_cache", "value_cache")}
    with torch.no_grad(), observe.attention_calls() as calls:
        out = paged_prefix_decode(**dict(inputs, **flash))
    assert calls == {"cuda": 1}
    expected = paged_reference(**inputs)
    assert_close(out, expected, _gpu_tolerance(inputs, expected), name="cuda")


@pytest.mark.gpu
def test_cuda_paged_decode_op_rejects_bad_arguments():
    op = _cuda_op()
    inputs = make_paged_inputs(CASES[0], device="cuda", seed=14)
    with pytest.raises(RuntimeError, match="block_table must be int32"):
        op(*dict(inputs, block_table=inputs["block_table"].long()).values(), 0.125)
    with pytest.raises(RuntimeError, match="one query"):
        op(*dict(inputs, q=inputs["q"].expand(-1, -1, 2, -1)).values(), 0.125)
