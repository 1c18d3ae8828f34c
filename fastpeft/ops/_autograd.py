"""Autograd for the prefix-attention custom ops. Every backend registers a forward op
``(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale,
deterministic) -> (out, lse)`` and a backward op ``(dout, <the tensors>, out, lse, causal, softmax_scale,
deterministic) -> (dq, dk, dv, dprefix_k, dprefix_v)``; this connects the two once, the same way for all."""


def register_prefix_attention_autograd(forward_op, backward_op):
    def setup_context(ctx, inputs, output):
        # Only called when grad is enabled and an input requires it: inference saves nothing.
        (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale,
         deterministic) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, out,
                              lse)
        ctx.causal, ctx.softmax_scale, ctx.deterministic = causal, softmax_scale, deterministic
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        grads = backward_op(dout, *ctx.saved_tensors, ctx.causal, ctx.softmax_scale, ctx.deterministic)
        return tuple(grads) + (None,) * 6  # the integer inputs, the mask and the three flags

    forward_op.register_autograd(backward, setup_context=setup_context)
