"""The ``sdpa`` backend of ``fastpeft.prefix_attention`` for calls with an additive score bias (``attn_bias``).

The same split as ``fastpeft.ops.sdpa_prefix_attention`` (one fused attention call per part of the key axis, merged
by log-sum-exp), kept apart from it so that calls without a bias pay nothing for this one. Each part's fused call
takes the part's columns of ``attn_bias`` (the prefix part columns ``0 .. n-1``, the keys part columns
``P .. P+S-1``) as its float ``attn_mask``, with the part's masks folded in as ``-inf``:

* prefix: q against the row's prefix entries, ragged ``prefix_lengths`` as ``-inf`` columns (on CPU the prefix is
  cut to the longest row and skipped when no row has one, as without a bias);
* keys: q against the row's own keys, ``key_padding_mask`` as ``-inf`` columns (dropped on CPU when all ones).
  Causal with ``S == L``: the op's own causal flag (its kernel skips the blocks above the diagonal); causal with a
  cache before the queries (``1 < L < S``): the bottom-right causal structure folded into the mask.

Each part's mask is written once, contiguous, in the broadcast shape of the bias and the masks (``[B, Hq, L, n]``
where padding meets a per-head bias, as transformers' own sdpa path builds it); the fused CPU ops would copy any other
layout in every call. The query group of grouped-query attention is not folded into the query axis here (the bias
differs per query head); the CPU op reads grouped kv heads natively, the CUDA path repeats them (``_sdpa_ops``). A
bias may hold ``-inf`` itself, so which queries see no key of a part (whose ``lse`` the ops leave finite) is read from
the part's mask (``isneginf(mask).all(-1)`` under the causal structure) unless, on CPU, the bias has no ``-inf``: then
the padding and ragged masks alone say it, as without a bias.

Backward: the fused backward ops give ``dq, dk, dv`` of each part from the merged ``out``/``lse``, as without a
bias. They give no bias gradient, so when ``attn_bias`` requires grad it is computed here per part from the merged
``lse``: ``dbias = p * (dout @ v^T - rowsum(dout * out))`` with ``p = exp(scale * q @ k^T + mask - lse)``, summed
over the axes the bias broadcasts over (this materializes ``[B, Hq, L, n]`` float32 per part, as eager attention
does). Registered as the custom ops ``fastpeft::sdpa_prefix_attention_bias_fwd`` / ``_bwd`` (fake implementations
and autograd, so ``torch.compile`` traces them; their backward plans the parts again); eager calls go through an
``autograd.Function`` instead, which skips the custom-op dispatch and keeps the forward's parts for the backward.
"""

from typing import NamedTuple, Optional, Tuple

import torch

from . import _sdpa_ops
from .sdpa_prefix_attention import _NEG_INF, _accumulation_dtype, _merge, _reduce_prefix


class _Part(NamedTuple):
    """One fused attention call of the split, with its bias."""
    kind: str                       # "prefix" or "keys"
    k: torch.Tensor                 # [B, Hkv, n, D]
    v: torch.Tensor
    mask: torch.Tensor              # float [1|B, 1|Hq, 1|L, n], q's dtype: the bias columns, -inf where masked
    causal: bool                    # the op's top-left causal flag (only with n == L); not part of ``mask``
    columns: slice                  # the part's columns of attn_bias's last axis
    blind: Optional[torch.Tensor]   # bool [1 or B, 1 or Hq, 1 or L]: queries that see no key of this part, or None


def _part_mask(bias, visible):
    """The part's float mask as one contiguous tensor (the fused CPU ops copy a mask of any other layout, in every
    forward and backward call, and T5's bias is a permuted view): the bias columns ``bias``, with ``-inf`` where the
    broadcastable bool ``visible`` is False (None: nothing hidden), written once in the broadcast shape."""
    if visible is None:
        return bias.contiguous()
    out = torch.empty(torch.broadcast_shapes(visible.shape, bias.shape), dtype=bias.dtype, device=bias.device)
    return torch.where(visible, bias, torch.tensor(_NEG_INF, dtype=bias.dtype, device=bias.device), out=out)


def _tril(L, device):
    """Bool ``[L, L]``, True on and below the diagonal: query ``i`` sees keys ``j <= i`` (S == L)."""
    return torch.ones(L, L, dtype=torch.bool, device=device).tril()


