"""PyTorch's own low-precision attention over ``[prefix ; k]``: the error baseline of the kernels' fp16/bf16
tests (a kernel may be at most a small multiple of this far from float64)."""

import torch


def torch_lowp_attention(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None,
                         key_padding_mask=None, causal=True, softmax_scale=None):
    """Attention over ``[prefix ; k]`` computed by PyTorch entirely in the inputs' dtype (the error baseline)."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
        prefix_index = torch.zeros(B, dtype=torch.long, device=q.device)
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    if prefix_lengths is None:
        prefix_lengths = torch.full((T,), P, device=q.device)
    rows = prefix_index.long()
    keys = torch.cat([prefix_k[rows], k], dim=2).repeat_interleave(Hq // Hkv, dim=1)     # [B, Hq, P+S, D]
    values = torch.cat([prefix_v[rows], v], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    prefix_visible = torch.arange(P, device=q.device)[None, :] < prefix_lengths.long()[rows][:, None]  # [B, P]
    seq_visible = torch.ones(B, L, S, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        seq_visible &= key_padding_mask.bool()[:, None, :]
    if causal:
        query_pos = torch.arange(L, device=q.device)[:, None] + S - L
        seq_visible &= torch.arange(S, device=q.device)[None, :] <= query_pos
    visible = torch.cat([prefix_visible[:, None, :].expand(B, L, P), seq_visible], dim=2)[:, None]
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    scores = (q @ keys.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(probs, nan=0.0) @ values
