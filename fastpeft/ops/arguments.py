"""The canonical arguments of prefix attention, which every backend takes (``AttentionArgs``; ``PagedDecodeArgs`` for
decode over a paged KV cache), and the validation that brings a call's arguments to them (``canonicalize``,
``canonicalize_paged``): once, at the public boundary, before any kernel runs. The prefix table's rules (shapes, the
index and lengths) are written once, below, for both."""

import math
from typing import NamedTuple, Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACCEPTED_DTYPES = frozenset(SUPPORTED_DTYPES + (torch.float64,))  # float64: the reference and sdpa paths
MAX_HEAD_DIM = 256


class AttentionArgs(NamedTuple):
    """One call in canonical form (``canonicalize`` returns it; every backend's host functions take it)."""
    q: torch.Tensor                           # [B, Hq, L, D]
    k: torch.Tensor                           # [B, Hkv, S, D], S >= L
    v: torch.Tensor                           # [B, Hkv, S, D]
    prefix_k: torch.Tensor                    # [T, Hkv, P, D]: a table (a shared prefix is a table of one entry)
    prefix_v: torch.Tensor                    # [T, Hkv, P, D]
    prefix_index: torch.Tensor                # [B] int32: the table entry of each row
    prefix_lengths: torch.Tensor              # [T] int32: the valid length of each entry
    key_padding_mask: Optional[torch.Tensor]  # [B, S] bool (True = real key), or None
    attn_bias: Optional[torch.Tensor]         # [1|B, 1|Hq, 1|L, P + S] in q's dtype, or None
    causal: bool                              # bottom-right: query i sits at key position S - L + i
    softmax_scale: float
    deterministic: bool                       # the prefix gradients' reduction without atomics


class PagedDecodeArgs(NamedTuple):
    """One decode call over a paged KV cache in canonical form (``canonicalize_paged``). Row ``b``'s token ``j``
    (``j < seq_lens[b]``) lives in block ``block_table[b, j // block_size]`` at offset ``j % block_size``."""
    q: torch.Tensor                 # [B, Hq, 1, D]
    key_cache: torch.Tensor         # [num_blocks, Hkv, block_size, D]
    value_cache: torch.Tensor       # [num_blocks, Hkv, block_size, D]
    block_table: torch.Tensor       # [B, max_blocks] int32
    seq_lens: torch.Tensor          # [B] int32 in [0, max_blocks * block_size]: the row's tokens, the new one's too
    prefix_k: torch.Tensor          # [T, Hkv, P, D]
    prefix_v: torch.Tensor          # [T, Hkv, P, D]
    prefix_index: torch.Tensor      # [B] int32
    prefix_lengths: torch.Tensor    # [T] int32
    softmax_scale: float


def accumulation_dtype(dtype):
    """What the backends accumulate in, and the dtype of their log-sum-exp: float64 for float64 inputs (the
    reference and sdpa paths take them), float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tensor(name, t, ndim):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_integer(name, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be an integer torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def canonicalize(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None, key_padding_mask=None,
                 attn_bias=None, causal=True, softmax_scale=None, deterministic=False, check_values=True):
    """Validate every argument of ``fastpeft.prefix_attention`` and return the ``AttentionArgs`` the backends take.

    ``check_values=False`` skips the value checks of prefix_index / prefix_lengths (they synchronize with the
    device); only callers that validated them already (once per model forward) pass it. Under torch.compile the
    value checks are skipped too (they are data-dependent); the kernels clamp indices, so nothing is read out of
    bounds either way.
    """
    check_values = check_values and not torch.compiler.is_compiling()
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    B, Hq, L, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, S, D={D}] like q, got {tuple(k.shape)}")
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the kv heads of k ({Hkv})")
    if S < L:
        raise ValueError(f"k/v must hold at least the L={L} query positions (S >= L), got S={S}")
    if not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"head size D={D} is not supported (1..{MAX_HEAD_DIM})")

    prefix_k, prefix_v = _canonical_prefix(prefix_k, prefix_v, prefix_index, Hkv, D)
    _check_dtypes_and_devices(q, (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)))
    prefix_index, prefix_lengths = _canonical_table_reads(prefix_index, prefix_lengths, B, prefix_k, q.device,
                                                          check_values)

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise ValueError("key_padding_mask must be a torch.Tensor [B, S] or None")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise ValueError(f"key_padding_mask must be bool or integer 0/1, got {key_padding_mask.dtype}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        key_padding_mask = key_padding_mask.to(torch.bool)

    return AttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                         _canonical_bias(attn_bias, q, k, prefix_k), bool(causal), _canonical_scale(softmax_scale, D),
                         bool(deterministic))


def _canonical_prefix(prefix_k, prefix_v, prefix_index, Hkv, D):
    """The prefix as a table ``[T, Hkv, P, D]`` (a 3-D shared prefix becomes a table of one entry), its shapes checked
    against the call's ``Hkv`` and ``D``."""
    if not isinstance(prefix_k, torch.Tensor) or not isinstance(prefix_v, torch.Tensor):
        raise ValueError("prefix_k and prefix_v must be torch.Tensors")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} "
                         f"and {tuple(prefix_v.shape)}")
    if prefix_k.dim() == 3:
        if prefix_index is not None:
            raise ValueError("prefix_index is only for a 4-D prefix table [T, Hkv, P, D]; "
                             "a 3-D prefix_k [Hkv, P, D] is shared by every row")
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    elif prefix_k.dim() == 4:
        if prefix_index is None:
            raise ValueError("prefix_index [B] is required with a 4-D prefix table prefix_k [T, Hkv, P, D]")
    else:
        raise ValueError(f"prefix_k must be [Hkv, P, D] or [T, Hkv, P, D], got shape {tuple(prefix_k.shape)}")
    if prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
        raise ValueError(f"prefix_k must have Hkv={Hkv} heads and head size D={D} like k, "
                         f"got shape {tuple(prefix_k.shape)}")
    if prefix_k.shape[0] == 0:
        raise ValueError("the prefix table must hold at least one entry (T >= 1)")
    return prefix_k, prefix_v


