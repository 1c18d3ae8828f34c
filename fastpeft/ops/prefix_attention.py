"""``fastpeft.prefix_attention``: attention over a learned prefix K/V plus the sequence's own K/V.

One op, the same layers for every backend:

* validation: ``fastpeft.ops.arguments.canonicalize`` checks every argument once and brings it to the canonical form
  every backend takes (``AttentionArgs``);
* the choice: ``fastpeft.ops.registry.select`` picks the backend (CUDA extension, Triton, sdpa, reference; or the one
  ``FASTPEFT_BACKEND`` forces), once per call, or once per model forward for the layers' calls
  (``prefix_attention_prevalidated``'s ``plan_cache``);
* autograd: under ``torch.compile`` the custom ops of ``fastpeft.ops.library`` (their fakes and registered autograd
  let it trace); in eager mode the ``autograd.Function`` below, which calls the same backend functions without the
  custom ops' dispatch and keeps the backend's plan (and whatever its forward kept) for its backward, unless the
  backend has a kernel with its own autograd for the call (``forward_with_autograd``: the C++ short CPU path). Without
  a gradient no autograd is involved at all, and one query per row runs the backend's decode path. The reference
  backend is plain differentiable PyTorch: ordinary autograd, traced by torch.compile as it is;
* the backends (``fastpeft.ops.backends``) implement one host contract: ``forward``, ``backward``, ``decode``,
  ``supports``.
"""

from typing import NamedTuple, Optional

import torch

from .. import observe
from . import library, registry
from .arguments import AttentionArgs, canonicalize


def _needs_grad(q, k, v, prefix_k, prefix_v, attn_bias):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (q, k, v, prefix_k, prefix_v, attn_bias))


def _select(args, needs_grad):
    """The registry's backend for these canonical arguments."""
    length = args.q.shape[2]
    if torch.compiler.is_compiling():
        # With a dynamic query length, L is symbolic (and not 1: Dynamo specializes sizes 0 and 1); the choice
        # below is folded to a constant, which needs a plain bool. (Dynamo has imported this module already.)
        from torch.fx.experimental.symbolic_shapes import guard_or_false
        one_query = guard_or_false(length == 1)
    else:
        one_query = length == 1
    return registry.select(args.q.device, args.q.dtype, one_query and not needs_grad, args.attn_bias is not None)