def _blind(mask, scan, causal_square, from_masks):
    """The part's blind queries: read from its mask (``scan``: the bias may hold -inf; under the op's causal flag
    only keys ``j <= i`` count), else ``from_masks`` (derived from the padding/ragged masks alone, or None)."""
    if not scan:
        return from_masks
    if causal_square:
        return ~(~torch.isneginf(mask) & _tril(mask.shape[-1], mask.device)).any(-1)
    return torch.isneginf(mask).all(-1)


def _plan(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal):
    """The fused calls whose merge is the biased attention over ``[prefix ; k]`` (see the module docstring)."""
    B, _, L, D = q.shape
    S = k.shape[2]
    T, Hkv, P = prefix_k.shape[:3]
    on_host = q.device.type == "cpu"
    # Which queries a bias with -inf entries blinds shows only in the [.., L, n] masks; on CPU a scan of the bias in
    # its own (broadcast) shape says whether it has any, else the (much smaller) masks alone say which queries are
    # blind. On an accelerator that scan would synchronize: the masks are always read.
    scan = not on_host or bool(torch.isneginf(attn_bias).any())
    parts = []
    row_lengths = prefix_lengths.index_select(0, prefix_index)  # [B]
    n = min(int(row_lengths.max()), P) if on_host and B > 0 else P
    if n > 0:
        if T == 1:   # shared: broadcast over the batch, never copied per row
            pk = prefix_k[:, :, :n].expand(B, Hkv, n, D)
            pv = prefix_v[:, :, :n].expand(B, Hkv, n, D)
        else:
            pk = prefix_k[:, :, :n].index_select(0, prefix_index)
            pv = prefix_v[:, :, :n].index_select(0, prefix_index)
        visible = blind = None
        if not on_host or bool((row_lengths < n).any()):
            visible = (torch.arange(n, device=q.device)[None, :] < row_lengths[:, None])[:, None, None, :]
            blind = (row_lengths == 0)[:, None, None]
        mask = _part_mask(attn_bias[..., :n], visible)
        parts.append(_Part("prefix", pk, pv, mask, False, slice(0, n), _blind(mask, scan, False, blind)))

    if key_padding_mask is not None and on_host and bool(key_padding_mask.all()):
        key_padding_mask = None
    visible = blind = None
    if key_padding_mask is not None:
        visible = key_padding_mask[:, None, None, :]
        if causal and L > 1:   # query i sees keys j <= S - L + i
            blind = (key_padding_mask.cumsum(1)[:, S - L:] == 0)[:, None, :]
        else:
            blind = (~key_padding_mask.any(1))[:, None, None]
    square = causal and L == S and L > 1   # the op's own causal flag (top-left = bottom-right here)
    if causal and 1 < L < S:   # a cache precedes the queries: query i sees keys j <= S - L + i, folded into the mask
        allowed = torch.arange(S, device=q.device)[None, :] <= torch.arange(L, device=q.device)[:, None] + (S - L)
        visible = allowed if visible is None else visible & allowed
    # (otherwise non-causal, or one query per row, which sits at the last key and sees them all)
    mask = _part_mask(attn_bias[..., P:], visible)
    parts.append(_Part("keys", k, v, mask, square, slice(P, P + S), _blind(mask, scan, square, blind)))
    return parts


def sdpa_bias_prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                   attn_bias, causal, softmax_scale):
    """Canonical arguments -> ``(out [B, Hq, L, D] in q's dtype, lse [B, Hq, L] float32, float64 for float64
    inputs)``; ``lse = -inf`` for a query that sees no key (its output is zeros)."""
    return _forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
                    softmax_scale)[:2]


def _forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
             softmax_scale):
    """``(out, lse, parts)``: the forward and the plan it ran (which the eager backward reuses)."""
    B, Hq, L, D = q.shape
    acc = _accumulation_dtype(q.dtype)
    if q.numel() == 0:
        return q.new_zeros(q.shape), q.new_zeros(B, Hq, L, dtype=acc), []
    q = q.contiguous()
    outs, lses = [], []
    parts = _plan(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal)
    for part in parts:
        out, lse = _sdpa_ops.attend(q, part.k, part.v, part.mask, part.causal, softmax_scale)
        lse = lse.reshape(B, Hq, L).to(acc)
        outs.append(out.reshape(B, Hq, L, D))
        lses.append(lse if part.blind is None else lse.masked_fill(part.blind, _NEG_INF))
    out, lse = _merge(outs, lses, q.dtype, acc)
    return out, lse.contiguous(), parts   # (the ops' lse may be strided; the fake implementation's is contiguous)


