"""The ``sdpa`` backend of ``fastpeft.prefix_attention``: PyTorch's fused attention ops, one call per part of the
key axis, merged by their log-sum-exp.

Attention over ``[prefix ; k]`` is split into parts that each fused call can express exactly, then merged
(the way PyTorch's context-parallel ring attention merges its shards)::

    (o_p, lse_p) = fused_attention(q, keys_p, values_p)          for every part p
    lse = logsumexp_p(lse_p);   out = sum_p o_p * exp(lse_p - lse)

The parts (``_plan``):

* prefix: q against the row's prefix entries (``prefix_k[prefix_index[b]]``), no causal structure. The query
  group of grouped-query attention is folded into the query axis (``[B, Hkv, group * L, D]``), so no kv head is
  repeated. A shared prefix is broadcast over the batch (stride 0), a table gathered once; ragged
  ``prefix_lengths`` become a ``[B, 1, 1, P]`` additive mask (on CPU, where reading the lengths costs nothing,
  the prefix is cut to the longest row and the mask dropped when every row has that length). On CPU a prefix of
  at most ``CPU_MATMUL_PREFIX`` entries runs as two matmuls (``sdpa_short_attention.block_attend``) instead of a
  fused call, whose fixed cost per query block dominates there.
* keys: q against the row's own keys. Non-causal (or one query per row, which sees every key): one folded
  call. Causal with ``S == L``: one call with the op's own causal flag (top-left aligned, which is
  bottom-right when ``S == L``), whose kernel skips the blocks above the diagonal. Causal with a cache
  (``S > L``): the ``S - L`` cached keys, which every query sees, as one folded non-causal call, and the last
  ``L`` keys as a causal call with ``S == L``. ``key_padding_mask`` becomes a ``[B, 1, 1, S]`` additive mask
  (dropped on CPU when it is all ones).

On CPU, causal queries of moderate length (256 < L <= 768) are processed in chunks of at most ``CPU_CAUSAL_CHUNK``
(each chunk the same problem over the keys up to its last query), because PyTorch's CPU kernel skips causal work
only in whole 512-key blocks.

A query that sees no key of a part gets ``lse_p = -inf`` here (the ops return a finite value for it), so it
contributes nothing; a query that sees nothing at all gets ``lse = -inf`` and output zeros.

Backward: each part's backward op, given the MERGED ``out`` and ``lse``, returns exactly that part's gradients
(its probabilities are ``exp(s - lse)`` and the softmax correction ``rowsum(dout * out)`` is the merged one);
``dq`` is the sum over the parts, the prefix gradients are summed per table entry (``index_add`` over
``prefix_index``; a one-hot matmul when ``deterministic`` on a GPU), and the keys' gradients are the
concatenation of their parts'. For queries that see nothing the backward is given ``lse = +inf``, so every
probability is ``exp(-inf) = 0`` and their gradients are zeros, never NaN.

On CPU a problem whose whole score matrix is small (``sdpa_short_attention.use_short_path``) skips the split in
eager mode: ``sdpa_short_attention`` computes the two score blocks with matmuls and one softmax across them, and
its backward reuses the forward's probabilities.

Layers: the private aten ops live behind ``_sdpa_ops``; this module plans the parts, runs and merges them
(``sdpa_prefix_attention_fwd``/``_bwd``), registers them as the custom ops ``fastpeft::sdpa_prefix_attention_fwd``
/ ``_bwd`` (fake implementations and autograd, so ``torch.compile`` traces them), and ``sdpa_prefix_attention``
is what the dispatcher in ``fastpeft.ops.prefix_attention`` calls with canonical arguments.
"""

from typing import NamedTuple, Optional, Tuple

import torch

from . import _sdpa_ops
from ._autograd import register_prefix_attention_autograd
from .sdpa_short_attention import (block_attend, block_attend_backward, compiled_short_attention, compiled_short_ops,
                                   short_backward, short_forward, use_short_path)

_NEG_INF = float("-inf")


def unavailable_reason(device, dtype):
    """None when the sdpa backend runs tensors of this device and dtype, else why not (one sentence)."""
    return _sdpa_ops.unavailable_reason(device.type, dtype)


