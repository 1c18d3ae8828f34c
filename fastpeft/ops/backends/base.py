"""The host contract every backend of prefix attention implements, and the description of a call that the registry
(``fastpeft.ops.registry``) chooses a backend for.

A backend takes canonical arguments (``fastpeft.ops.arguments.AttentionArgs``) and returns the attention output, the
log-sum-exp of every query and whatever its backward wants to keep; the registry asks it first whether it can run a
call at all. The one autograd path (``fastpeft.ops.prefix_attention``: the custom ops under torch.compile, an
``autograd.Function`` in eager mode) connects ``forward`` and ``backward`` the same way for every backend but the
reference, which is plain differentiable PyTorch (``differentiable``). Decode over a paged KV cache
(``paged_decode``, ``PagedDecodeArgs``) is the decode case read through a block table: every backend runs it, by
default by gathering the blocks.
"""

from typing import NamedTuple, Optional

import torch

from ..arguments import AttentionArgs
from ..block_table import gather_rows


class Case(NamedTuple):
    """What the choice of a backend depends on (besides the environment)."""
    device: torch.device
    dtype: torch.dtype
    decode: bool   # one query per row and no gradient: the decode kernels' case
    bias: bool     # the call has an additive score bias (attn_bias)


class Backend:
    """One implementation of prefix attention. Subclasses set ``name`` (what ``FASTPEFT_BACKEND`` calls it) and
    ``summary``, and implement ``forward``/``backward`` (or, the CUDA extension, ``decode`` only)."""

    name = ""
    summary = ""
    # Device types on which this backend is the expected path: falling back from it there warns once (elsewhere,
    # e.g. Triton for CPU tensors, passing it over is the normal order).
    expected_on = ()
    # True: ``forward`` is plain differentiable PyTorch, run under ordinary autograd (and traced by torch.compile as
    # it is) instead of through the autograd path and the custom ops; it then has no ``backward`` of its own.
    differentiable = False

    def out_of_scope(self, case: Case) -> Optional[str]:
        """Why this backend never implements calls of this kind (an attn_bias, a gradient), or None. A forced
        backend hands such calls on to the next one in the order, with a warning."""
        return None

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """Why it cannot run tensors of this device and dtype with this installation, or None."""
        return None

    def supports(self, case: Case) -> Optional[str]:
        """None when this backend runs ``case`` here, else why not (one sentence)."""
        return self.out_of_scope(case) or self.unavailable(case.device, case.dtype)

    def plan(self, args):
        """The host-side decisions that read the arguments' values (None where there are none), made once per call,
        or once per model forward for the layers' calls (``prefix_attention_prevalidated``), and handed to
        ``forward``/``backward``/``decode``. Those compute it themselves when given None (inside the custom ops)."""
        return None

    def forward(self, args, plan, for_backward):
        """``(out [B, Hq, L, D] in q's dtype, lse [B, Hq, L] in the accumulation dtype, saved)``.

        ``for_backward``: a backward may follow: ``lse`` must be valid (natural log; its value for a query that
        sees no key is this backend's convention, read only by its own backward), and ``saved`` is a tuple of
        tensors (possibly empty) that ``backward`` may be handed back. Without it, ``lse`` may be None and
        ``saved`` is empty."""
        raise NotImplementedError(f"the {self.name} backend has no forward with a backward")

    def forward_with_autograd(self, args, plan):
        """For a call that needs a gradient: the output with its backward already recorded, where this backend has a
        kernel that carries its own autograd (the sdpa backend's C++ short path: its backward runs no Python, which at
        its sizes saves a tenth of the time), else None and the common autograd path runs ``forward``/``backward``.
        Eager mode only; under torch.compile the custom ops run ``forward``/``backward``."""
        return None

    def backward(self, dout, args, out, lse, saved, plan, bias_grad):
        """``(dq, dk, dv, dprefix_k, dprefix_v, dattn_bias)`` in the inputs' dtypes; the prefix gradients are summed
        over the rows that use each table entry; ``dattn_bias`` (attn_bias's shape) only when ``bias_grad``, else
        None. ``saved``: the forward's, or empty (the custom ops keep none): then everything is recomputed from
        the arguments, ``out`` and ``lse``."""
        raise NotImplementedError(f"the {self.name} backend has no backward")

    def decode(self, args, plan):
        """The output of one query per row (L == 1) without a gradient."""
        return self.forward(args, plan, for_backward=False)[0]

    def paged_decode(self, args):
        """The output ``[B, Hq, 1, D]`` of one query per row over its prefix entry and its own tokens in a paged KV
        cache (``fastpeft.ops.arguments.PagedDecodeArgs``), without a gradient. Runs the cases ``decode`` runs (one
        query per row, no bias). This default gathers every row's tokens into ``[B, Hkv, max_blocks * block_size, D]``
        with a key padding mask (``fastpeft.ops.block_table``) and runs ``decode`` on that; the kernels read the
        blocks in place instead."""
        k, valid = gather_rows(args.key_cache, args.block_table, args.seq_lens)
        v, _ = gather_rows(args.value_cache, args.block_table, args.seq_lens)
        dense = AttentionArgs(args.q, k, v, args.prefix_k, args.prefix_v, args.prefix_index, args.prefix_lengths, valid,
                              None, True, args.softmax_scale, False)
        return self.decode(dense, self.plan(dense))