def _check_dtypes_and_devices(q, named):
    """q's dtype is one the backends take, and every ``(name, tensor)`` of ``named`` shares q's dtype and device."""
    dtype, device = q.dtype, q.device
    if dtype not in _ACCEPTED_DTYPES:
        raise ValueError(f"q has dtype {dtype}; supported: float16, bfloat16, float32 (float64 on the reference path)")
    for name, t in named:
        if t.dtype != dtype:
            raise ValueError(f"all inputs must share one dtype: q is {dtype} but {name} is {t.dtype}")
        if t.device != device:
            raise ValueError(f"all inputs must be on one device: q is on {device} but {name} is on {t.device}")


def _canonical_table_reads(prefix_index, prefix_lengths, B, prefix_k, device, check_values):
    """``prefix_index [B]`` and ``prefix_lengths [T]`` as int32 (defaults: entry 0, length P), their values checked
    with ``check_values``: an index outside ``[0, T)`` is an IndexError, a length outside ``[0, P]`` a ValueError."""
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    if prefix_index is None:
        prefix_index = torch.zeros(B, dtype=torch.int32, device=device)
    else:
        _check_integer("prefix_index", prefix_index, (B,), device)
        if check_values and B > 0:
            lo, hi = (int(x) for x in torch.aminmax(prefix_index))
            if lo < 0 or hi >= T:
                raise IndexError(f"prefix_index values must lie in [0, T={T}), got min {lo}, max {hi}")
        prefix_index = prefix_index.to(torch.int32)

    if prefix_lengths is None:
        prefix_lengths = torch.full((T,), P, dtype=torch.int32, device=device)
    else:
        _check_integer("prefix_lengths", prefix_lengths, (T,), device)
        if check_values:
            lo, hi = (int(x) for x in torch.aminmax(prefix_lengths))
            if lo < 0 or hi > P:
                raise ValueError(f"prefix_lengths values must lie in [0, P={P}], got min {lo}, max {hi}")
        prefix_lengths = prefix_lengths.to(torch.int32)
    return prefix_index, prefix_lengths


def _canonical_scale(softmax_scale, D):
    if softmax_scale is None:
        return 1.0 / math.sqrt(D)
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return softmax_scale


