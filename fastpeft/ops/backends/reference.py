"""The ``reference`` backend: the PyTorch reference (``fastpeft.ops.reference``), for cases no faster backend covers
and as the tests' oracle. Plain differentiable PyTorch: ordinary autograd gives its backward, and torch.compile traces
it as it is (no custom op, no backward of its own)."""

from ..reference import reference_attention
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    summary = "PyTorch reference (float64 semantics, the tests' oracle), always present"
    differentiable = True

    def forward(self, args, plan, for_backward):
        out, lse = reference_attention(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index,
                                       args.prefix_lengths, args.key_padding_mask, args.causal, args.softmax_scale,
                                       attn_bias=args.attn_bias)
        return out, (lse if for_backward else None), ()