class _PrefixAttention(torch.autograd.Function):
    """Eager autograd of every backend: ``forward`` and ``backward`` of the backend's host contract, with the plan
    and what the forward kept handed to the backward. (The custom ops' registered autograd does the same under
    torch.compile; in eager mode their dispatch would cost about as much as the attention at small shapes.)"""

    @staticmethod
    def forward(ctx, backend, plan, q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask,
                attn_bias, causal, softmax_scale, deterministic):
        args = AttentionArgs(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
                             causal, softmax_scale, deterministic)
        out, lse, saved = backend.forward(args, plan, for_backward=True)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
                              out, lse, *saved)
        ctx.backend, ctx.plan, ctx.flags = backend, plan, (causal, softmax_scale, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        tensors = ctx.saved_tensors
        args = AttentionArgs(*tensors[:9], *ctx.flags)
        bias_grad = ctx.needs_input_grad[_EAGER_BIAS_INPUT]
        dq, dk, dv, dprefix_k, dprefix_v, dbias = ctx.backend.backward(dout, args, tensors[9], tensors[10],
                                                                       tuple(tensors[11:]), ctx.plan, bias_grad)
        return None, None, dq, dk, dv, dprefix_k, dprefix_v, None, None, None, dbias, None, None, None


_EAGER_BIAS_INPUT = 10  # position of attn_bias among _PrefixAttention.forward's inputs


def _run(args, backend, plan=None, needs_grad=None):
    """Canonical arguments on the chosen backend -> out. ``plan``: the backend's plan of these arguments when the
    caller made it already (``prefix_attention_prevalidated``'s ``plan_cache``)."""
    observe.record_attention_call(backend)
    implementation = registry.get(backend)
    if implementation.differentiable:   # the reference: ordinary autograd, traced as it is
        return implementation.forward(args, plan, for_backward=False)[0]
    if needs_grad is None:
        needs_grad = _needs_grad(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.attn_bias)
    decode = not needs_grad and args.q.shape[2] == 1 and args.attn_bias is None
    if torch.compiler.is_compiling():
        if decode:
            return library.prefix_decode(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.prefix_index,
                                         args.prefix_lengths, args.key_padding_mask, args.causal, args.softmax_scale,
                                         backend)
        return library.prefix_attention_fwd(*args, backend)[0]
    if plan is None:
        plan = implementation.plan(args)
    if needs_grad:
        out = implementation.forward_with_autograd(args, plan)
        return out if out is not None else _PrefixAttention.apply(implementation, plan, *args)
    if decode:
        return implementation.decode(args, plan)
    return implementation.forward(args, plan, for_backward=False)[0]


def prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None,
                     key_padding_mask=None, causal=True, softmax_scale=None, deterministic=False, attn_bias=None):
    """Attention of ``q`` over ``[prefix ; k]`` per row, without building the concatenation.

    Arguments:
        q: ``[B, Hq, L, D]`` queries.
        k, v: ``[B, Hkv, S, D]`` the sequence's own keys and values, ``S >= L`` (``S > L`` when a KV cache
            precedes the ``L`` new queries). ``Hq`` must be a multiple of ``Hkv``; query head ``h`` reads kv
            head ``h // (Hq // Hkv)`` (grouped-query / multi-query attention).
        prefix_k, prefix_v: ``[Hkv, P, D]`` one prefix shared by every row, or ``[T, Hkv, P, D]`` a table of
            ``T`` prefixes (one per adapter/tenant) read in place, never copied per row.
        prefix_index: ``[B]`` integer, row ``b`` uses table entry ``prefix_index[b]``. Required with a 4-D
            table, not allowed with a 3-D prefix.
        prefix_lengths: ``[T]`` integer in ``[0, P]``, the valid length of each table entry (ragged);
            entries ``p >= prefix_lengths[t]`` are invisible. Default: ``P`` for every entry.
        key_padding_mask: ``[B, S]`` bool or 0/1 integer, True/1 = real key. None = every key is real.
        causal: with True, query ``i`` of a row sits at key position ``S - L + i`` (bottom-right aligned, as
            FlashAttention with a KV cache) and sees every valid prefix entry and the keys ``j <= S - L + i``.
            With False it sees every valid prefix entry and every real key.
        softmax_scale: scale of ``q @ k^T``; default ``1 / sqrt(D)``.
        deterministic: make the backward's prefix-gradient reduction deterministic (no atomics).
        attn_bias: None, or an additive score bias broadcastable to ``[B, Hq, L, P + S]`` (any of the first three
            axes may be 1; the last is exactly ``P + S``) in q's dtype, over ``[prefix ; k]``: columns ``0 .. P-1``
            are the row's prefix entries (of its table entry; those beyond its ``prefix_lengths`` are ignored),
            columns ``P .. P+S-1`` its keys. It is added to ``softmax_scale * q @ k^T`` before the masks, like
            xformers' ``attn_bias``, a float ``attn_mask`` of PyTorch's SDPA or T5's relative position bias
            (``-inf`` entries mask). Differentiable; a broadcast axis gets the sum. Such calls run on the ``sdpa``
            backend (the reference where sdpa cannot run): the Triton and CUDA kernels take no bias.

    Returns:
        ``[B, Hq, L, D]`` in q's dtype. A query that sees no key at all (every prefix entry and key masked)
        gets zeros, never NaN.

    Example of the causal alignment, ``L = 2`` new queries after a cache of 3 (``S = 5``), ``P = 2``::

        keys:      p0 p1 | k0 k1 k2 k3 k4
        query 0:    1  1 |  1  1  1  1  0      (sits at position S - L + 0 = 3)
        query 1:    1  1 |  1  1  1  1  1      (sits at position 4)

    Differentiable in q, k, v, prefix_k, prefix_v (and attn_bias); the gradient of a table entry is the sum over the
    rows that used it (a shared prefix gets the sum over the batch). dtypes: float16, bfloat16, float32 (one dtype
    for all inputs), any ``D <= 256``; accumulation is float32 inside. Bad input raises ``ValueError`` (or
    ``IndexError`` for ``prefix_index`` outside ``[0, T)``) before any kernel runs.
    """
    args = canonicalize(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias, causal,
                        softmax_scale, deterministic)
    needs_grad = _needs_grad(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.attn_bias)
    return _run(args, _select(args, needs_grad), needs_grad=needs_grad)


