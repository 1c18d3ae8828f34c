"""Which keys a query of prefix attention sees (SPEC section 1), written once, as boolean masks, and their additive
form (0 where visible, -inf elsewhere) for the fused attention ops and the matmul paths.

* Row ``b`` reads table entry ``prefix_index[b]`` and sees its first ``prefix_lengths[entry]`` entries (ragged).
* Query ``i`` of ``L`` sits at key position ``S - L + i`` (bottom-right alignment, as FlashAttention with a KV cache);
  causal, it sees the keys ``j <= S - L + i``.
* Keys whose ``key_padding_mask`` is False are invisible.

(The Triton kernels and the C++ CPU extension apply the same rules inside their loops.)"""

import torch

from .prefix_table import row_lengths

NEG_INF = float("-inf")


def prefix_visible(prefix_index, prefix_lengths, n):
    """Bool ``[B, n]``: entry ``p < n`` of row ``b``'s table entry is visible."""
    return torch.arange(n, device=prefix_index.device)[None, :] < row_lengths(prefix_index, prefix_lengths)[:, None]


def causal_visible(L, S, device):
    """Bool ``[L, S]``: query ``i`` sees key ``j`` under the causal mask (``j <= S - L + i``)."""
    return torch.arange(S, device=device)[None, :] <= torch.arange(L, device=device)[:, None] + (S - L)


def additive(visible, dtype):
    """A boolean mask as an additive one of ``dtype``, same shape: 0 where visible, -inf elsewhere."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, NEG_INF)
