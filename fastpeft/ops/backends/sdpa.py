"""The ``sdpa`` backend of ``fastpeft.prefix_attention``: PyTorch's fused attention ops, one call per part of the
key axis, merged by their log-sum-exp (any device whose torch has the ops; the default on CPU).

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
  at most ``CPU_MATMUL_PREFIX`` entries runs as two matmuls (``sdpa_short.block_attend``) instead of a fused call,
  whose fixed cost per query block dominates there.
* keys: q against the row's own keys. Non-causal (or one query per row, which sees every key): one folded
  call. Causal with ``S == L``: one call with the op's own causal flag (top-left aligned, which is
  bottom-right when ``S == L``), whose kernel skips the blocks above the diagonal. Causal with a cache
  (``S > L``): the ``S - L`` cached keys, which every query sees, as one folded non-causal call, and the last
  ``L`` keys as a causal call with ``S == L``. ``key_padding_mask`` becomes a ``[B, 1, 1, S]`` additive mask
  (dropped on CPU when it is all ones).

With an additive score bias (``attn_bias``) each part's fused call takes the part's columns of the bias (the prefix
part columns ``0 .. n-1``, a keys part its keys' columns after the ``P`` prefix columns) as its float mask, with the
part's own masks folded in as ``-inf``, written once, contiguous, in the broadcast shape of the bias and the masks
(``[B, Hq, L, n]`` where padding meets a per-head bias, as transformers' own sdpa path builds it): the fused CPU ops
would copy any other layout in every call. The query group is then not folded (the bias differs per query head); the
CPU op reads grouped kv heads natively, the CUDA path repeats them (``aten_attention``). A bias may hold ``-inf``
itself, so which queries see no key of a part is read from the part's mask unless, on CPU, the bias has no ``-inf``.

On CPU, causal queries of moderate length (256 < L <= 768) without a bias are processed in chunks of at most
``CPU_CAUSAL_CHUNK`` (each chunk the same problem over the keys up to its last query), because PyTorch's CPU kernel
skips causal work only in whole 512-key blocks.

A query that sees no key of a part gets ``lse_p = -inf`` here (the ops return a finite value for it), so it
contributes nothing; a query that sees nothing at all gets ``lse = -inf`` and output zeros.

Backward: each part's backward op, given the MERGED ``out`` and ``lse``, returns exactly that part's gradients
(its probabilities are ``exp(s - lse)`` and the softmax correction ``rowsum(dout * out)`` is the merged one);
``dq`` is the sum over the parts, the prefix gradients are summed per table entry (``index_add`` over
``prefix_index``; a one-hot matmul when ``deterministic`` on a GPU), and the keys' gradients are the
concatenation of their parts'. For queries that see nothing the backward is given ``lse = +inf``, so every
probability is ``exp(-inf) = 0`` and their gradients are zeros, never NaN. The fused backward ops give no bias
gradient: when ``attn_bias`` requires grad it is computed here per part from the merged ``lse``,
``dbias = p * (dout @ v^T - rowsum(dout * out))`` with ``p = exp(scale * q @ k^T + mask - lse)``, summed over the
axes the bias broadcasts over (this materializes ``[B, Hq, L, n]`` float32 per part, as eager attention does).

On CPU a problem whose whole score matrix is small (``sdpa_short.use_short_path``) skips the split:
``sdpa_short`` computes the two score blocks with matmuls and one softmax across them, and its backward reuses the
forward's probabilities when it is handed them (eager mode; the custom ops under torch.compile keep none, and run the
split's backward from the short path's log-sum-exp).
"""

from typing import NamedTuple, Optional

import torch

from ..arguments import accumulation_dtype
from ..masks import NEG_INF, additive, prefix_visible
from ..prefix_table import gather_prefix, row_lengths, sum_prefix_grads
from . import aten_attention, sdpa_short
from .base import Backend