class _Part(NamedTuple):
    """One fused attention call of the split."""
    kind: str                       # "prefix" or "keys"
    k: torch.Tensor                 # [B, Hkv, n, D]
    v: torch.Tensor
    bias: Optional[torch.Tensor]    # additive mask [B, 1, 1, n] in q's dtype, or None
    causal: bool                    # the op's top-left causal flag (only with n == L)
    folded: bool                    # query group folded into the query axis: q as [B, Hkv, group * L, D]
    blind: Optional[torch.Tensor]   # bool, broadcastable to [B, Hq, L]: queries that see no key of this part
    start: int                      # keys: the part covers k[:, :, start:start + n]; prefix: 0
    matmuls: bool = False           # run by sdpa_short_attention.block_attend, not by the fused op


def _additive_mask(visible, dtype):
    """Bool ``[B, n]`` (True = visible) -> additive mask ``[B, 1, 1, n]`` of ``dtype`` (0 or -inf)."""
    mask = torch.zeros(visible.shape[0], 1, 1, visible.shape[1], dtype=dtype, device=visible.device)
    return mask.masked_fill_(~visible[:, None, None, :], _NEG_INF)


class _Host(NamedTuple):
    """The plan's data-dependent choices, read once per call on CPU (where reading tensors costs no device sync) and
    handed from the forward to the backward, which then plans without reading them again."""
    prefix_n: int       # prefix entries attended: the longest row's valid length (P off the CPU)
    ragged: bool        # some row's valid length is below prefix_n: the prefix part needs a mask
    padded: bool        # key_padding_mask holds a padding key (False: every key is real, the mask is dropped)


def _host_plan(q, prefix_k, prefix_index, prefix_lengths, key_padding_mask):
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    if q.device.type != "cpu":  # on an accelerator these reads would synchronize: always mask
        return _Host(P, True, key_padding_mask is not None)
    n, ragged = 0, False
    if P > 0 and T == 1:  # shared: every row has the one entry's length
        n = min(int(prefix_lengths[0]), P)  # (unchecked lengths, under torch.compile, may exceed P)
    elif P > 0:  # cut the prefix to the longest row, mask only when rows differ
        row_lengths = prefix_lengths.index_select(0, prefix_index)  # [B]
        if row_lengths.numel():
            n = min(int(row_lengths.max()), P)
            ragged = bool((row_lengths < n).any())
    padded = key_padding_mask is not None and not bool(key_padding_mask.all())
    return _Host(n, ragged, padded)


# On CPU a short prefix part runs as matmuls (sdpa_short_attention.block_attend) instead of a fused call, whose fixed
# cost per query block dominates there: at most CPU_MATMUL_PREFIX[0] entries, and folded queries x head size
# (group * L * D) at most CPU_MATMUL_PREFIX[1], beyond which the backward's [n, group * L] @ [group * L, D] products
# lose. Measured per part on the 2-core CPU, one thread, fp32, B=2, Hq=8, Hkv=2, P=8 (fused / matmuls, fwd + bwd,
# ms): L=256 D=32 0.95 / 0.51; L=2048 D=32 8.4 / 4.2; L=512 D=64 5.2 / 1.6; L=512 D=128 7.8 / 5.4; but L=2048 D=64
# 13.7 / 15.4; P=16 (L=512, D=32) 2.26 / 2.17, no gain.
CPU_MATMUL_PREFIX = (8, 2048 * 128)


