"""The ``torch.library`` custom ops of prefix attention, in the ``fastpeft`` namespace: what ``torch.compile`` traces.

* ``fastpeft::prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask?,
  attn_bias?, causal, softmax_scale, deterministic, backend) -> (out, lse)``, with its autograd registered:
* ``fastpeft::prefix_attention_bwd(dout, <the forward's tensors>, out, lse, causal, softmax_scale, deterministic,
  bias_grad, backend) -> (dq, dk, dv, dprefix_k, dprefix_v, dattn_bias)``;
* ``fastpeft::prefix_decode(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask?, causal,
  softmax_scale, backend) -> out``: one query per row, inference only (no autograd);
* ``fastpeft::paged_prefix_decode(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index,
  prefix_lengths, softmax_scale, backend) -> out``: the same over a paged KV cache read through a block table
  (``fastpeft.ops.paged_decode``), inference only.

The arguments are canonical (``fastpeft.ops.arguments``); ``backend`` names the registry's choice, made once where
the call entered (``fastpeft.ops.prefix_attention``), so that the backward runs on the forward's backend (any but the
reference, which torch.compile traces as the plain PyTorch it is). Each op's
implementation hands its arguments to that backend's host functions. The fake implementations give every output the
layout of ``torch.empty_like`` of its input (``out`` and ``dq`` q's, ``dk`` k's, ...; ``lse`` contiguous): a backend
whose result has another layout is copied into that one here, so that the compiled graph sees exactly the strides the
fakes promised, whatever the backend.

Eager calls do not go through these ops (their dispatch costs as much as the attention at small shapes on CPU): the
autograd.Function in ``fastpeft.ops.prefix_attention`` calls the same backend functions directly.
"""

from typing import Optional, Tuple

import torch

from . import registry
from .arguments import AttentionArgs, PagedDecodeArgs, accumulation_dtype

Tensor = torch.Tensor


def _backend(name):
    """The backend the ops run on: any but the reference, which is plain PyTorch (traced as it is)."""
    backend = registry.get(name)
    if backend.differentiable:
        raise ValueError(f"the {name} backend is plain differentiable PyTorch; it does not run through fastpeft's "
                         "custom ops")
    return backend


def _layout_of(result, like):
    """``result`` with the strides ``torch.empty_like(like)`` has (what the fakes promise); copied only if needed."""
    if result.stride() == like.stride():
        return result
    return torch.empty_like(like, dtype=result.dtype).copy_(result)


@torch.library.custom_op("fastpeft::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_index: Tensor,
                         prefix_lengths: Tensor, key_padding_mask: Optional[Tensor], attn_bias: Optional[Tensor],
                         causal: bool, softmax_scale: float, deterministic: bool,
                         backend: str) -> Tuple[Tensor, Tensor]:
    """(out ``[B, Hq, L, D]`` in q's dtype, lse ``[B, Hq, L]`` float32, float64 for float64 inputs). ``deterministic``
    is not used by the forward; it is an input so that the backward can read it."""
    args = AttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
                         causal, softmax_scale, deterministic)
    out, lse, _ = _backend(backend).forward(args, None, for_backward=True)
    return _layout_of(out, q), lse.contiguous()


@prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal, softmax_scale,
      deterministic, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("fastpeft::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         prefix_index: Tensor, prefix_lengths: Tensor, key_padding_mask: Optional[Tensor],
                         attn_bias: Optional[Tensor], out: Tensor, lse: Tensor, causal: bool, softmax_scale: float,
                         deterministic: bool, bias_grad: bool,
                         backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v, dattn_bias); the prefix gradients are summed over the rows using each
    entry; ``dattn_bias`` has attn_bias's shape when ``bias_grad``, else it is empty (nothing is computed)."""
    args = AttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
                         causal, softmax_scale, deterministic)
    grads = _backend(backend).backward(dout, args, out, lse, (), None, bias_grad)
    dbias = _layout_of(grads[5], attn_bias) if bias_grad else q.new_empty(0)
    return (_layout_of(grads[0], q), _layout_of(grads[1], k), _layout_of(grads[2], v), _layout_of(grads[3], prefix_k),
            _layout_of(grads[4], prefix_v), dbias)


@prefix_attention_bwd.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, out, lse, causal,
      softmax_scale, deterministic, bias_grad, backend):
    dbias = torch.empty_like(attn_bias) if bias_grad else q.new_empty(0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prefix_k),
            torch.empty_like(prefix_v), dbias)


_BIAS_INPUT = 8  # position of attn_bias among the forward's inputs


def _setup_context(ctx, inputs, output):
    # Only called when grad is enabled and an input requires it: inference saves nothing.
    (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal, softmax_scale,
     deterministic, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
                          out, lse)
    ctx.flags = (causal, softmax_scale, deterministic)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    bias_grad = ctx.needs_input_grad[_BIAS_INPUT]
    dq, dk, dv, dprefix_k, dprefix_v, dbias = prefix_attention_bwd(dout, *ctx.saved_tensors, *ctx.flags, bias_grad,
                                                                   ctx.backend)
    # the integer inputs and the mask, then the bias, then the three flags and the backend's name
    return dq, dk, dv, dprefix_k, dprefix_v, None, None, None, dbias if bias_grad else None, None, None, None, None


prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastpeft::prefix_decode", mutates_args=())
def prefix_decode(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_index: Tensor,
                  prefix_lengths: Tensor, key_padding_mask: Optional[Tensor], causal: bool, softmax_scale: float,
                  backend: str) -> Tensor:
    """out ``[B, Hq, 1, D]`` in q's dtype of one query per row (q ``[B, Hq, 1, D]``), without a gradient."""
    args = AttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, None, causal,
                         softmax_scale, False)
    return _layout_of(_backend(backend).decode(args, None), q)


@prefix_decode.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale, backend):
    return torch.empty_like(q)


@torch.library.custom_op("fastpeft::paged_prefix_decode", mutates_args=())
def paged_prefix_decode(q: Tensor, key_cache: Tensor, value_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                        prefix_k: Tensor, prefix_v: Tensor, prefix_index: Tensor, prefix_lengths: Tensor,
                        softmax_scale: float, backend: str) -> Tensor:
    """out ``[B, Hq, 1, D]`` in q's dtype of one query per row over its prefix entry and its tokens in the paged cache
    (``PagedDecodeArgs``), without a gradient."""
    args = PagedDecodeArgs(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index,
                           prefix_lengths, softmax_scale)
    return _layout_of(_backend(backend).paged_decode(args), q)


@paged_prefix_decode.register_fake
def _(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index, prefix_lengths,
      softmax_scale, backend):
    return torch.empty_like(q)