def _bias_gradient(dout, q, part, delta, lse, softmax_scale):
    """``dS = p * (dout @ v^T - delta)`` of one part, ``[B, Hq, L, n]`` in float32/64: the gradient of the scores,
    which is the gradient of the part's bias columns before the broadcast is summed. ``lse`` is the merged one
    (``+inf`` for blind queries, whose ``p`` is then 0)."""
    B, Hq, L, D = q.shape
    Hkv, n = part.k.shape[1], part.k.shape[2]
    acc = lse.dtype
    grouped = (B, Hkv, Hq // Hkv, L, D)
    scores = torch.einsum("bhgld,bhnd->bhgln", q.to(acc).view(grouped), part.k.to(acc)).reshape(B, Hq, L, n)
    scores = scores * softmax_scale + part.mask.to(acc)
    if part.causal:
        scores = scores.masked_fill(~_tril(L, q.device), _NEG_INF)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    dprobs = torch.einsum("bhgld,bhnd->bhgln", dout.to(acc).view(grouped), part.v.to(acc)).reshape(B, Hq, L, n)
    return probs * (dprobs - delta.unsqueeze(-1))


def sdpa_bias_prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                   key_padding_mask, attn_bias, out, lse, causal, softmax_scale, deterministic,
                                   bias_grad):
    """``(dq, dk, dv, dprefix_k, dprefix_v, dattn_bias)`` from the merged ``out``/``lse`` of the forward; the prefix
    gradients ``[T, Hkv, P, D]`` are summed over the rows that use each entry. ``dattn_bias`` has attn_bias's shape
    when ``bias_grad``, else it is an empty tensor (no gradient is computed)."""
    return _backward_parts(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                           attn_bias, out, lse, causal, softmax_scale, deterministic, bias_grad, None)


def _backward_parts(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
                    out, lse, causal, softmax_scale, deterministic, bias_grad, parts):
    """The backward over the forward's ``parts`` (the eager path keeps them: their masks are ``[B, Hq, L, n]`` where
    padding meets a per-head bias, as costly to rebuild as to keep), or over a new plan when ``parts`` is None."""
    acc = _accumulation_dtype(q.dtype)
    dbias = attn_bias.new_zeros(attn_bias.shape if bias_grad else (0,), dtype=acc)
    if q.numel() == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(prefix_k),
                torch.zeros_like(prefix_v), dbias.to(attn_bias.dtype))
    B, Hq, L, D = q.shape
    q, dout, out = q.contiguous(), dout.contiguous(), out.contiguous()
    lse = lse.masked_fill(lse == _NEG_INF, float("inf")).contiguous()  # blind queries: every p = exp(-inf) = 0
    delta = (dout.to(acc) * out.to(acc)).sum(-1) if bias_grad else None
    broadcast_axes = tuple(axis for axis in range(3) if attn_bias.shape[axis] == 1 and (B, Hq, L)[axis] > 1)
    dq = dk = dv = None
    dprefix = (torch.zeros_like(prefix_k), torch.zeros_like(prefix_v))  # stay zero when no row sees the prefix
    if parts is None:
        parts = _plan(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal)
    for part in parts:
        dq_p, dk_p, dv_p = _sdpa_ops.attend_backward(dout, q, part.k, part.v, part.mask, out, lse, part.causal,
                                                     softmax_scale)
        dq = dq_p.to(acc) if dq is None else dq.add_(dq_p)
        if part.kind == "prefix":
            dprefix = (_reduce_prefix(dk_p, prefix_k, prefix_index, deterministic),
                       _reduce_prefix(dv_p, prefix_v, prefix_index, deterministic))
        else:
            dk, dv = dk_p, dv_p
        if bias_grad:
            dscores = _bias_gradient(dout, q, part, delta, lse, softmax_scale)
            if broadcast_axes:
                dscores = dscores.sum(broadcast_axes, keepdim=True)
            dbias[..., part.columns] = dscores
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dprefix[0].to(prefix_k.dtype),
            dprefix[1].to(prefix_v.dtype), dbias.to(attn_bias.dtype))


