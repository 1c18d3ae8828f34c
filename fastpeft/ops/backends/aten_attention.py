"""PyTorch's private fused-attention ops that return the log-sum-exp, behind one small interface.

The ``sdpa`` backend (``fastpeft.ops.backends.sdpa``) needs, per device, an attention forward that
returns ``(out, lse)`` and a backward that takes ``(out, lse)`` back. PyTorch has them only as private aten ops,
whose names and signatures may change between releases, so they are reached only through this module:

* ``unavailable_reason(device_type, dtype)``: None when the ops exist in the installed torch for this device
  and dtype, otherwise why not (the registry then falls back to the reference with a one-time warning);
* ``attend(q, k, v, bias, causal, scale) -> (out [B, Hq, Lq, D], lse [B, Hq, Lq] float32)``;
* ``attend_backward(dout, q, k, v, bias, out, lse, causal, scale) -> (dq, dk, dv)``.

Semantics of both: ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Sk, D]`` with ``Hq`` a multiple of ``Hkv`` (query head
``h`` reads kv head ``h // (Hq // Hkv)``); ``bias`` None or an additive float mask broadcastable to
``[B, Hq, Lq, Sk]`` in q's dtype (0, or a score bias, = visible; -inf = invisible); ``causal`` is the op's own
causal flag, which is TOP-LEFT aligned (query ``i`` sees keys ``j <= i``): callers use it only with ``Lq == Sk``.
``lse`` is in the natural-log units of ``scale * q @ k^T`` (plus the bias). A query that sees no key gets some
finite ``lse`` from these ops (0 on CPU): the caller knows which queries are blind and overrides it.
``attend_backward`` is given the ``out``/``lse`` of a larger softmax that this call is one part of; it then returns
that part's exact gradients (of q, k, v: none for the bias).

Ops:
* CPU: ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` (float16, bfloat16, float32,
  float64; native grouped-query heads; float masks of q's dtype; causal blocks above the diagonal skipped).
* CUDA: ``aten::_scaled_dot_product_efficient_attention`` and its ``_backward`` (float16, bfloat16, float32;
  additive bias). It needs equal head counts (kv heads are repeated for grouped-query calls: the prefix and
  non-causal parts avoid this by folding the query group into the query axis), head sizes that are a multiple
  of 8 (padded here with zeros, which changes no score), a bias whose rows are 16-element aligned, and it pads
  its lse to a multiple of 32 queries. Gradients are allocated with the inputs' strides, so every input is
  made contiguous first (a broadcast input would have its gradient rows written over each other).
"""

import functools

import torch

_CPU_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
_CUDA_OPS = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward")
_CUDA_LSE_ALIGN = 32    # PyTorch's kAlignLSE: the efficient kernels' lse has ceil(Lq / 32) * 32 columns
_CUDA_BIAS_ALIGN = 16   # the efficient kernels read bias rows in aligned 16-element chunks
_CUDA_HEAD_ALIGN = 8


@functools.lru_cache(maxsize=None)
def _missing_ops(device_type):
    """Names of the ops this device needs that the installed torch lacks (None: no ops known for it)."""
    names = {"cpu": _CPU_OPS, "cuda": _CUDA_OPS}.get(device_type)
    if names is None:
        return None
    return tuple(name for name in names if not hasattr(torch.ops.aten, name))


def unavailable_reason(device_type, dtype):
    """None when ``attend``/``attend_backward`` run on this device and dtype, else a sentence saying why not."""
    missing = _missing_ops(device_type)
    if missing is None:
        return f"no fused attention op with a log-sum-exp output is known for {device_type} tensors"
    if missing:
        return (f"torch {torch.__version__} lacks aten::{', aten::'.join(missing)} (the sdpa backend's "
                f"fused attention ops for {device_type})")
    if dtype == torch.float64 and device_type != "cpu":
        return f"PyTorch's fused attention ops for {device_type} take no float64 inputs"
    return None


def attend(q, k, v, bias, causal, scale):
    """``(out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] float32)`` of one attention call (see the module)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    return _cuda_attend(q, k, v, bias, causal, scale)


def attend_backward(dout, q, k, v, bias, out, lse, causal, scale):
    """``(dq, dk, dv)`` of one attention call, given the ``out``/``lse`` it is a part of (see the module)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale)
    return _cuda_attend_backward(dout, q, k, v, bias, out, lse, causal, scale)


# ----------------------------------------------------------------------------------------------------------
# CUDA: the memory-efficient kernels, with their alignment rules met at this boundary.


def _round_up(n, multiple):
    return (n + multiple - 1) // multiple * multiple


def _cuda_operands(q, k, v, bias):
    """Contiguous, head-size-padded, equal-head operands and the expanded aligned bias for the efficient op."""
    B, Hq, Lq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hq != Hkv:  # the caller only sends causal parts here with grouped heads (others are folded)
        group = Hq // Hkv
        k = k[:, :, None].expand(B, Hkv, group, Sk, D).reshape(B, Hq, Sk, D)
        v = v[:, :, None].expand(B, Hkv, group, Sk, D).reshape(B, Hq, Sk, D)
    Dp = _round_up(D, _CUDA_HEAD_ALIGN)
    if Dp != D:
        q, k, v = (torch.nn.functional.pad(t, (0, Dp - D)) for t in (q, k, v))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if bias is not None:  # aligned rows in the bias's own (broadcast) shape, then viewed as [B, Hq, Lq, Sk]
        storage = bias.new_zeros(*bias.shape[:-1], _round_up(Sk, _CUDA_BIAS_ALIGN))
        storage[..., :Sk] = bias
        bias = storage[..., :Sk].expand(B, Hq, Lq, Sk)
    return q, k, v, bias, D, Dp


def _cuda_attend(q, k, v, bias, causal, scale):
    Lq = q.shape[2]
    q, k, v, bias, D, Dp = _cuda_operands(q, k, v, bias)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, causal, scale=scale)
    out = torch.nan_to_num(out[..., :D], nan=0.0)  # a fully masked row: zeros (its lse is overridden anyway)
    return out, lse[..., :Lq].float()


def _cuda_attend_backward(dout, q, k, v, bias, out, lse, causal, scale):
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    qp, kp, vp, bias, D, Dp = _cuda_operands(q, k, v, bias)
    if Dp != D:
        dout, out = (torch.nn.functional.pad(t, (0, Dp - D)) for t in (dout, out))
    lse_padded = lse.new_zeros(B, Hq, _round_up(Lq, _CUDA_LSE_ALIGN))
    lse_padded[..., :Lq] = lse
    seed = torch.empty((), dtype=torch.long)
    offset = torch.empty((), dtype=torch.long)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout.contiguous(), qp, kp, vp, bias, out.contiguous(), lse_padded, seed, offset, 0.0,
        [True, True, True, False], causal, scale=scale)
    dq, dk, dv = dq[..., :D], dk[..., :D], dv[..., :D]
    if Hq != Hkv:  # sum the repeated kv heads' gradients back onto their kv head
        group = Hq // Hkv
        dk = dk.reshape(B, Hkv, group, -1, D).sum(2)
        dv = dv.reshape(B, Hkv, group, -1, D).sum(2)
    return dq, dk, dv
