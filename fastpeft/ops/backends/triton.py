"""The ``triton`` backend: the Triton kernels of ``fastpeft.kernels`` (training, prefill and decode), on CUDA tensors,
or on CPU tensors under ``TRITON_INTERPRET=1``. The kernel modules, and Triton with them, are imported on the first
call, never when fastpeft is imported."""

import torch

from .. import environment
from .base import Backend


class TritonBackend(Backend):
    name = "triton"
    summary = "the Triton kernels (fastpeft.kernels): forward, backward and decode"
    expected_on = ("cuda",)

    def out_of_scope(self, case):
        if case.bias:
            return "the triton kernels take no attn_bias"
        return None

    def unavailable(self, device, dtype):
        # Device first: a plain CPU call must not pay for importing triton.
        if not (device.type == "cuda" or (device.type == "cpu" and environment.triton_interpreting())):
            return "needs CUDA tensors (or TRITON_INTERPRET=1 to interpret the kernels on CPU)"
        if dtype == torch.float64:
            return "the Triton kernels take no float64 inputs"
        available, why = environment.triton_available()
        return None if available else why

    def forward(self, args, plan, for_backward):
        from ...kernels.prefix_attention import prefix_attention_fwd

        out, lse = prefix_attention_fwd(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index,
                                        args.prefix_lengths, args.key_padding_mask, args.causal, args.softmax_scale)
        return out, lse, ()

    def backward(self, dout, args, out, lse, saved, plan, bias_grad):
        from ...kernels.prefix_attention import prefix_attention_bwd

        grads = prefix_attention_bwd(dout, args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index,
                                     args.prefix_lengths, args.key_padding_mask, out, lse, args.causal,
                                     args.softmax_scale, args.deterministic)
        return tuple(grads) + (None,)

    def decode(self, args, plan):
        from ...kernels.prefix_decode import prefix_decode_fwd

        return prefix_decode_fwd(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index,
                                 args.prefix_lengths, args.key_padding_mask, args.causal, args.softmax_scale)

    def paged_decode(self, args):
        from ...kernels.prefix_decode import paged_prefix_decode_fwd

        return paged_prefix_decode_fwd(*args)
