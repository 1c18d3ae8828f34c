"""Reading the prefix table per row, and the adjoint of that read.

A call's prefix is a table ``prefix_k/prefix_v [T, Hkv, P, D]`` (a shared prefix is a table of one entry); row ``b``
reads entry ``prefix_index[b]`` in place, never copied per row for a shared prefix. The gradient of an entry is the
sum of the gradients of the rows that read it."""

import torch


def row_lengths(prefix_index, prefix_lengths):
    """``[B]``: the valid length of each row's table entry."""
    return prefix_lengths.index_select(0, prefix_index)


def gather_prefix(prefix, prefix_index, n):
    """The rows' first ``n`` entries of ``prefix [T, Hkv, P, D]``: ``[1, Hkv, n, D]`` for a shared prefix (a view, for
    the caller to broadcast), else one gather ``[B, Hkv, n, D]``."""
    prefix = prefix[:, :, :n]
    return prefix if prefix.shape[0] == 1 else prefix.index_select(0, prefix_index)


def sum_prefix_grads(rows, prefix, prefix_index, deterministic):
    """Per-row gradients of the first ``n`` entries ``[B, Hkv, n, D]`` -> the table's ``[T, Hkv, P, D]``, summed per
    entry in ``rows``' dtype (the caller's accumulation dtype; it casts). ``deterministic``: no atomics on a GPU
    (``index_add_`` accumulates with them there; on CPU it is deterministic)."""
    T, Hkv, P, D = prefix.shape
    n = rows.shape[2]
    if T == 1 and n == P:  # shared and whole: the batch sum is the gradient
        return rows.sum(0, keepdim=True)
    total = torch.zeros(T, Hkv, P, D, dtype=rows.dtype, device=rows.device)
    if T == 1:
        total[0, :, :n] = rows.sum(0)
    elif deterministic and rows.device.type != "cpu":
        onehot = (prefix_index[None, :] == torch.arange(T, device=rows.device)[:, None]).to(rows.dtype)
        total[:, :, :n] = (onehot @ rows.reshape(rows.shape[0], -1)).view(T, Hkv, n, D)
    else:
        total[:, :, :n].index_add_(0, prefix_index, rows)
    return total