class Host(NamedTuple):
    """The plan's data-dependent choices, read once per call on CPU (where reading tensors costs no device sync)."""
    prefix_n: int       # prefix entries attended: the longest row's valid length (P off the CPU)
    ragged: bool        # some row's valid length is below prefix_n: the prefix part needs a mask
    padded: bool        # key_padding_mask holds a padding key (False: every key is real, the mask is dropped)


def host_plan(q, prefix_k, prefix_index, prefix_lengths, key_padding_mask):
    T, P = prefix_k.shape[0], prefix_k.shape[2]
    if q.device.type != "cpu":  # on an accelerator these reads would synchronize: always mask
        return Host(P, True, key_padding_mask is not None)
    n, ragged = 0, False
    if P > 0 and T == 1:  # shared: every row has the one entry's length
        n = min(int(prefix_lengths[0]), P)  # (unchecked lengths, under torch.compile, may exceed P)
    elif P > 0:  # cut the prefix to the longest row, mask only when rows differ
        lengths = row_lengths(prefix_index, prefix_lengths)  # [B]
        if lengths.numel():
            shortest, longest = (int(x) for x in torch.aminmax(lengths))   # (one op: this runs once per call)
            n = min(longest, P)
            ragged = shortest < n
    padded = key_padding_mask is not None and not bool(key_padding_mask.all())
    return Host(n, ragged, padded)


class SdpaPlan(NamedTuple):
    """What the sdpa backend decides per call before running it (``SdpaBackend.plan``)."""
    host: Host
    short: bool                 # the short path (``sdpa_short``) runs the call
    in_cpp: bool                # ... through the C++ kernels of ``fastpeft._cpu``
    parts: Optional[list]       # a biased call's parts: as costly to rebuild as to keep, so planned once


class _Part(NamedTuple):
    """One fused attention call of the split."""
    kind: str                       # "prefix" or "keys"
    k: torch.Tensor                 # [B, Hkv, n, D]
    v: torch.Tensor
    mask: Optional[torch.Tensor]    # additive float mask of q's dtype, or None: [B, 1, 1, n] (ragged or padding);
                                    # with a bias, its columns and -inf where masked, [1|B, 1|Hq, 1|L, n]
    causal: bool                    # the op's top-left causal flag (only with n == L)
    folded: bool                    # query group folded into the query axis: q as [B, Hkv, group * L, D]
    blind: Optional[torch.Tensor]   # bool, broadcastable to [B, Hq, L]: queries that see no key of this part
    columns: slice                  # the part's columns of [prefix ; k] (prefix 0..n-1, then P + key index)
    matmuls: bool = False           # run by sdpa_short.block_attend, not by the fused op


# On CPU a short prefix part runs as matmuls (sdpa_short.block_attend) instead of a fused call, whose fixed
# cost per query block dominates there: at most CPU_MATMUL_PREFIX[0] entries, and folded queries x head size
# (group * L * D) at most CPU_MATMUL_PREFIX[1], beyond which the backward's [n, group * L] @ [group * L, D] products
# lose. Measured per part on the 2-core CPU, one thread, fp32, B=2, Hq=8, Hkv=2, P=8 (fused / matmuls, fwd + bwd,
# ms): L=256 D=32 0.95 / 0.51; L=2048 D=32 8.4 / 4.2; L=512 D=64 5.2 / 1.6; L=512 D=128 7.8 / 5.4; but L=2048 D=64
# 13.7 / 15.4; P=16 (L=512, D=32) 2.26 / 2.17, no gain.
CPU_MATMUL_PREFIX = (8, 2048 * 128)


def _bias_mask(bias, visible):
    """A biased part's float mask as one contiguous tensor (the fused CPU ops copy a mask of any other layout, in
    every forward and backward call, and T5's bias is a permuted view): the bias columns ``bias``, with ``-inf`` where
    the broadcastable bool ``visible`` is False (None: nothing hidden), written once in the broadcast shape."""
    if visible is None:
        return bias.contiguous()
    out = torch.empty(torch.broadcast_shapes(visible.shape, bias.shape), dtype=bias.dtype, device=bias.device)
    return torch.where(visible, bias, torch.tensor(NEG_INF, dtype=bias.dtype, device=bias.device), out=out)


