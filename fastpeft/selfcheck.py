"""``python -m fastpeft.selfcheck``: print the backend registry (which backends run here, in dispatch order, and why
the others do not), then run prefix_attention on every backend this machine has and compare each against the float64
reference path, on a small GQA case with a ragged prefix table and left padding:

* training: L = S = 16, the forward and all five gradients (the Triton forward/backward kernels);
* decode: L = 1 after a cache of 15, no grad (the split-KV decode kernels: Triton, and the CUDA extension
  where it is built);
* paged: the same decode with each row's keys in a shuffled pool of 4-token blocks read through block tables
  (``fastpeft.ops.paged_prefix_decode``; the same kernels' paged mode), against the same float64 result.

Backends: reference, sdpa (PyTorch's fused attention ops; float32 and bfloat16), Triton (on CPU through the
interpreter), the CUDA extension (decode, on a GPU).

Exits non-zero if any backend disagrees."""

import os
import sys

import torch

GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
# Relative error vs float64: fp32 kernels use exact fp32 dots; bf16/fp16 round their operands.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _inputs(device, dtype, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, S, P, D, T = 3, 8, 2, 16, 8, 64, 3

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :5] = False
    return dict(q=randn(B, Hq, L, D), k=randn(B, Hkv, S, D), v=randn(B, Hkv, S, D),
                prefix_k=randn(T, Hkv, P, D), prefix_v=randn(T, Hkv, P, D),
                prefix_index=torch.tensor([2, 0, 2], device=device),
                prefix_lengths=torch.tensor([8, 3, 5], device=device), key_padding_mask=mask.to(device))


def _run(prefix_attention, inputs, with_grad):
    if not with_grad:
        with torch.no_grad():
            return [prefix_attention(**inputs)]
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in GRAD_NAMES}
    out = prefix_attention(**{**inputs, **leaves})
    out.backward(torch.ones_like(out) / out.numel() ** 0.5 + out.detach())
    return [out.detach()] + [leaves[n].grad for n in GRAD_NAMES]


def _paged(inputs, block_size=4):
    """The decode case of ``_inputs`` as paged decode: each row's real keys (its padding dropped), in order, in a
    pool of ``block_size``-token blocks shuffled across the rows. It sees the same keys, so it has the same result."""
    k, v, mask = inputs["k"], inputs["v"], inputs["key_padding_mask"]
    B, Hkv, S, D = k.shape
    per_row = -(-S // block_size)
    block_table = torch.randperm(B * per_row, generator=torch.Generator().manual_seed(1)).view(B, per_row)
    key_cache, value_cache = k.new_zeros(B * per_row, Hkv, block_size, D), v.new_zeros(B * per_row, Hkv, block_size, D)
    for b in range(B):
        for j, s in enumerate(mask[b].nonzero().flatten().tolist()):
            key_cache[block_table[b, j // block_size], :, j % block_size] = k[b, :, s]
            value_cache[block_table[b, j // block_size], :, j % block_size] = v[b, :, s]
    return dict(q=inputs["q"], key_cache=key_cache, value_cache=value_cache,
                block_table=block_table.to(device=k.device, dtype=torch.int32),
                seq_lens=mask.sum(1).to(torch.int32), prefix_k=inputs["prefix_k"], prefix_v=inputs["prefix_v"],
                prefix_index=inputs["prefix_index"], prefix_lengths=inputs["prefix_lengths"])


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # Triton fixes its interpreter mode when first imported; fastpeft's own import does not import it.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .ops import backend_table, paged_prefix_decode, prefix_attention, registry
    from .ops.backends.base import Case

    print(f"prefix_attention backends for {device} tensors (dispatch order):")
    for name, available, why in backend_table(torch.device(device)):
        print(f"  {name:<10} {'yes' if available else 'no ':<4} {why}")
    print()

    modes = {"training": (16, True), "decode": (1, False), "paged": (1, False)}

    def attention(mode, device, dtype):
        """``(function, inputs, with_grad)`` of one case."""
        L, grad = modes[mode]
        inputs = _inputs(device, dtype, L)
        return (paged_prefix_decode, _paged(inputs), False) if mode == "paged" else (prefix_attention, inputs, grad)

    # Every backend on every case it supports here: float32, and bfloat16 where it is not interpreted.
    runs = []
    for name in registry.NAMES:
        dtypes = (torch.float32,) if name == "reference" or (name == "triton" and device == "cpu") else (
            torch.float32, torch.bfloat16)
        runs += [(name, device, dtype, mode) for dtype in dtypes for mode, (L, grad) in modes.items()
                 if registry.get(name).supports(Case(torch.device(device), dtype, decode=not grad, bias=False)) is None]

    os.environ["FASTPEFT_BACKEND"] = "reference"
    # Paged decode sees exactly the decode case's keys: its float64 result is the dense decode's.
    expected = {mode: _run(*attention(mode, "cpu", torch.float64)) for mode in ("training", "decode")}
    expected["paged"] = expected["decode"]
    ok = True
    print("prefix_attention self-check (B=3, Hq=8, Hkv=2, S=16, ragged table of P<=8, D=64, left padding)")
    print(f"{'backend':<10} {'device':<6} {'dtype':<9} {'case':<9} max rel. error vs float64")
    for backend, dev, dtype, mode in runs:
        what = "out, dq, dk, dv, dprefix_k, dprefix_v" if modes[mode][1] else "out"
        os.environ["FASTPEFT_BACKEND"] = backend
        name = str(dtype).split(".")[-1]
        try:
            got = _run(*attention(mode, dev, dtype))
            err = max(_rel(g.cpu(), e) for g, e in zip(got, expected[mode]))
            status = "ok" if err < TOLERANCE[dtype] else "MISMATCH"
            ok &= status == "ok"
            print(f"{backend:<10} {dev:<6} {name:<9} {mode:<9} {err:.2e}  {status}  ({what})")
        except Exception as exc:  # report every backend, then fail
            ok = False
            print(f"{backend:<10} {dev:<6} {name:<9} {mode:<9} FAILED: {exc.__class__.__name__}: {exc}")
    print("all backends agree with float64" if ok else "self-check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
