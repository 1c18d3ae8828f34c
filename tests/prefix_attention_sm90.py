"""Compile the prefix attention Triton kernels for sm_90 without a GPU (Triton ships ptxas), to catch the
GPU-only compile errors the interpreter cannot see: tile shapes of ``tl.dot``, dtype mixes, value
specializations (strides, T, L or the GQA group equal to 1 become constants), shared memory per config.

Run as ``python -m tests.prefix_attention_sm90`` with ``TRITON_INTERPRET`` unset; prints one line per kernel.
"""

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP32_POINTERS = ("lse_ptr", "delta_ptr", "dprefix_k_acc_ptr", "dprefix_v_acc_ptr", "partial_k_ptr",
                 "partial_v_ptr")

# (dtype, head size, causal, key padding mask, integer arguments launched as 1)
VARIANTS = [
    ("bf16", 128, True, True, ()),
    ("fp32", 40, False, False, ("T", "L", "group")),
]


def _signature(kernel, dtype_name, constexprs):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("prefix_index_ptr", "prefix_lengths_ptr"):
            signature[name] = "*i32"
        elif name == "mask_ptr":
            signature[name] = "*u8"
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + dtype_name
        elif name in ("qk_scale", "softmax_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def compile_kernel(kernel, dtype_name, constexprs, num_warps, num_stages, ones=()):
    """Compile ``kernel`` (a JITFunction) for TARGET; unit-stride head dims and ``ones`` are launched as 1."""
    constexprs = dict(constexprs)
    constexprs.update({name: 1 for name in kernel.arg_names
                       if name in ones or (name.startswith("stride_") and name.endswith("_d"))})
    source = ASTSource(kernel, _signature(kernel, dtype_name, constexprs), constexprs)
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def main():
    import fastpeft.kernels.prefix_attention as kernels

    if kernels._INTERPRETING:
        sys.exit("unset TRITON_INTERPRET: the kernels were decorated for the interpreter")
    compiled = 0
    for dtype_name, head_dim, causal, has_mask, ones in VARIANTS:
        block_d = kernels._block_d(head_dim)
        probe = torch.empty(0, dtype=TORCH_DTYPES[dtype_name])
        autotuned = [(kernels._prefix_attn_fwd_kernel, {}), (kernels._prefix_attn_bwd_dq_kernel, {}),
                     (kernels._prefix_attn_bwd_dkdv_kernel, {}),
                     (kernels._prefix_attn_bwd_prefix_dkdv_kernel, {"ATOMIC": True}),
                     (kernels._prefix_attn_bwd_prefix_dkdv_kernel, {"ATOMIC": False})]
        for autotuner, extra in autotuned:
            # The largest config the pruner keeps for a long sequence: the most demanding one.
            config = kernels._prune_configs(autotuner.configs, {"q_ptr": probe, "bucket_l": 1024},
                                            BLOCK_D=block_d)[0]
            constexprs = dict(CAUSAL=causal, HAS_MASK=has_mask, DOT_FP32=dtype_name == "fp32", BLOCK_D=block_d,
                              **config.kwargs, **extra)
            binary = compile_kernel(autotuner.fn, dtype_name, constexprs, config.num_warps, config.num_stages,
                                    ones)
            print(f"{autotuner.fn.__name__} {dtype_name} D={head_dim} {config.kwargs} {extra} "
                  f"shared={binary.metadata.shared}")
            compiled += 1
        compile_kernel(kernels._prefix_attn_bwd_preprocess_kernel, dtype_name,
                       dict(BLOCK_M=kernels._PREPROCESS_BLOCK_M, BLOCK_D=block_d), 4, 1)
        compile_kernel(kernels._prefix_grad_reduce_kernel, dtype_name,
                       dict(BLOCK_P=kernels._REDUCE_BLOCK_P, BLOCK_D=block_d), 4, 1, ones)
        compiled += 2
    print(f"compiled {compiled} kernels for sm_90")


if __name__ == "__main__":
    main()
