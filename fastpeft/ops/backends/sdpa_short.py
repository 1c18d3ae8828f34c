"""The ``sdpa`` backend's short-sequence path (CPU): attention over ``[prefix ; k]`` as plain matmuls on the two
score blocks with one softmax across them, for problems whose whole score matrix is small.

At short lengths the fused CPU kernel's cost is its fixed cost per call and per query block (small GEMMs, per-row
reductions), and the split (``fastpeft.ops.backends.sdpa``) pays it twice plus a merge: at the training suite's shape
(B=2, Hq=8, Hkv=2, L=64, P=8, D=32) the two fused calls cost more than PEFT's single call over the concatenation.
Here the same math runs as a handful of batched matmuls and elementwise ops over the blocks, never concatenated::

    sp = prefix_k[row] @ q^T    [B, Hkv, n, R]      sk = k @ q^T    [B, Hkv, S, R]      (R = group * L)
    m = max(max_j sp, max_j sk);  p = exp(scale * (s - m)) / l  with  l = sum_j of both blocks
    out = p_p^T @ prefix_v[row] + p_k^T @ v

Layout: the query group is folded into the query axis (``[B, Hkv, group * L, D]``, no kv head repeated) and the
scores are kept transposed (keys on the rows), so the prefix block's matmuls have the long axis outside (MKL is
slow at ``[R, D] @ [D, n]`` with n = 8, fast at ``[n, D] @ [D, R]``). The causal mask (query ``i`` at key position
``S - L + i``), ragged prefix lengths and key padding are ``-inf`` entries of the blocks; a query that sees
nothing gets output zeros. The forward keeps both blocks' exponentials (unnormalized: the normalization is one pass
over ``out``, and the backward folds it into ``dout``) for the backward (at most ``SHORT_SCORES`` elements), which
then runs five matmuls and recomputes nothing::

    dS = p * (dout @ v^T - rowsum(dout * out)) * scale,  dq = dS^T @ k,  dk = dS @ q,  dv = p @ dout

(per block; the prefix rows' gradients are summed per table entry like the split's). Computed in float32
(float64 for float64 inputs); low-precision inputs are upcast, which at these sizes costs less than a fused call.

The same math exists in C++ (``csrc/cpu/short_prefix_attention.cpp``, the extension ``fastpeft._cpu``): a forward
kernel op, plus a per-query kernel for decoding without a gradient (which also reads a paged KV pool in place,
``paged_decode``), and an op that records its backward in C++
(``autograd_forward``): at these sizes each of the ~25 ATen calls per direction costs a few microseconds of Python and
dispatch, as much as a fifth of the arithmetic, and so would the autograd.Function around two kernel calls. They run
where the extension is built and not switched off (``FASTPEFT_CPU_EXTENSION=0``); the Python functions below are the
fallback and the readable statement of the math. Both forwards also return the log-sum-exp of every query when a
backward may follow, so that a backward without the kept blocks (the custom ops' under torch.compile) can run the
split's from it.
"""

import functools

import torch

from .. import environment
from ..arguments import accumulation_dtype
from ..masks import NEG_INF, additive, causal_visible, prefix_visible
from ..prefix_table import gather_prefix, sum_prefix_grads

_LOG2E = 1.4426950408889634   # log2(e)
_LN2 = 0.6931471805599453     # ln(2)

# Largest score matrix (B * Hq * L * (prefix_n + S) elements) that takes this path: the training step on the built-in
# model (B=2, Hq=8, Hkv=2, P=8, D=32, fp32, two threads) is faster here than through the split up to L = 192
# (614K scores) and slower at L = 256 (1.08M), with the C++ build; see benchmarks/NOTES.md.
SHORT_SCORES = 1 << 20


def use_short_path(q, k, host):
    """Whether the problem ``q [B, Hq, L, D]`` over ``host.prefix_n`` prefix entries and ``k [B, Hkv, S, D]`` runs
    here: CPU tensors whose score matrix has at most ``SHORT_SCORES`` elements."""
    B, Hq, L, _ = q.shape
    return q.device.type == "cpu" and B * Hq * L * (host.prefix_n + k.shape[2]) <= SHORT_SCORES