def _tril(L, device):
    """Bool ``[L, L]``, True on and below the diagonal: query ``i`` sees keys ``j <= i`` (the op's causal flag)."""
    return torch.ones(L, L, dtype=torch.bool, device=device).tril()


def _blind(mask, scan, causal, from_masks):
    """A biased part's blind queries: read from its mask when ``scan`` (the bias may hold -inf; under the op's causal
    flag only keys ``j <= i`` count), else ``from_masks`` (from the padding/ragged masks alone, or None)."""
    if not scan:
        return from_masks
    if causal:
        return ~(~torch.isneginf(mask) & _tril(mask.shape[-1], mask.device)).any(-1)
    return torch.isneginf(mask).all(-1)


def _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_bias, host, scan):
    B, Hq, L, D = q.shape
    Hkv = prefix_k.shape[1]
    n = host.prefix_n
    if n == 0:
        return None
    # a shared prefix is broadcast over the batch (stride 0, never copied per row); a table gathered once
    pk = gather_prefix(prefix_k, prefix_index, n).expand(B, Hkv, n, D)
    pv = gather_prefix(prefix_v, prefix_index, n).expand(B, Hkv, n, D)
    visible = blind = None
    if host.ragged:
        visible = prefix_visible(prefix_index, prefix_lengths, n)[:, None, None, :]
        blind = (row_lengths(prefix_index, prefix_lengths) == 0)[:, None, None]
    columns = slice(0, n)
    if attn_bias is not None:
        mask = _bias_mask(attn_bias[..., columns], visible)
        return _Part("prefix", pk, pv, mask, False, False, _blind(mask, scan, False, blind), columns)
    matmuls = (q.device.type == "cpu" and n <= CPU_MATMUL_PREFIX[0]
               and Hq // Hkv * L * D <= CPU_MATMUL_PREFIX[1])
    mask = None if visible is None else additive(visible, q.dtype)
    return _Part("prefix", pk, pv, mask, False, True, blind, columns, matmuls)


def _keys_part(q, k, v, key_padding_mask, attn_bias, P, start, stop, causal, scan):
    ks, vs = k[:, :, start:stop], v[:, :, start:stop]
    visible = blind = None
    if key_padding_mask is not None:
        real = key_padding_mask[:, start:stop]
        visible = real[:, None, None, :]
        if causal:   # query i sees keys start..start+i of this part
            blind = (real.cumsum(1) == 0)[:, None, :]
        else:
            blind = (~real.any(1))[:, None, None]
    columns = slice(P + start, P + stop)
    if attn_bias is not None:
        mask = _bias_mask(attn_bias[..., columns], visible)
        return _Part("keys", ks, vs, mask, causal, False, _blind(mask, scan, causal, blind), columns)
    mask = None if visible is None else additive(visible, q.dtype)
    return _Part("keys", ks, vs, mask, causal, not causal, blind, columns)


def _plan(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal, host=None):
    """The fused calls whose merge is the attention over ``[prefix ; k]`` (see the module docstring); ``host``:
    the ``host_plan`` of these inputs (or of the whole problem this one is a chunk of), read here when None."""
    L, S, P = q.shape[2], k.shape[2], prefix_k.shape[2]
    if host is None:
        host = host_plan(q, prefix_k, prefix_index, prefix_lengths, key_padding_mask)
    # Which queries a bias with -inf entries blinds shows only in the parts' masks; on CPU a scan of the bias in its
    # own (broadcast) shape says whether it has any, else the (much smaller) padding and ragged masks alone say which
    # queries are blind. On an accelerator that scan would synchronize: the masks are always read.
    scan = attn_bias is not None and (q.device.type != "cpu" or bool(torch.isneginf(attn_bias).any()))
    parts = []
    part = _prefix_part(q, prefix_k, prefix_v, prefix_index, prefix_lengths, attn_bias, host, scan)
    if part is not None:
        parts.append(part)
    if not host.padded:
        key_padding_mask = None
    keys = (q, k, v, key_padding_mask, attn_bias, P)
    if causal and 1 < L < S:    # a cache precedes the queries: every query sees the cached keys
        parts.append(_keys_part(*keys, 0, S - L, causal=False, scan=scan))
        parts.append(_keys_part(*keys, S - L, S, causal=True, scan=scan))
    elif causal and L == S and L > 1:
        parts.append(_keys_part(*keys, 0, S, causal=True, scan=scan))
    else:                       # non-causal, or one query per row (it sits at the last key and sees them all)
        parts.append(_keys_part(*keys, 0, S, causal=False, scan=scan))
    return parts


def _as_part(x, part, Hkv):
    """``[B, Hq, L, ...]`` -> the part's query layout (``[B, Hkv, group * L, ...]`` when folded); a view."""
    return x.view(x.shape[0], Hkv, -1, *x.shape[3:]) if part.folded else x


def _grouped(blind, Hkv):
    """A part's blind queries ``[Bb, 1|Hq, Lb]`` as ``[Bb, 1|Hkv, 1|group, Lb]``, against the grouped lse."""
    if blind.shape[1] == 1:
        return blind.unsqueeze(1)
    return blind.reshape(blind.shape[0], Hkv, -1, blind.shape[2])


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


def _split_forward(args, plan):
    """``(out, lse)`` of the split: the forward of every query chunk (one, with a bias: its rows are per query)."""
    q, k, v = args.q, args.k, args.v
    rest = (args.prefix_k, args.prefix_v, args.prefix_index, args.prefix_lengths)
    if args.attn_bias is not None:
        return _forward_rows(q, k, v, *rest, args.key_padding_mask, args.attn_bias, args.causal, args.softmax_scale,
                             plan.host, plan.parts)
    chunks = _query_chunks(q, args.causal)
    if len(chunks) == 1:
        return _forward_rows(q, k, v, *rest, args.key_padding_mask, None, args.causal, args.softmax_scale, plan.host)
    L, S = q.shape[2], k.shape[2]
    outs, lses = [], []
    for start, stop in chunks:
        end, mask = _chunk(L, S, args.key_padding_mask, start, stop)
        out, lse = _forward_rows(q[:, :, start:stop], k[:, :, :end], v[:, :, :end], *rest, mask, None, args.causal,
                                 args.softmax_scale, plan.host)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _forward_rows(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
                  softmax_scale, host, parts=None):
    """The forward of one sub-problem: plan its parts (unless given), run them, merge them.

    Every part's out and lse are viewed as ``[B, Hkv, group, L, ...]``, a free view of both the folded and the
    per-head layouts (a folded output reshaped to ``[B, Hq, L, D]`` would be a copy)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    acc = accumulation_dtype(q.dtype)
    q = q.contiguous()
    if parts is None:
        parts = _plan(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
                      host)
    outs, lses, blind = [], [], False
    for part in parts:
        if part.matmuls:
            out, lse = sdpa_short.block_attend(_as_part(q, part, Hkv), part.k, part.v, part.mask, softmax_scale)
        else:
            out, lse = aten_attention.attend(_as_part(q, part, Hkv), part.k, part.v, part.mask, part.causal,
                                             softmax_scale)
        out, lse = out.view(B, Hkv, group, L, D), lse.view(B, Hkv, group, L).to(acc)
        if part.blind is not None:
            lse = lse.masked_fill(_grouped(part.blind, Hkv), NEG_INF)
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
    safe = lse.masked_fill(lse == NEG_INF, float("inf"))  # blind queries: every weight exp(-inf) = 0
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


def _split_backward(dout, args, out, lse, plan, bias_grad):
    """``(dq, dk, dv, dprefix_k, dprefix_v, dattn_bias or None)`` of the split, from the merged ``out``/``lse``."""
    q, k, v, prefix_k, prefix_v = args.q, args.k, args.v, args.prefix_k, args.prefix_v
    lse = lse.masked_fill(lse == NEG_INF, float("inf"))  # blind queries: every probability exp(-inf) = 0
    L, S = q.shape[2], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    rest = (prefix_k, prefix_v, args.prefix_index, args.prefix_lengths)
    flags = (args.causal, args.softmax_scale, args.deterministic, plan.host)
    dbias = None
    if args.attn_bias is not None:
        dq, dk, dv, dprefix, bias_grads = _backward_rows(dout, q, k, v, *rest, args.key_padding_mask, args.attn_bias,
                                                         out, lse, *flags, bias_grad, plan.parts)
        if bias_grad:
            dbias = args.attn_bias.new_zeros(args.attn_bias.shape, dtype=acc)
            for columns, grad in bias_grads:
                dbias[..., columns] = grad
            dbias = dbias.to(args.attn_bias.dtype)
    else:
        chunks = _query_chunks(q, args.causal)
        dqs, dk, dv, dprefix = [], None, None, None
        for start, stop in chunks:
            end, mask = _chunk(L, S, args.key_padding_mask, start, stop)
            rows = slice(start, stop)
            dq_c, dk_c, dv_c, dprefix_c, _ = _backward_rows(
                dout[:, :, rows], q[:, :, rows], k[:, :, :end], v[:, :, :end], *rest, mask, None, out[:, :, rows],
                lse[:, :, rows], *flags, False)
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
            dprefix[1].to(prefix_v.dtype), dbias)


def _backward_rows(dout, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, out,
                   lse, causal, softmax_scale, deterministic, host, bias_grad, parts=None):
    """The backward of one sub-problem: ``(dq in float32/64, dk, dv, (dprefix_k, dprefix_v) in float32/64 or None
    when no row sees a prefix entry, [(columns, bias gradient)] of the parts when ``bias_grad``)``."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    acc = accumulation_dtype(q.dtype)
    q, dout, out, lse = q.contiguous(), dout.contiguous(), out.contiguous(), lse.contiguous()
    delta = (dout.to(acc) * out.to(acc)).sum(-1) if bias_grad else None
    if parts is None:
        parts = _plan(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
                      host)
    dq = dprefix = None
    key_grads, bias_grads = [], []
    for part in parts:
        attend_backward = sdpa_short.block_attend_backward if part.matmuls else aten_attention.attend_backward
        dq_p, dk_p, dv_p = attend_backward(
            _as_part(dout, part, Hkv), _as_part(q, part, Hkv), part.k, part.v, part.mask,
            _as_part(out, part, Hkv), _as_part(lse, part, Hkv), *(() if part.matmuls else (part.causal,)),
            softmax_scale)
        dq_p = dq_p.reshape(B, Hq, L, D)
        dq = dq_p.to(acc) if dq is None else dq.add_(dq_p)
        if part.kind == "prefix":
            dprefix = (sum_prefix_grads(dk_p.to(acc), prefix_k, prefix_index, deterministic),
                       sum_prefix_grads(dv_p.to(acc), prefix_v, prefix_index, deterministic))
        else:
            key_grads.append((dk_p, dv_p))
        if bias_grad:
            bias_grads.append((part.columns, _bias_gradient(dout, q, part, delta, lse, softmax_scale, attn_bias)))
    if len(key_grads) == 1:
        dk, dv = key_grads[0]
    else:
        dk = torch.cat([g[0] for g in key_grads], dim=2)
        dv = torch.cat([g[1] for g in key_grads], dim=2)
    return dq, dk, dv, dprefix, bias_grads


def _bias_gradient(dout, q, part, delta, lse, softmax_scale, attn_bias):
    """``dS = p * (dout @ v^T - delta)`` of one biased part, in float32/64, summed over the axes the bias broadcasts
    over: the gradient of the part's bias columns. ``lse`` is the merged one (``+inf`` for blind queries, whose
    ``p`` is then 0)."""
    B, Hq, L, D = q.shape
    Hkv, n = part.k.shape[1], part.k.shape[2]
    acc = lse.dtype
    grouped = (B, Hkv, Hq // Hkv, L, D)
    scores = torch.einsum("bhgld,bhnd->bhgln", q.to(acc).view(grouped), part.k.to(acc)).reshape(B, Hq, L, n)
    scores = scores * softmax_scale + part.mask.to(acc)
    if part.causal:
        scores = scores.masked_fill(~_tril(L, q.device), NEG_INF)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    dprobs = torch.einsum("bhgld,bhnd->bhgln", dout.to(acc).view(grouped), part.v.to(acc)).reshape(B, Hq, L, n)
    dscores = probs * (dprobs - delta.unsqueeze(-1))
    broadcast_axes = tuple(axis for axis in range(3) if attn_bias.shape[axis] == 1 and (B, Hq, L)[axis] > 1)
    return dscores.sum(broadcast_axes, keepdim=True) if broadcast_axes else dscores


class SdpaBackend(Backend):
    name = "sdpa"
    summary = "PyTorch's fused attention ops, parts merged by log-sum-exp"

    def unavailable(self, device, dtype):
        return aten_attention.unavailable_reason(device.type, dtype)

    def plan(self, args):
        if args.q.numel() == 0:   # nothing to plan: empty outputs and zero gradients
            return None
        host = host_plan(args.q, args.prefix_k, args.prefix_index, args.prefix_lengths, args.key_padding_mask)
        if args.attn_bias is not None:
            with torch.no_grad():   # the parts hold values (gathered prefixes, masks), never autograd history
                parts = _plan(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index,
                              args.prefix_lengths, args.key_padding_mask, args.attn_bias, args.causal, host)
            return SdpaPlan(host, False, False, parts)
        short = sdpa_short.use_short_path(args.q, args.k, host)
        return SdpaPlan(host, short, short and sdpa_short.compiled(), None)

    def forward_with_autograd(self, args, plan):
        if plan is not None and plan.short and plan.in_cpp:
            return sdpa_short.autograd_forward(args, plan.host)
        return None

    def decode(self, args, plan):
        if plan is not None and plan.short:   # (the per-query C++ kernel where it is built)
            return sdpa_short.forward(args, plan.host, False, plan.in_cpp)[0]
        return self.forward(args, plan, for_backward=False)[0]

    def paged_decode(self, args):
        out = sdpa_short.paged_decode(args)   # on CPU, the blocks read in place by the C++ per-query kernel
        return out if out is not None else super().paged_decode(args)

    def forward(self, args, plan, for_backward):
        q = args.q
        if q.numel() == 0:
            return q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=accumulation_dtype(q.dtype)), ()
        if plan is None:
            plan = self.plan(args)
        if plan.short:
            return sdpa_short.forward(args, plan.host, for_backward, plan.in_cpp)
        out, lse = _split_forward(args, plan)
        return out, lse, ()

    def backward(self, dout, args, out, lse, saved, plan, bias_grad):
        q, k, v = args.q, args.k, args.v
        if q.numel() == 0:
            return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(args.prefix_k),
                    torch.zeros_like(args.prefix_v), torch.zeros_like(args.attn_bias) if bias_grad else None)
        if plan is None:
            plan = self.plan(args)
        if saved:   # the short path's forward kept its blocks
            return sdpa_short.backward(dout, args, saved) + (None,)
        return _split_backward(dout, args, out, lse, plan, bias_grad)