class _Plan(NamedTuple):
    """What a call decided from its arguments besides q/k/v and the prefix tensors: their canonical forms, the
    backend and the backend's plan. Valid for every call with the same ``_signature``."""
    inputs: tuple          # the signature's tensors (prefix_index, prefix_lengths, key_padding_mask), kept alive
    prefix_index: torch.Tensor
    prefix_lengths: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    softmax_scale: float
    backend: str
    backend_plan: object   # the backend's ``plan`` of the first call (the sdpa backend's host reads), or None


# A model's forward calls attention once per layer with one signature; a plan cache that outgrows this is cleared
# (it belongs to one forward; a caller reusing it across many would otherwise keep their masks alive).
_PLAN_CACHE_LIMIT = 64


def _signature(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal, softmax_scale,
               deterministic, needs_grad):
    """Everything ``canonicalize``, the backend choice and the backend's plan read, except the values of the index,
    lengths and mask tensors, which are identified by object (their values do not change during a forward)."""
    return (q.shape, k.shape, v.shape, prefix_k.shape, prefix_v.shape, q.dtype, k.dtype, v.dtype, prefix_k.dtype,
            prefix_v.dtype, q.device, k.device, v.device, prefix_k.device, prefix_v.device, id(prefix_index),
            id(prefix_lengths), id(key_padding_mask), bool(causal), softmax_scale, bool(deterministic), needs_grad)


def prefix_attention_prevalidated(q, k, v, prefix_k, prefix_v, prefix_index=None, prefix_lengths=None,
                                  key_padding_mask=None, causal=True, softmax_scale=None, deterministic=False,
                                  attn_bias=None, plan_cache=None):
    """``prefix_attention`` without the value checks of ``prefix_index``/``prefix_lengths`` (which sync the
    device). For the model integrations, which check those values once per forward instead of once per layer.
    Shapes, dtypes and devices are still checked.

    ``plan_cache``: a dict owned by the caller for the duration of one model forward (``PrefixSpec.plan_cache``).
    The first layer's call validates and plans as usual and stores the result under its signature (shapes, dtypes,
    devices, flags, and the index/lengths/mask tensors by identity); the other layers' calls, which have the same
    signature, reuse it and go straight to the backend. At short sequence lengths that per-layer work is a
    measurable part of a training step. Calls with an ``attn_bias`` and traced calls do not use it."""
    if plan_cache is None or attn_bias is not None or torch.compiler.is_compiling():
        args = canonicalize(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, attn_bias,
                            causal, softmax_scale, deterministic, check_values=False)
        needs_grad = _needs_grad(args.q, args.k, args.v, args.prefix_k, args.prefix_v, args.attn_bias)
        return _run(args, _select(args, needs_grad), needs_grad=needs_grad)
    needs_grad = _needs_grad(q, k, v, prefix_k, prefix_v, None)
    signature = _signature(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, causal,
                           softmax_scale, deterministic, needs_grad)
    plan = plan_cache.get(signature)
    if plan is None:
        args = canonicalize(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lengths, key_padding_mask, None,
                            causal, softmax_scale, deterministic, check_values=False)
        backend = _select(args, needs_grad)
        if len(plan_cache) >= _PLAN_CACHE_LIMIT:
            plan_cache.clear()
        plan = plan_cache[signature] = _Plan((prefix_index, prefix_lengths, key_padding_mask), args.prefix_index,
                                             args.prefix_lengths, args.key_padding_mask, args.softmax_scale, backend,
                                             registry.get(backend).plan(args))
        return _run(args, backend, plan.backend_plan, needs_grad)
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    args = AttentionArgs(q, k, v, prefix_k, prefix_v, plan.prefix_index, plan.prefix_lengths, plan.key_padding_mask,
                         None, bool(causal), plan.softmax_scale, bool(deterministic))
    return _run(args, plan.backend, plan.backend_plan, needs_grad)
