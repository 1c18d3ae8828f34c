"""First-principles float64 reference for prefix attention: gather each row's prefix, concatenate it in front
of the row's keys, build the full boolean mask, softmax, multiply. Deliberately the naive way, so that it
shares no code with the library's implementation."""

import torch


def concat_reference(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None,
                     key_padding_mask=None, causal=True, softmax_scale=None, attn_bias=None):
    """``attn_bias``: None or broadcastable to ``[B, Hq, L, P + S]``, added to the scores over ``[prefix ; k]``."""
    q, k, v = q.double(), k.double(), v.double()
    prefix_k, prefix_v = prefix_k.double(), prefix_v.double()
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
        prefix_index = torch.zeros(B, dtype=torch.long)
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    if prefix_lengths is None:
        prefix_lengths = torch.full((T,), P)
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    if attn_bias is not None:
        attn_bias = attn_bias.double().expand(B, Hq, L, P + S)
    outs = []
    for b in range(B):
        t = int(prefix_index[b])
        keys = torch.cat([prefix_k[t], k[b]], dim=1)        # [Hkv, P+S, D]
        values = torch.cat([prefix_v[t], v[b]], dim=1)
        keys = keys.repeat_interleave(Hq // Hkv, dim=0)      # [Hq, P+S, D]
        values = values.repeat_interleave(Hq // Hkv, dim=0)
        visible = torch.ones(L, P + S, dtype=torch.bool)
        visible[:, int(prefix_lengths[t]):P] = False
        if key_padding_mask is not None:
            visible[:, P:] &= key_padding_mask[b].bool().cpu()[None, :]
        if causal:
            for i in range(L):
                visible[i, P + S - L + i + 1:] = False
        visible = visible.to(q.device)
        scores = torch.einsum("hld,hsd->hls", q[b], keys) * scale
        if attn_bias is not None:   # -inf entries of the bias mask their keys
            hidden = torch.isneginf(attn_bias[b])
            scores = scores + attn_bias[b].masked_fill(hidden, 0.0)
            visible = visible & ~hidden
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        probs = torch.nan_to_num(probs, nan=0.0)             # a query that sees nothing -> zeros
        outs.append(torch.einsum("hls,hsd->hld", probs, values))
    return torch.stack(outs)


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    denom = expected.norm()
    if denom == 0:
        return float((actual - expected).norm())
    return float((actual - expected).norm() / denom)


def assert_close(actual, expected, rtol, name="tensor"):
    """Relative-norm check with a message that says where it failed and whether NaN/Inf disagree."""
    actual_d, expected_d = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual_d.shape == expected_d.shape, f"{name}: shape {tuple(actual_d.shape)} != {tuple(expected_d.shape)}"
    nan_a, nan_e = torch.isnan(actual_d), torch.isnan(expected_d)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN mismatch ({int(nan_a.sum())} vs {int(nan_e.sum())})"
    err = relative_error(torch.nan_to_num(actual_d), torch.nan_to_num(expected_d))
    if err >= rtol:
        diff = (actual_d - expected_d).abs()
        worst = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{name}: relative error {err:.3e} >= {rtol:.1e}; worst at {worst}: "
                             f"{float(actual_d[worst]):.6g} vs {float(expected_d[worst]):.6g}")