def _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_lengths, host):
    B, _, _, D = q.shape
    T, Hkv = prefix_k.shape[:2]
    n = host.prefix_n
    if n == 0:
        return None
    if T == 1:   # shared: broadcast over the batch, never copied per row
        pk = prefix_k[:, :, :n].expand(B, Hkv, n, D)
        pv = prefix_v[:, :, :n].expand(B, Hkv, n, D)
    else:        # a table: one gather of the rows' entries
        pk = prefix_k[:, :, :n].index_select(0, prefix_index)
        pv = prefix_v[:, :, :n].index_select(0, prefix_index)
    bias = blind = None
    if host.ragged:
        row_lengths = prefix_lengths.index_select(0, prefix_index)
        bias = _additive_mask(torch.arange(n, device=q.device)[None, :] < row_lengths[:, None], q.dtype)
        blind = (row_lengths == 0)[:, None, None]
    matmuls = (q.device.type == "cpu" and n <= CPU_MATMUL_PREFIX[0]
               and q.shape[1] // Hkv * q.shape[2] * D <= CPU_MATMUL_PREFIX[1])
    return _Part("prefix", pk, pv, bias, False, True, blind, 0, matmuls)


def _keys_part(q, k, v, key_padding_mask, start, stop, causal):
    ks, vs = k[:, :, start:stop], v[:, :, start:stop]
    if key_padding_mask is None:
        return _Part("keys", ks, vs, None, causal, not causal, None, start)
    visible = key_padding_mask[:, start:stop]
    if causal:   # query i sees keys start..start+i of this part
        blind = (visible.cumsum(1) == 0)[:, None, :]
    else:
        blind = (~visible.any(1))[:, None, None]
    return _Part("keys", ks, vs, _additive_mask(visible, q.dtype), causal, not causal, blind, start)


def _plan(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, host=None):
    """The fused calls whose merge is the attention over ``[prefix ; k]`` (see the module docstring); ``host``:
    the ``_host_plan`` of these inputs (or of the whole problem this one is a chunk of), read here when None."""
    L, S = q.shape[2], k.shape[2]
    if host is None:
        host = _host_plan(q, prefix_k, prefix_index, prefix_lengths, key_padding_mask)
    parts = []
    part = _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_lengths, host)
    if part is not None:
        parts.append(part)
    if not host.padded:
        key_padding_mask = None
    if causal and 1 < L < S:    # a cache precedes the queries: every query sees the cached keys
        parts.append(_keys_part(q, k, v, key_padding_mask, 0, S - L, causal=False))
        parts.append(_keys_part(q, k, v, key_padding_mask, S - L, S, causal=True))
    elif causal and L == S and L > 1:
        parts.append(_keys_part(q, k, v, key_padding_mask, 0, S, causal=True))
    else:                       # non-causal, or one query per row (it sits at the last key and sees them all)
        parts.append(_keys_part(q, k, v, key_padding_mask, 0, S, causal=False))
    return parts


def _accumulation_dtype(dtype):
    """float32 for float16/bfloat16/float32 inputs (as the ops' own lse), float64 for float64 ones."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_part(x, part, Hkv):
    """``[B, Hq, L, ...]`` -> the part's query layout (``[B, Hkv, group * L, ...]`` when folded); a view."""
    return x.view(x.shape[0], Hkv, -1, *x.shape[3:]) if part.folded else x


# PyTorch's CPU kernel skips causal work only in whole key blocks of 512 (none at all for L <= 512), so on CPU
# the queries of a causal call of moderate length are processed in chunks of at most CPU_CAUSAL_CHUNK: each chunk
# is a smaller instance of the same problem (bottom-right aligned over the keys up to its last query), so only a
# chunk-wide band above the diagonal is computed and masked. Measured on a 2-core CPU (B=2, Hq=8, Hkv=2, D=64,
# P=128, L=512, one thread, PEFT / sdpa interleaved under a load average of 9 from other sessions, so the times are
# inflated but comparable, forward+backward): fp32 339.9 ms whole, 288.2 ms in chunks of
# 256 queries, 281.7 ms in chunks of 128; bf16 299.8 ms whole, 282.4 ms (256), 371.0 ms (128: the bf16 backward
# op's fixed cost per call dominates). L = 256 gains nothing; from L = 1024 on the kernel's own block skipping
# does as well as more, smaller calls (20.2 ms whole vs 21.2 ms in 256-query chunks), so those run whole.
CPU_CAUSAL_CHUNK = 256
CPU_CHUNKED_LENGTHS = (256, 768)   # chunk when lo < L <= hi