def _own_precision(fn):
    """Run ``fn`` in float32/64 whatever the ambient autocast: the integration hands over q, k, v already in the
    autocast dtype, and autocast would run the matmuls here in bfloat16, mixing dtypes with the float32 blocks.
    (The context is entered only under autocast: at these sizes its ~5 us per call is felt.)"""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)
    return wrapper


@functools.lru_cache(maxsize=16)
def _causal_bias(S, L, group, dtype, device):
    """The causal mask of the transposed, folded key block as an additive bias ``[S, group * L]`` (column ``r`` of
    the fold is query ``r % L``). Cached: the training step asks for the same one in every layer, and ``baddbmm``
    adds it inside the score matmul."""
    hidden = additive(causal_visible(L, S, device).T, dtype)                   # [S, L]
    return hidden[:, None, :].expand(S, group, L).reshape(S, group * L)


def compiled():
    """Whether this path runs in C++ here: the extension is built (else one warning, the first time) and not switched
    off (``FASTPEFT_CPU_EXTENSION=0``); otherwise it runs in Python."""
    return environment.cpu_extension_enabled() and environment.cpu_extension()[0] is not None


def forward(args, host, for_backward, in_cpp):
    """The short path on canonical arguments (``host``: the sdpa backend's host plan of them): ``(out [B, Hq, L, D] in
    q's dtype, lse [B, Hq, L] or None, saved)`` as the backend contract's ``forward``. ``saved``: the blocks the Python
    ``backward`` reads, with ``for_backward`` in Python (the C++ forward keeps none: its backward is
    ``autograd_forward``'s). ``in_cpp``: through the C++ kernels (``compiled()``)."""
    if in_cpp:
        results = torch.ops.fastpeft._short_prefix_attention_fwd(*_cpp_arguments(args, host), for_backward)
        return results[0], (results[1] if for_backward else None), ()
    return short_forward(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index, args.prefix_lengths,
                         args.key_padding_mask, args.causal, args.softmax_scale, host, for_backward)


def paged_decode(args):
    """The per-query C++ kernel over a paged pool (``PagedDecodeArgs``), reading every row's keys in place through its
    block table: ``[B, Hq, 1, D]``, or None where it does not run (no extension, 16-bit inputs, a group above 64, a
    pool whose head dimension is strided), and the caller gathers instead."""
    q, key_cache, value_cache = args.q, args.key_cache, args.value_cache
    if not (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and
            q.shape[1] // key_cache.shape[1] <= 64 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1
            and compiled()):
        return None
    return torch.ops.fastpeft._cpu_paged_prefix_decode(*args)


def autograd_forward(args, host):
    """The short path through the C++ op that records its own backward (C++ autograd: the backward runs no Python,
    and the forward is one op call): out ``[B, Hq, L, D]`` in q's dtype."""
    return torch.ops.fastpeft._short_prefix_attention(*_cpp_arguments(args, host))


