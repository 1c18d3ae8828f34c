"""``fastpeft.ops.paged_prefix_decode``: one decode step of prefix attention over a paged KV cache.

The serving engine's KV cache is a pool of fixed-size blocks (``fastpeft.serve.kv_pool``); each request owns a list
of blocks, its block table. This op is ``fastpeft.prefix_attention`` for one new query per row whose own keys and
values are read through that table, and whose prefix is read in place from the prefix table through
``prefix_index``/``prefix_lengths`` as everywhere else (never copied into the request's blocks).

The same layers as ``prefix_attention``: ``arguments.canonicalize_paged`` validates once; ``registry.select`` picks
the backend (decode's order: CUDA extension, Triton, sdpa, reference; ``FASTPEFT_BACKEND`` forces one); under
``torch.compile`` the call goes through the custom op ``fastpeft::paged_prefix_decode`` (``library``), in eager mode
straight to the backend's ``paged_decode``. The Triton and CUDA kernels read the blocks in place; the sdpa and
reference backends gather them first (``block_table``).
"""

import torch

from .. import observe
from . import library, registry
from .arguments import canonicalize_paged


def _run(args):
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (args.q, args.key_cache, args.value_cache, args.prefix_k, args.prefix_v))
    if needs_grad:
        raise ValueError("paged_prefix_decode is inference only: call it under torch.no_grad() / inference_mode(), "
                         "or with inputs that do not require grad (fastpeft.prefix_attention is differentiable)")
    backend = registry.select(args.q.device, args.q.dtype, decode=True, bias=False)
    observe.record_attention_call(backend)
    implementation = registry.get(backend)
    if torch.compiler.is_compiling() and not implementation.differentiable:
        return library.paged_prefix_decode(*args, backend)
    return implementation.paged_decode(args)   # (the reference backend is plain PyTorch, traced as it is)


def paged_prefix_decode(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v, prefix_index=None,
                        prefix_lengths=None, softmax_scale=None):
    """Attention of one new query per row over ``[prefix ; the row's tokens in the paged cache]``.

    Arguments:
        q: ``[B, Hq, 1, D]`` the new token's queries (the layout an attention module hands over).
        key_cache, value_cache: ``[num_blocks, Hkv, block_size, D]``, one layer's block pool: block ``n`` holds
            ``block_size`` consecutive tokens of one request, per kv head. Any strides: FlashAttention's and vLLM
            v1's ``[num_blocks, block_size, Hkv, D]`` buffers pass as ``cache.transpose(1, 2)``. ``Hq`` must be a
            multiple of ``Hkv`` (query head ``h`` reads kv head ``h // (Hq // Hkv)``).
        block_table: ``[B, max_blocks]`` integer (int32 is used as it is), row ``b``'s blocks in token order: its
            token ``j`` lives in block ``block_table[b, j // block_size]`` at offset ``j % block_size``. Rows are
            ragged: entries past a row's last token are never read and may hold anything (e.g. -1).
        seq_lens: ``[B]`` integer in ``[0, max_blocks * block_size]``, the number of the row's own tokens in the
            cache, the new token's included (its K/V must be written before the call). 0: the row sees only its
            prefix.
        prefix_k, prefix_v: ``[Hkv, P, D]`` one prefix shared by every row, or ``[T, Hkv, P, D]`` a table.
        prefix_index: ``[B]`` integer, the table entry of each row (required with a table).
        prefix_lengths: ``[T]`` integer in ``[0, P]``, each entry's valid length (ragged); default ``P``.
        softmax_scale: scale of ``q @ k^T``; default ``1 / sqrt(D)``.

    The query sits after all of its row's tokens, so it sees every valid prefix entry and every one of its
    ``seq_lens[b]`` tokens (causality hides nothing). A row that sees no key gets zeros. As
    ``flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seq_lens, block_table=block_table)`` with the
    prefix entry in front of the cache, or vLLM's paged attention with ``seq_lens``.

    Returns ``[B, Hq, 1, D]`` in q's dtype. Inference only (no gradient; inputs that require one raise). dtypes:
    float16, bfloat16, float32 (float64 on the sdpa and reference backends), one for all floating inputs; ``D <=
    256``. Bad input raises ``ValueError`` (``IndexError`` for a ``block_table`` entry outside ``[0, num_blocks)`` that
    holds tokens, or ``prefix_index`` outside ``[0, T)``) naming the argument before any kernel runs.

    Example, ``block_size = 4``, a row of ``seq_lens = 6`` tokens in blocks 7 and 2::

        block_table[b] = [7, 2, -1]     tokens 0..3 in block 7, tokens 4, 5 in block 2 (offsets 0, 1)
        keys seen:  prefix[prefix_index[b]][:prefix_lengths[...]] ; tokens 0..5
    """
    return _run(canonicalize_paged(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v,
                                   prefix_index, prefix_lengths, softmax_scale))


def paged_prefix_decode_prevalidated(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v,
                                     prefix_index=None, prefix_lengths=None, softmax_scale=None):
    """``paged_prefix_decode`` without the value checks of the integer tensors (each a device sync), for callers
    whose block tables, lengths and indices are valid by construction (the model integration's paged cache, once per
    layer). Shapes, dtypes and devices are still checked; the kernels clamp every index they read."""
    return _run(canonicalize_paged(q, key_cache, value_cache, block_table, seq_lens, prefix_k, prefix_v,
                                   prefix_index, prefix_lengths, softmax_scale, check_values=False))