def _query_chunks(q, causal):
    """``[(start, stop), ...]`` ranges of the query axis that are run as separate sub-problems."""
    L = q.shape[2]
    lo, hi = CPU_CHUNKED_LENGTHS
    if not causal or q.device.type != "cpu" or not lo < L <= hi:
        return [(0, L)]
    count = -(-L // CPU_CAUSAL_CHUNK)
    size = -(-L // count)
    return [(start, min(start + size, L)) for start in range(0, L, size)]


def _chunk(L, S, key_padding_mask, start, stop):
    """The keys (``:end``) and key padding mask of the sub-problem of queries ``start:stop``."""
    end = S - L + stop
    return end, (key_padding_mask[:, :end] if key_padding_mask is not None else None)


def sdpa_prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                              softmax_scale, host=None):
    """Canonical arguments -> ``(out [B, Hq, L, D] in q's dtype, lse [B, Hq, L] float32, float64 for float64
    inputs)``; ``lse = -inf`` for a query that sees no key (its output is zeros). ``host``: ``_host_plan`` of
    these inputs when the caller has it."""
    B, Hq, L, _ = q.shape
    if q.numel() == 0:
        return q.new_zeros(q.shape), q.new_zeros(B, Hq, L, dtype=_accumulation_dtype(q.dtype))
    if host is None:
        host = _host_plan(q, prefix_k, prefix_index, prefix_lengths, key_padding_mask)
    chunks = _query_chunks(q, causal)
    if len(chunks) == 1:
        return _forward_rows(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                             softmax_scale, host)
    S = k.shape[2]
    outs, lses = [], []
    for start, stop in chunks:
        end, mask = _chunk(L, S, key_padding_mask, start, stop)
        out, lse = _forward_rows(q[:, :, start:stop], k[:, :, :end], v[:, :, :end], prefix_k, prefix_v,
                                 prefix_index, prefix_lengths, mask, causal, softmax_scale, host)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _forward_rows(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                  softmax_scale, host):
    """The forward of one sub-problem: plan its parts, run them, merge them.

    Every part's out and lse are viewed as ``[B, Hkv, group, L, ...]``, a free view of both the folded and the
    per-head layouts (a folded output reshaped to ``[B, Hq, L, D]`` would be a copy)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    acc = _accumulation_dtype(q.dtype)
    q = q.contiguous()
    outs, lses, blind = [], [], False
    for part in _plan(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, host):
        if part.matmuls:
            out, lse = block_attend(_as_part(q, part, Hkv), part.k, part.v, part.bias, softmax_scale)
        else:
            out, lse = _sdpa_ops.attend(_as_part(q, part, Hkv), part.k, part.v, part.bias, part.causal,
                                        softmax_scale)
        out, lse = out.view(B, Hkv, group, L, D), lse.view(B, Hkv, group, L).to(acc)
        if part.blind is not None:
            lse = lse.masked_fill(part.blind.unsqueeze(1), _NEG_INF)
            blind = True
        outs.append(out)
        lses.append(lse)
    if len(outs) == 2 and not blind:
        out, lse = _merge_two(outs, lses, q.dtype, acc)
    else:
        out, lse = _merge(outs, lses, q.dtype, acc)
    return out.reshape(B, Hq, L, D), lse.reshape(B, Hq, L)


def _merge(outs, lses, dtype, acc):
    """``out = sum_p o_p * exp(lse_p - lse)`` with ``lse = logsumexp_p lse_p``, in ``acc`` (float32/64)."""
    lse = lses[0]
    for part_lse in lses[1:]:
        lse = torch.logaddexp(lse, part_lse)   # -inf with -inf gives -inf
    safe = lse.masked_fill(lse == _NEG_INF, float("inf"))  # blind queries: every weight exp(-inf) = 0
    merged = None
    for out, part_lse in zip(outs, lses):
        weight = torch.exp(part_lse - safe).unsqueeze(-1)
        if merged is None:
            merged = out.to(acc) * weight
        else:
            merged.addcmul_(out.to(acc), weight)
    return merged.to(dtype), lse


def _merge_two(outs, lses, dtype, acc):
    """``_merge`` of two parts none of whose queries is blind (finite lse): part 0's weight is
    ``sigmoid(lse_0 - lse_1)`` and the merge is one ``lerp`` into part 1's output (the op's own buffer, in its
    layout), 4 elementwise ops instead of 8."""
    lse = torch.logaddexp(lses[0], lses[1])
    weight = torch.sigmoid(lses[0] - lses[1]).unsqueeze(-1)
    merged = outs[1].to(acc)
    merged.lerp_(outs[0].to(acc), weight)
    return merged.to(dtype), lse


def sdpa_prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                              out, lse, causal, softmax_scale, deterministic, host=None):
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` from the merged ``out``/``lse`` of the forward; the prefix
    gradients ``[T, Hkv, P, D]`` are summed over the rows that use each entry. ``host``: the forward's
    ``_host_plan`` when the caller kept it."""
    if q.numel() == 0:
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(prefix_k),
                torch.zeros_like(prefix_v))
    if host is None:
        host = _host_plan(q, prefix_k, prefix_index, prefix_lengths, key_padding_mask)
    lse = lse.masked_fill(lse == _NEG_INF, float("inf"))  # blind queries: every probability exp(-inf) = 0
    chunks = _query_chunks(q, causal)
    L, S = q.shape[2], k.shape[2]
    acc = _accumulation_dtype(q.dtype)
    dqs, dk, dv, dprefix = [], None, None, None
    for start, stop in chunks:
        end, mask = _chunk(L, S, key_padding_mask, start, stop)
        rows = slice(start, stop)
        dq_c, dk_c, dv_c, dprefix_c = _backward_rows(
            dout[:, :, rows], q[:, :, rows], k[:, :, :end], v[:, :, :end], prefix_k, prefix_v, prefix_index,
            prefix_lengths, mask, out[:, :, rows], lse[:, :, rows], causal, softmax_scale, deterministic, host)
        dqs.append(dq_c)
        if len(chunks) == 1:
            dk, dv = dk_c, dv_c
        else:
            if dk is None:
                dk, dv = k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc)
            dk[:, :, :end] += dk_c
            dv[:, :, :end] += dv_c
        if dprefix_c is not None:
            dprefix = dprefix_c if dprefix is None else (dprefix[0] + dprefix_c[0], dprefix[1] + dprefix_c[1])
    dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, dim=2)
    if dprefix is None:  # no prefix entry visible to any row
        dprefix = (torch.zeros_like(prefix_k), torch.zeros_like(prefix_v))
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dprefix[0].to(prefix_k.dtype),
            dprefix[1].to(prefix_v.dtype))