def _cpp_arguments(args, host):
    """The C++ ops' arguments: the canonical ones, the causal mask of the folded key block, the host plan."""
    q, k = args.q, args.k
    Hq, L = q.shape[1], q.shape[2]
    causal_bias = None  # not causal, or one query (it sees every key)
    if args.causal and L > 1:
        causal_bias = _causal_bias(k.shape[2], L, Hq // k.shape[1], accumulation_dtype(q.dtype), q.device)
    return (q, k, args.v, args.prefix_k, args.prefix_v, args.prefix_index, args.prefix_lengths,
            args.key_padding_mask if host.padded else None, causal_bias, args.softmax_scale, host.prefix_n,
            host.padded, host.ragged)


def backward(dout, args, saved):
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` in the inputs' dtype from the Python ``forward``'s ``saved``."""
    dq, dk, dv, dprefix = short_backward(dout, saved, args.softmax_scale)
    prefix_k, prefix_v = args.prefix_k, args.prefix_v
    if dprefix is None:  # no prefix entry visible to any row
        dprefix_k, dprefix_v = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
    else:
        dprefix_k = sum_prefix_grads(dprefix[0], prefix_k, args.prefix_index, args.deterministic).to(prefix_k.dtype)
        dprefix_v = sum_prefix_grads(dprefix[1], prefix_v, args.prefix_index, args.deterministic).to(prefix_v.dtype)
    dtype = dout.dtype  # one dtype for every input (canonical arguments)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype), dprefix_k, dprefix_v


@_own_precision
def short_forward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale,
                  host, keep_for_backward):
    """Canonical arguments (``host``: the sdpa backend's host plan of them) -> ``(out [B, Hq, L, D] in q's dtype,
    lse [B, Hq, L], saved)``; ``lse`` (natural log, ``-inf`` for a query that sees no key, whose output is zeros) and
    ``saved`` (what ``short_backward`` needs) only with ``keep_for_backward``, else None and ``()``.

    Scores are in base 2 (q is scaled by ``softmax_scale * log2(e)`` once): ``exp2`` is about 3x faster than
    ``exp`` on CPU, and unlike ``exp`` it does not slow down on the underflowing entries far below the maximum."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    acc = accumulation_dtype(q.dtype)
    n = host.prefix_n
    qs = torch.empty(B, Hq, L, D, dtype=acc, device=q.device)
    torch.mul(q, softmax_scale * _LOG2E, out=qs)            # one pass: scaled, contiguous, folded by the view below
    qs = qs.view(B, Hkv, group * L, D)
    qt = qs.transpose(-1, -2)
    # Contiguous once (models hand over transposed views): every matmul here and in the backward reads them as is.
    kk, vv = k.to(acc).contiguous(), v.to(acc).contiguous()
    if causal and L > 1:  # the scores and the causal mask in one call (the bias is the matmul's initial value)
        sk = torch.baddbmm(_causal_bias(S, L, group, acc, q.device), kk.view(B * Hkv, S, D),
                           qs.view(B * Hkv, group * L, D).transpose(1, 2)).view(B, Hkv, S, group * L)
    else:
        sk = torch.matmul(kk, qt)                                              # [B, Hkv, S, R]
    if host.padded:
        sk.add_(torch.zeros(B, 1, S, 1, dtype=acc, device=q.device).masked_fill_(
            ~key_padding_mask[:, None, :, None], NEG_INF))
    m = sk.amax(-2)                                                            # [B, Hkv, R]
    pk = pv = sp = None
    if n > 0:
        # [1 or B, Hkv, n, D]: a shared prefix is broadcast by the matmuls
        pk = gather_prefix(prefix_k, prefix_index, n).to(acc)
        pv = gather_prefix(prefix_v, prefix_index, n).to(acc)
        sp = torch.matmul(pk, qt)                                              # [B, Hkv, n, R]
        if host.ragged:
            sp.masked_fill_(~prefix_visible(prefix_index, prefix_lengths, n)[:, None, :, None], NEG_INF)
        m = torch.maximum(m, sp.amax(-2))
    may_be_blind = host.padded or host.ragged
    if may_be_blind:  # a query that sees nothing: every score -inf; with m = 0 every exp2 is 0
        m = m.masked_fill(m == NEG_INF, 0.0)
    shift = m.unsqueeze(-2)
    sk = sk.sub_(shift).exp2_()
    total = sk.sum(-2)
    if sp is not None:
        sp = sp.sub_(shift).exp2_()
        total = total.add_(sp.sum(-2))
    # natural log, before the blind queries' total is set to 1: log2(0) + 0 = -inf for them
    lse = total.log2().add_(m).mul_(_LN2).view(B, Hq, L) if keep_for_backward else None
    if may_be_blind:
        total = total.masked_fill_(total == 0, 1.0)
    inv = total.reciprocal_()                                                  # [B, Hkv, R]
    # The blocks stay unnormalized (kept for the backward, which folds inv into dout): the normalization is one
    # pass over out [R, D] instead of one over each score block.
    out = torch.matmul(sk.transpose(-1, -2), vv)                               # [B, Hkv, R, D]
    if sp is not None:
        out = out.add_(torch.matmul(sp.transpose(-1, -2), pv))
    out = out.mul_(inv.unsqueeze(-1))
    saved = (qs, kk, vv, pk, pv, sk, sp, out, inv) if keep_for_backward else ()
    return out.view(B, Hq, L, D).to(q.dtype), lse, saved


@_own_precision
def short_backward(dout, saved, softmax_scale):
    """``(dq [B, Hq, L, D], dk, dv [B, Hkv, S, D], prefix rows' (dk, dv) [B|1, Hkv, n, D] or None)`` in float32/64
    from ``short_forward``'s ``saved``; the caller sums the prefix rows per table entry and casts. With ``qs``
    the scaled queries, ``dk = scale * dS @ q = ln(2) * dS @ qs``.

    The saved blocks ``e`` are unnormalized (``p = e * inv`` per query). With ``dout`` scaled by ``inv`` first,
    ``dv = e @ dout'``, and ``dS = e * (v @ dout'^T - rowsum(dout' * out))`` equals ``p * (dP - delta)``: the
    normalization costs one pass over ``dout`` [R, D] and none over the blocks."""
    qs, kk, vv, pk, pv, pkeys, pprefix, out, inv = saved
    B, Hkv, R, D = qs.shape
    L = dout.shape[2]
    # dout [B, Hq, L, D] (often a strided view: the model transposed out) times inv, contiguous, folded
    do = torch.empty(B, Hkv, R, D, dtype=qs.dtype, device=qs.device)
    torch.mul(dout.view(B, Hkv, R // L, L, D), inv.view(B, Hkv, R // L, L, 1), out=do.view(B, Hkv, R // L, L, D))
    dot = do.transpose(-1, -2)
    delta = (do * out).sum(-1).unsqueeze(-2)                                   # rowsum(dout' * out): [B, Hkv, 1, R]
    ds = torch.baddbmm(delta.neg().view(B * Hkv, 1, R), vv.view(B * Hkv, -1, D),      # dS / scale: [B, Hkv, S, R]
                       dot.reshape(B * Hkv, D, R)).view(pkeys.shape).mul_(pkeys)
    dq = torch.matmul(ds.transpose(-1, -2), kk)
    dk = torch.matmul(ds, qs).mul_(_LN2)
    dv = torch.matmul(pkeys, do)
    dprefix = None
    if pprefix is not None:
        ds = torch.matmul(pv, dot).sub_(delta).mul_(pprefix)
        dq = dq.add_(torch.matmul(ds.transpose(-1, -2), pk))
        dprefix = (torch.matmul(ds, qs).mul_(_LN2), torch.matmul(pprefix, do))
    return dq.mul_(softmax_scale).view(dout.shape), dk, dv, dprefix


@_own_precision
def block_attend(q, k, v, bias, scale):
    """``aten_attention.attend`` (non-causal) as matmuls over a small key block: ``q [B, H, R, D]``, ``k, v
    [B, H, n, D]``, ``bias`` None or ``[B, 1, 1, n]`` (0 / -inf) -> ``(out [B, H, R, D], lse [B, H, R])`` in
    float32/64; a query that sees no key gets output zeros (its lse, -inf here, is overridden by the caller)."""
    acc = accumulation_dtype(q.dtype)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    s = torch.matmul(k, q.transpose(-1, -2))                                   # [B, H, n, R]
    if bias is not None:
        s = s.add_(bias.to(acc).transpose(-1, -2))
    m = s.amax(-2, keepdim=True)
    if bias is not None:
        m = m.masked_fill_(m == NEG_INF, 0.0)
    e = s.sub_(m).mul_(scale * _LOG2E).exp2_()
    total = e.sum(-2, keepdim=True)
    lse = total.log().add_(m, alpha=scale).squeeze(-2)
    out = torch.matmul(e.transpose(-1, -2), v)
    return out.div_(total.clamp_min_(torch.finfo(acc).tiny).transpose(-1, -2)), lse


@_own_precision
def block_attend_backward(dout, q, k, v, bias, out, lse, scale):
    """``aten_attention.attend_backward`` (non-causal) for ``block_attend``: ``(dq, dk, dv)`` of this block given the
    merged ``out``/``lse`` it is a part of (``lse = +inf`` for a query that sees nothing), in float32/64."""
    acc = accumulation_dtype(q.dtype)
    q, k, v, dout, out = q.to(acc), k.to(acc), v.to(acc), dout.to(acc), out.to(acc)
    s = torch.matmul(k, q.transpose(-1, -2))
    if bias is not None:
        s = s.add_(bias.to(acc).transpose(-1, -2))
    p = s.mul_(scale * _LOG2E).sub_(lse.to(acc).unsqueeze(-2) * _LOG2E).exp2_()     # exp(scale * s - lse)
    delta = (dout * out).sum(-1).unsqueeze(-2)
    ds = torch.matmul(v, dout.transpose(-1, -2)).sub_(delta).mul_(p).mul_(scale)
    return torch.matmul(ds.transpose(-1, -2), k), torch.matmul(ds, q), torch.matmul(p, dout)