def canonicalize_paged(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index=None,
                       prefix_lengths=None, softmax_scale=None, check_values=True):
    """Validate every argument of ``fastpeft.ops.paged_prefix_decode`` and return the ``PagedDecodeArgs`` the backends
    take. ``check_values=False`` (or tracing) skips the value checks of the integer tensors, which synchronize with
    the device: the caller vouches for them (the kernels clamp every index, so nothing is read out of bounds)."""
    check_values = check_values and not torch.compiler.is_compiling()
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        _check_tensor(name, t, 4)
    B, Hq, L, D = q.shape
    if L != 1:
        raise ValueError(f"q must be [B, Hq, 1, D]: paged decode takes one query per row, got L={L}")
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key_cache and value_cache must have the same shape, got {tuple(key_cache.shape)} and "
                         f"{tuple(value_cache.shape)}")
    num_blocks, Hkv, block_size = key_cache.shape[:3]
    if key_cache.shape[3] != D:
        raise ValueError(f"key_cache must be [num_blocks, Hkv, block_size, D={D}] like q, got "
                         f"{tuple(key_cache.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the kv heads of key_cache ({Hkv})")
    if num_blocks == 0 or block_size == 0:
        raise ValueError(f"key_cache must hold at least one block of at least one token, got {tuple(key_cache.shape)}")
    if not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"head size D={D} is not supported (1..{MAX_HEAD_DIM})")
    prefix_k, prefix_v = _canonical_prefix(prefix_k, prefix_v, prefix_index, Hkv, D)
    _check_dtypes_and_devices(q, (("key_cache", key_cache), ("value_cache", value_cache), ("prefix_k", prefix_k),
                                  ("prefix_v", prefix_v)))

    if not isinstance(block_table, torch.Tensor):
        raise ValueError(f"block_table must be an integer torch.Tensor [B, max_blocks], got "
                         f"{type(block_table).__name__}")
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.shape[1] == 0:
        raise ValueError(f"block_table must have shape [B={B}, max_blocks >= 1], got {tuple(block_table.shape)}")
    max_blocks = block_table.shape[1]
    _check_integer("block_table", block_table, (B, max_blocks), q.device)
    _check_integer("seq_lens", seq_lens, (B,), q.device)
    if check_values and B > 0:
        capacity = max_blocks * block_size
        lo, hi = (int(x) for x in torch.aminmax(seq_lens))
        if lo < 0 or hi > capacity:
            raise ValueError(f"seq_lens values must lie in [0, max_blocks * block_size = {max_blocks} * {block_size}],"
                             f" got min {lo}, max {hi}")
        used = torch.arange(max_blocks, device=q.device)[None, :] < (seq_lens[:, None] + block_size - 1) // block_size
        bad = used & ((block_table < 0) | (block_table >= num_blocks))
        if bool(bad.any()):
            row, column = (int(x) for x in bad.nonzero()[0])
            raise IndexError(f"block_table[{row}, {column}] = {int(block_table[row, column])} is outside the cache's "
                             f"[0, num_blocks={num_blocks}) and holds tokens of row {row} (seq_lens = "
                             f"{int(seq_lens[row])})")
    prefix_index, prefix_lengths = _canonical_table_reads(prefix_index, prefix_lengths, B, prefix_k, q.device,
                                                          check_values)
    return PagedDecodeArgs(q, key_cache, value_cache, block_table.to(torch.int32), seq_lens.to(torch.int32), prefix_k,
                           prefix_v, prefix_index, prefix_lengths, _canonical_scale(softmax_scale, D))


def _canonical_bias(attn_bias, q, k, prefix_k):
    """Validate ``attn_bias`` against the canonical q, k and prefix_k and return it 4-D,
    ``[1 or B, 1 or Hq, 1 or L, P + S]`` (a view), or None."""
    if attn_bias is None:
        return None
    if not isinstance(attn_bias, torch.Tensor):
        raise ValueError(f"attn_bias must be a torch.Tensor or None, got {type(attn_bias).__name__}")
    B, Hq, L, _ = q.shape
    S, P = k.shape[2], prefix_k.shape[2]
    if not attn_bias.dtype.is_floating_point:
        raise ValueError(f"attn_bias must be a floating-point additive bias (use key_padding_mask or -inf entries "
                         f"to mask), got {attn_bias.dtype}")
    if attn_bias.dtype != q.dtype:
        raise ValueError(f"all inputs must share one dtype: q is {q.dtype} but attn_bias is {attn_bias.dtype}")
    if attn_bias.device != q.device:
        raise ValueError(f"attn_bias is on {attn_bias.device} but q is on {q.device}")
    full = (B, Hq, L, P + S)
    if attn_bias.dim() > 4:
        raise ValueError(f"attn_bias must be broadcastable to [B, Hq, L, P + S] = {list(full)}, "
                         f"got shape {tuple(attn_bias.shape)}")
    bias = attn_bias[(None,) * (4 - attn_bias.dim())]
    if bias.shape[3] != P + S or any(n not in (1, want) for n, want in zip(bias.shape[:3], full[:3])):
        raise ValueError(f"attn_bias must be broadcastable to [B, Hq, L, P + S] = {list(full)} with exactly "
                         f"P + S = {P} + {S} columns (the prefix entries, then the keys), got shape "
                         f"{tuple(attn_bias.shape)}")
    return bias