def _backward_rows(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, out, lse,
                   causal, softmax_scale, deterministic, host):
    """The backward of one sub-problem: ``(dq in float32/64, dk, dv, (dprefix_k, dprefix_v) in float32/64 or
    None when no row sees a prefix entry)``."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    q, dout, out, lse = q.contiguous(), dout.contiguous(), out.contiguous(), lse.contiguous()
    dq = None
    dprefix = None
    key_grads = []
    for part in _plan(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, host):
        attend_backward = block_attend_backward if part.matmuls else _sdpa_ops.attend_backward
        dq_p, dk_p, dv_p = attend_backward(
            _as_part(dout, part, Hkv), _as_part(q, part, Hkv), part.k, part.v, part.bias,
            _as_part(out, part, Hkv), _as_part(lse, part, Hkv), *(() if part.matmuls else (part.causal,)),
            softmax_scale)
        dq_p = dq_p.reshape(B, Hq, L, D)
        dq = dq_p.to(_accumulation_dtype(q.dtype)) if dq is None else dq.add_(dq_p)
        if part.kind == "prefix":
            dprefix = (_reduce_prefix(dk_p, prefix_k, prefix_index, deterministic),
                       _reduce_prefix(dv_p, prefix_v, prefix_index, deterministic))
        else:
            key_grads.append((dk_p, dv_p))
    if len(key_grads) == 1:
        dk, dv = key_grads[0]
    else:
        dk = torch.cat([g[0] for g in key_grads], dim=2)
        dv = torch.cat([g[1] for g in key_grads], dim=2)
    return dq, dk, dv, dprefix


def _reduce_prefix(rows, prefix, prefix_index, deterministic):
    """Per-row prefix gradients ``[B, Hkv, n, D]`` -> ``[T, Hkv, P, D]``, summed per table entry in float32
    (float64 for float64 inputs; the caller casts)."""
    T, Hkv, P, D = prefix.shape
    n = rows.shape[2]
    acc = _accumulation_dtype(prefix.dtype)
    rows = rows.to(acc)
    if T == 1 and n == P:  # shared and whole: the batch sum is the gradient
        return rows.sum(0, keepdim=True)
    total = torch.zeros(T, Hkv, P, D, dtype=acc, device=prefix.device)
    if T == 1:
        total[0, :, :n] = rows.sum(0)
    elif deterministic and prefix.device.type != "cpu":  # index_add_ accumulates with atomics on GPUs
        onehot = (prefix_index[None, :] == torch.arange(T, device=prefix.device)[:, None]).to(acc)
        total[:, :, :n] = (onehot @ rows.reshape(rows.shape[0], -1)).view(T, Hkv, n, D)
    else:
        total[:, :, :n].index_add_(0, prefix_index, rows)
    return total


# The forward and backward as torch custom ops: torch.compile traces them through the fake implementations
# (the data-dependent planning above runs only in the real ones), and autograd reaches the backward.
@torch.library.custom_op("fastpeft::sdpa_prefix_attention_fwd", mutates_args=())
def _sdpa_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                 prefix_index: torch.Tensor, prefix_lengths: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 causal: bool, softmax_scale: float, deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Canonical arguments -> (out, lse). ``deterministic`` is not used by the forward; it is an input so that
    the backward can read it."""
    return sdpa_prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                     causal, softmax_scale)


@_sdpa_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale,
      deterministic):
    B, Hq, L, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, L), dtype=_accumulation_dtype(q.dtype))


