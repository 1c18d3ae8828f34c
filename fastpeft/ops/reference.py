"""PyTorch reference implementation of prefix attention.

This is the CPU path and the fallback for cases the kernels do not cover. It is differentiable through
ordinary autograd and computes in float32 (float64 for float64 inputs). It never concatenates the prefix
with the sequence: the prefix scores and the sequence scores are two blocks that share one softmax
normalizer, as in the kernels. A shared prefix (T == 1) is read through broadcasting; a table is gathered
per row, which autograd turns into the per-entry sum of the rows' gradients. An additive score bias (``attn_bias``)
is added to both blocks before the masks, as FlashAttention's / xformers' ``attn_bias``; it is differentiable.
"""

import torch

from .. import observe


def visible_masks(B, L, S, P, device, prefix_index, prefix_lengths, key_padding_mask, causal):
    """Boolean visibility of the prefix entries ``[B, 1, P]`` and of the sequence keys ``[B, L, S]``.

    Query ``i`` sits at key position ``S - L + i`` (bottom-right alignment). With ``causal`` it sees keys
    ``j <= S - L + i``; keys whose ``key_padding_mask`` is 0 and prefix entries ``p >= prefix_lengths[t]``
    are invisible.
    """
    row_lengths = prefix_lengths.to(device=device, dtype=torch.long).index_select(0, prefix_index.long())
    prefix_visible = (torch.arange(P, device=device)[None, :] < row_lengths[:, None])[:, None, :]
    seq_visible = torch.ones(B, L, S, dtype=torch.bool, device=device)
    if causal:
        query_pos = torch.arange(L, device=device)[:, None] + (S - L)
        seq_visible = seq_visible & (torch.arange(S, device=device)[None, :] <= query_pos)[None]
    if key_padding_mask is not None:
        seq_visible = seq_visible & key_padding_mask.to(torch.bool)[:, None, :]
    return prefix_visible, seq_visible


def reference_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                               key_padding_mask, causal, softmax_scale, dropout_p=0.0, attn_bias=None):
    """Canonical arguments (see ``fastpeft.ops.prefix_attention._canonicalize`` and ``_canonical_bias``):

    q ``[B, Hq, L, D]``; k, v ``[B, Hkv, S, D]``; prefix_k, prefix_v ``[T, Hkv, P, D]``; prefix_index ``[B]``
    integer; prefix_lengths ``[T]`` integer; key_padding_mask ``[B, S]`` bool or None.
    ``dropout_p`` drops attention probabilities (after normalization, as eager attention does) for training
    models with attention dropout. ``attn_bias`` None or ``[1 or B, 1 or Hq, 1 or L, P + S]`` in q's dtype, added
    to the scaled scores over ``[prefix ; k]`` before masking. Returns ``[B, Hq, L, D]`` in q's dtype.
    """
    observe.record_attention_call("reference")
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    group = Hq // Hkv
    if S == 0:  # then L == 0 too: nothing to attend from (and no key axis to reduce over)
        return q.new_zeros(B, Hq, L, D)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    qg = q.to(compute).reshape(B, Hkv, group, L, D) * softmax_scale
    kc, vc = k.to(compute), v.to(compute)
    pk, pv = prefix_k.to(compute), prefix_v.to(compute)

    if T == 1:
        scores_prefix = torch.einsum("bhgld,hpd->bhglp", qg, pk[0])
    else:
        pk_rows = pk.index_select(0, prefix_index.long())
        pv = pv.index_select(0, prefix_index.long())
        scores_prefix = torch.einsum("bhgld,bhpd->bhglp", qg, pk_rows)
    scores_seq = torch.einsum("bhgld,bhsd->bhgls", qg, kc)
    if attn_bias is not None:
        # [Bb, Hb, Lb, P + S] -> [Bb, Hkv or 1, group or 1, Lb, P + S], broadcast against [B, Hkv, group, L, .]
        bias = attn_bias.to(compute)
        bias = bias.view(bias.shape[0], Hkv, group, *bias.shape[2:]) if bias.shape[1] == Hq else bias[:, :, None]
        scores_prefix = scores_prefix + bias[..., :P]
        scores_seq = scores_seq + bias[..., P:]

    prefix_visible, seq_visible = visible_masks(B, L, S, P, q.device, prefix_index, prefix_lengths,
                                                key_padding_mask, causal)
    neg_inf = torch.tensor(float("-inf"), dtype=compute, device=q.device)
    scores_prefix = torch.where(prefix_visible[:, None, None, :, :], scores_prefix, neg_inf)
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
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    if dropout_p:
        weights_prefix = torch.nn.functional.dropout(weights_prefix, dropout_p)
        weights_seq = torch.nn.functional.dropout(weights_seq, dropout_p)

    if T == 1:
        out = torch.einsum("bhglp,hpd->bhgld", weights_prefix, pv[0])
    else:
        out = torch.einsum("bhglp,bhpd->bhgld", weights_prefix, pv)
    out = out + torch.einsum("bhgls,bhsd->bhgld", weights_seq, vc)
    out = out / denom
    return out.reshape(B, Hq, L, D).to(q.dtype)