# The forward and backward as torch custom ops: torch.compile traces them through the fake implementations (the
# data-dependent planning above runs only in the real ones), and autograd reaches the backward.
@torch.library.custom_op("fastpeft::sdpa_prefix_attention_bias_fwd", mutates_args=())
def _bias_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                 prefix_index: torch.Tensor, prefix_lengths: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 attn_bias: torch.Tensor, causal: bool, softmax_scale: float,
                 deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Canonical arguments -> (out, lse). ``deterministic`` is not used by the forward; it is an input so that the
    backward can read it."""
    return sdpa_bias_prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                          key_padding_mask, attn_bias, causal, softmax_scale)


@_bias_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal, softmax_scale,
      deterministic):
    B, Hq, L, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, L), dtype=_accumulation_dtype(q.dtype))


@torch.library.custom_op("fastpeft::sdpa_prefix_attention_bias_bwd", mutates_args=())
def _bias_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                 prefix_v: torch.Tensor, prefix_index: torch.Tensor, prefix_lengths: torch.Tensor,
                 key_padding_mask: Optional[torch.Tensor], attn_bias: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, causal: bool, softmax_scale: float, deterministic: bool,
                 bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    return sdpa_bias_prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                          key_padding_mask, attn_bias, out, lse, causal, softmax_scale,
                                          deterministic, bias_grad)


@_bias_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, out, lse, causal,
      softmax_scale, deterministic, bias_grad):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prefix_k),
            torch.empty_like(prefix_v), attn_bias.new_empty(attn_bias.shape if bias_grad else (0,)))


_BIAS_INPUT = 8  # position of attn_bias among the forward's inputs


def _setup_context(ctx, inputs, output):
    # Only called when grad is enabled and an input requires it: inference saves nothing.
    (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal, softmax_scale,
     deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
                          out, lse)
    ctx.causal, ctx.softmax_scale, ctx.deterministic = causal, softmax_scale, deterministic
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    bias_grad = ctx.needs_input_grad[_BIAS_INPUT]
    grads = _bias_bwd_op(dout, *ctx.saved_tensors, ctx.causal, ctx.softmax_scale, ctx.deterministic, bias_grad)
    dq, dk, dv, dprefix_k, dprefix_v, dbias = grads
    # the integer inputs and the mask, then the bias, then the three flags
    return dq, dk, dv, dprefix_k, dprefix_v, None, None, None, dbias if bias_grad else None, None, None, None


_bias_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _SdpaBiasPrefixAttention(torch.autograd.Function):
    """The eager path: the same forward and backward as the custom ops, without their dispatch (which costs about
    as much as the attention itself at small shapes on CPU)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
                softmax_scale, deterministic):
        out, lse, parts = _forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                   attn_bias, causal, softmax_scale)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                              attn_bias, out, lse)
        # The plan's views and masks are intermediates (neither inputs nor outputs): kept on ctx, as autograd
        # allows for those.
        ctx.causal, ctx.softmax_scale, ctx.deterministic, ctx.parts = causal, softmax_scale, deterministic, parts
        return out

    @staticmethod
    def backward(ctx, dout):
        bias_grad = ctx.needs_input_grad[_BIAS_INPUT]
        grads = _backward_parts(dout, *ctx.saved_tensors, ctx.causal, ctx.softmax_scale, ctx.deterministic,
                                bias_grad, ctx.parts)
        ctx.parts = None
        dq, dk, dv, dprefix_k, dprefix_v, dbias = grads
        return dq, dk, dv, dprefix_k, dprefix_v, None, None, None, dbias if bias_grad else None, None, None, None


def sdpa_bias_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                               attn_bias, causal, softmax_scale, deterministic=False):
    """Canonical arguments (see ``fastpeft.ops.prefix_attention._canonicalize`` and ``_canonical_bias``) -> out
    ``[B, Hq, L, D]``. Under torch.compile: the custom ops. Eager: the same functions directly, through an
    ``autograd.Function`` only when a gradient is needed (inference saves nothing)."""
    args = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
            softmax_scale)
    if torch.compiler.is_compiling():
        return _bias_fwd_op(*args, deterministic)[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v, attn_bias)):
        return _SdpaBiasPrefixAttention.apply(*args, deterministic)
    return sdpa_bias_prefix_attention_fwd(*args)[0]