@torch.library.custom_op("fastpeft::sdpa_prefix_attention_bwd", mutates_args=())
def _sdpa_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                 prefix_v: torch.Tensor, prefix_index: torch.Tensor, prefix_lengths: torch.Tensor,
                 key_padding_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, causal: bool,
                 softmax_scale: float, deterministic: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor]:
    return sdpa_prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                     key_padding_mask, out, lse, causal, softmax_scale, deterministic)


@_sdpa_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, out, lse, causal,
      softmax_scale, deterministic):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(prefix_k),
            torch.empty_like(prefix_v))


register_prefix_attention_autograd(_sdpa_fwd_op, _sdpa_bwd_op)


class _SdpaPrefixAttention(torch.autograd.Function):
    """The eager path: the same forward and backward as the custom ops, without their dispatch (a custom op with
    autograd costs about 0.4 ms per forward+backward on CPU, as much as the attention itself at small shapes), and
    with the forward's ``_host_plan`` kept for the backward (the custom ops' backward reads it again)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                softmax_scale, deterministic, host):
        out, lse = sdpa_prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                             key_padding_mask, causal, softmax_scale, host)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, out,
                              lse)
        ctx.causal, ctx.softmax_scale, ctx.deterministic, ctx.host = causal, softmax_scale, deterministic, host
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, out, lse = ctx.saved_tensors
        grads = sdpa_prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths,
                                          key_padding_mask, out, lse, ctx.causal, ctx.softmax_scale,
                                          ctx.deterministic, ctx.host)
        return grads + (None,) * 7


class _ShortPrefixAttention(torch.autograd.Function):
    """The eager short-sequence path in Python (``sdpa_short_attention``), where the C++ build is missing: the forward
    keeps the blocks' probabilities, the backward reuses them."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                softmax_scale, deterministic, host):
        out, saved = short_forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                                   causal, softmax_scale, host, keep_for_backward=True)
        ctx.save_for_backward(prefix_k, prefix_v, prefix_index, *saved)
        ctx.softmax_scale, ctx.deterministic = softmax_scale, deterministic
        return out

    @staticmethod
    def backward(ctx, dout):
        prefix_k, prefix_v, prefix_index, *saved = ctx.saved_tensors
        dq, dk, dv, dprefix = short_backward(dout, saved, ctx.softmax_scale)
        if dprefix is None:  # no prefix entry visible to any row
            dprefix_k, dprefix_v = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        else:
            dprefix_k = _reduce_prefix(dprefix[0], prefix_k, prefix_index, ctx.deterministic).to(prefix_k.dtype)
            dprefix_v = _reduce_prefix(dprefix[1], prefix_v, prefix_index, ctx.deterministic).to(prefix_v.dtype)
        dtype = dout.dtype  # one dtype for every input (canonical arguments)
        return (dq.to(dtype), dk.to(dtype), dv.to(dtype), dprefix_k, dprefix_v) + (None,) * 7


def sdpa_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                          softmax_scale, deterministic=False, host=None):
    """Canonical arguments (see ``fastpeft.ops.prefix_attention._canonicalize``) -> out ``[B, Hq, L, D]``.

    Under torch.compile: the custom ops (traced through their fake implementations). Eager: the same functions
    directly, through an ``autograd.Function`` only when a gradient is needed (inference saves nothing), or, for a
    small score matrix on CPU (``sdpa_short_attention.use_short_path``), the short-sequence path (the C++ op
    ``fastpeft::short_prefix_attention``, with its own autograd, where ``fastpeft._cpu`` is built). ``host``: this
    call's ``_host_plan`` where the caller has it already (planned once per forward), else computed here."""
    args = (q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale)
    if torch.compiler.is_compiling():
        return _sdpa_fwd_op(*args, deterministic)[0]
    # Empty queries have nothing to plan: the split's functions return empty outputs and zero gradients.
    if host is None and q.numel():
        host = _host_plan(q, prefix_k, prefix_index, prefix_lengths, key_padding_mask)
    short = host is not None and use_short_path(q, k, host)
    ops = compiled_short_ops() if short else None
    if ops is not None:  # the C++ op records its own backward
        return compiled_short_attention(ops, *args, host)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v)):
        function = _ShortPrefixAttention if short else _SdpaPrefixAttention
        return function.apply(*args, deterministic, host)
    if short:
        return short_forward(*args, host, keep_for_backward=False)[0]
    return sdpa_prefix_attention_fwd(*args, host)[0]
