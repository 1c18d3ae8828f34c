"""The ``cuda`` backend: the CUDA extension ``fastpeft._C`` (``csrc/``), which implements decode: one query per row,
no gradient, over dense K/V or a paged KV cache. Importing the extension registers its kernels as the private ops
``torch.ops.fastpeft._cuda_prefix_decode`` and ``torch.ops.fastpeft._cuda_paged_prefix_decode`` (called only from
here)."""

import torch

from .. import environment
from ..arguments import SUPPORTED_DTYPES
from .base import Backend


class CudaBackend(Backend):
    name = "cuda"
    summary = "the CUDA extension fastpeft._C: decode (one query per row, no gradient)"

    def out_of_scope(self, case):
        if case.bias:
            return "the cuda kernels take no attn_bias"
        if not case.decode:
            return "the CUDA extension implements decode (one query per row, no gradient) only"
        return None

    def unavailable(self, device, dtype):
        if device.type != "cuda":
            return "needs CUDA tensors"
        if dtype not in SUPPORTED_DTYPES:
            return f"the CUDA kernels take no {dtype} inputs"
        module, why = environment.cuda_extension()   # (the first failed load warns once itself)
        return None if module is not None else why

    def decode(self, args, plan):
        return torch.ops.fastpeft._cuda_prefix_decode(args.q, args.k, args.v, args.prefix_k, args.prefix_v,
                                                      args.prefix_index, args.prefix_lengths, args.key_padding_mask,
                                                      args.causal, args.softmax_scale)

    def paged_decode(self, args):
        return torch.ops.fastpeft._cuda_paged_prefix_decode(*args)
