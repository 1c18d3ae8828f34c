"""Device helpers shared by the training/prefill kernels (``forward``, ``backward``): which block a program owns,
where the causal diagonal cuts the key axis, key tiles and their masked scores."""

import triton
import triton.language as tl


@triton.jit
def query_block_program(Hq, group, BLOCK_M: tl.constexpr):
    """(row-head index ``b * Hq + h`` of the ``[B, Hq, L]`` lse/delta buffers, b as int64, query head h, kv head,
    first query m0) of a program of grid ``(cdiv(L, BLOCK_M), B * Hq)``.

    Under the causal mask later query blocks see more keys: program 0 takes the last block, so the longest
    programs start first and the tail is shorter.
    """
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    h = pid_bh % Hq
    return pid_bh, (pid_bh // Hq).to(tl.int64), h, h // group, pid_m * BLOCK_M


@triton.jit
def head_bases(k_ptr, v_ptr, row, h_kv, stride_k_row, stride_k_h, stride_v_row, stride_v_h):
    """(k, v) pointers to key 0 of kv head ``h_kv`` of ``row`` (a batch row of k/v or a prefix table entry)."""
    return k_ptr + row * stride_k_row + h_kv * stride_k_h, v_ptr + row * stride_v_row + h_kv * stride_v_h


@triton.jit
def sequence_block_bounds(S, L, m0, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(n_full, n_end) of the sequence keys for the query block starting at ``m0``.

    Key blocks before ``n_full`` are visible to every query of the block (and lie inside S); ``[n_full,
    n_end)`` are crossed by the causal diagonal or the end of S; keys from ``n_end`` on are never visible.
    """
    if CAUSAL:
        return ((S - L + m0 + 1) // BLOCK_N) * BLOCK_N, tl.minimum(S, S - L + m0 + BLOCK_M)
    else:
        return (S // BLOCK_N) * BLOCK_N, S


@triton.jit
def load_keys_transposed(base, offs_n, offs_d, d_valid, stride_n, stride_d, n_limit, ON_DIAGONAL: tl.constexpr):
    """Tile ``[BLOCK_D, BLOCK_N]`` of the rows ``offs_n`` of a K or V range, transposed for ``q @ k_t``.

    Only ``ON_DIAGONAL`` blocks can reach past the ``n_limit`` valid keys, so only they mask the key dimension.
    """
    if ON_DIAGONAL:
        mask = (offs_n < n_limit)[None, :] & d_valid[:, None]
    else:
        mask = d_valid[:, None]
    return tl.load(base + offs_n[None, :] * stride_n + offs_d[:, None] * stride_d, mask=mask, other=0.0)


@triton.jit
def masked_scores(s, offs_n, q_pos, n_limit, mask_base, stride_mask_n,
                  ON_DIAGONAL: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Scores ``s [BLOCK_M, BLOCK_N]`` with the invisible keys set to ``-inf``: on ``ON_DIAGONAL`` blocks the
    keys ``>= n_limit`` and (``CAUSAL``) those after each query's position ``q_pos``; with ``HAS_MASK`` the
    padding keys."""
    if ON_DIAGONAL:
        visible = (offs_n < n_limit)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    if HAS_MASK:
        key_real = tl.load(mask_base + offs_n * stride_mask_n, mask=offs_n < n_limit, other=0) != 0
        s = tl.where(key_real[None, :], s, float("-inf"))
    return s
