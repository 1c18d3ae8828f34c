"""PyTorch reference implementation of prefix attention: the ``reference`` backend's math, the tests' oracle
(float64 semantics: exact for float64 inputs), and the path for cases no faster backend covers.

Differentiable through ordinary autograd; computes in float32 (float64 for float64 inputs). It never concatenates
the prefix with the sequence: the prefix scores and the sequence scores are two blocks that share one softmax
normalizer, as in the kernels. A shared prefix (T == 1) is read through broadcasting; a table is gathered per row,
which autograd turns into the per-entry sum of the rows' gradients. An additive score bias (``attn_bias``) is added to
both blocks before the masks, as FlashAttention's / xformers' ``attn_bias``; it is differentiable.
"""

import torch

from .. import observe
from .arguments import accumulation_dtype
from .masks import causal_visible, prefix_visible
from .prefix_table import gather_prefix


def visible_masks(B, L, S, P, device, prefix_index, prefix_lengths, key_padding_mask, causal):
    """Boolean visibility of the prefix entries ``[B, 1, P]`` and of the sequence keys ``[B, L, S]`` (see
    ``fastpeft.ops.masks``)."""
    prefix = prefix_visible(prefix_index.to(device), prefix_lengths.to(device), P)[:, None, :]
    keys = torch.ones(B, L, S, dtype=torch.bool, device=device)
    if causal:
        keys = keys & causal_visible(L, S, device)[None]
    if key_padding_mask is not None:
        keys = keys & key_padding_mask.to(torch.bool)[:, None, :]
    return prefix, keys


def reference_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                        softmax_scale, dropout_p=0.0, attn_bias=None):
    """``(out [B, Hq, L, D] in q's dtype, lse [B, Hq, L])`` for the arguments of ``reference_prefix_attention``;
    ``lse`` is the natural-log normalizer of each query's scores in the accumulation dtype (float32, float64 for
    float64 inputs), ``-inf`` for a query that sees no key."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[2]
    group = Hq // Hkv
    compute = accumulation_dtype(q.dtype)
    if S == 0:  # then L == 0 too: nothing to attend from (and no key axis to reduce over)
        return q.new_zeros(B, Hq, L, D), q.new_zeros(B, Hq, L, dtype=compute)

    qg = q.to(compute).reshape(B, Hkv, group, L, D) * softmax_scale
    # [1 or B, Hkv, P, D]: a shared prefix stays one entry, broadcast by the products below
    pk = gather_prefix(prefix_k, prefix_index.long(), P).to(compute)
    pv = gather_prefix(prefix_v, prefix_index.long(), P).to(compute)
    scores_prefix = torch.einsum("bhgld,bhpd->bhglp", qg, pk.expand(B, -1, -1, -1))
    scores_seq = torch.einsum("bhgld,bhsd->bhgls", qg, k.to(compute))
    if attn_bias is not None:
        # [Bb, Hb, Lb, P + S] -> [Bb, Hkv or 1, group or 1, Lb, P + S], broadcast against [B, Hkv, group, L, .]
        bias = attn_bias.to(compute)
        bias = bias.view(bias.shape[0], Hkv, group, *bias.shape[2:]) if bias.shape[1] == Hq else bias[:, :, None]
        scores_prefix = scores_prefix + bias[..., :P]
        scores_seq = scores_seq + bias[..., P:]

    prefix_visible_, seq_visible = visible_masks(B, L, S, P, q.device, prefix_index, prefix_lengths,
                                                 key_padding_mask, causal)
    neg_inf = torch.tensor(float("-inf"), dtype=compute, device=q.device)
    scores_prefix = torch.where(prefix_visible_[:, None, None, :, :], scores_prefix, neg_inf)
    scores_seq = torch.where(seq_visible[:, None, None, :, :], scores_seq, neg_inf)

    # One normalizer over both blocks. A query that sees nothing has max = -inf: shift by 0 instead, so its
    # weights are exp(-inf) = 0 and its output (and every gradient through it) is exactly zero.
    row_max = scores_seq.amax(-1, keepdim=True)
    if P > 0:
        row_max = torch.maximum(row_max, scores_prefix.amax(-1, keepdim=True))
    row_max = row_max.detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights_prefix = torch.exp(scores_prefix - row_max)
    weights_seq = torch.exp(scores_seq - row_max)
    denom = weights_prefix.sum(-1, keepdim=True) + weights_seq.sum(-1, keepdim=True)
    lse = (denom.log() + row_max).reshape(B, Hq, L)   # log(0) = -inf for a query that sees nothing
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p:
        weights_prefix = torch.nn.functional.dropout(weights_prefix, dropout_p)
        weights_seq = torch.nn.functional.dropout(weights_seq, dropout_p)

    out = torch.einsum("bhglp,bhpd->bhgld", weights_prefix, pv.expand(B, -1, -1, -1))
    out = out + torch.einsum("bhgls,bhsd->bhgld", weights_seq, v.to(compute))
    out = out / denom
    return out.reshape(B, Hq, L, D).to(q.dtype), lse


def reference_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                               softmax_scale, dropout_p=0.0, attn_bias=None):
    """Canonical arguments (see ``fastpeft.ops.arguments``):

    q ``[B, Hq, L, D]``; k, v ``[B, Hkv, S, D]``; prefix_k, prefix_v ``[T, Hkv, P, D]``; prefix_index ``[B]``
    integer; prefix_lengths ``[T]`` integer; key_padding_mask ``[B, S]`` bool or None.
    ``dropout_p`` drops attention probabilities (after normalization, as eager attention does) for training
    models with attention dropout. ``attn_bias`` None or ``[1 or B, 1 or Hq, 1 or L, P + S]`` in q's dtype, added
    to the scaled scores over ``[prefix ; k]`` before masking. Returns ``[B, Hq, L, D]`` in q's dtype.
    """
    # Calls of this function bypass the dispatch of ``fastpeft.prefix_attention`` (which counts the calls it runs,
    # on the reference backend too, through ``reference_attention``): the integrations' attention-dropout path.
    observe.record_attention_call("reference")
    return reference_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                               softmax_scale, dropout_p, attn_bias)[0]
