"""``python -m fastpeft.selfcheck``: run prefix_attention on every backend this machine has, forward and
backward, on a small GQA case with a ragged prefix table and left padding, and compare each against the
float64 reference path. Exits non-zero if any backend disagrees."""

import os
import sys

import torch

from . import _backend
from .ops.prefix_attention import prefix_attention

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _inputs(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, L, S, P, D, T = 3, 8, 2, 16, 16, 8, 64, 3

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, :5] = False
    return dict(q=randn(B, Hq, L, D), k=randn(B, Hkv, S, D), v=randn(B, Hkv, S, D),
                prefix_k=randn(T, Hkv, P, D), prefix_v=randn(T, Hkv, P, D),
                prefix_index=torch.tensor([2, 0, 2], device=device),
                prefix_lengths=torch.tensor([8, 3, 5], device=device), key_padding_mask=mask.to(device))


def _run(inputs):
    leaves = {n: inputs[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v", "prefix_k", "prefix_v")}
    out = prefix_attention(**{**inputs, **leaves})
    out.backward(torch.ones_like(out) / out.numel() ** 0.5 + out.detach())
    return [out.detach()] + [leaves[n].grad for n in ("q", "k", "v", "prefix_k", "prefix_v")]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        # Must precede the first import of triton: the interpreter mode is fixed then.
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FASTPEFT_BACKEND"] = "reference"
    expected = _run(_inputs("cpu", torch.float64))
    runs = [("reference", device, torch.float32)]
    if _backend.triton_available()[0] and device == "cuda":
        runs += [("triton", "cuda", torch.float32), ("triton", "cuda", torch.bfloat16)]
    elif _backend.triton_available()[0]:
        runs += [("triton", "cpu", torch.float32)]
    ok = True
    print(f"prefix_attention self-check (B=3, Hq=8, Hkv=2, L=S=16, P<=8 ragged table, D=64, left padding)")
    print(f"{'backend':<10} {'device':<6} {'dtype':<9} {'max rel. error (out, dq, dk, dv, dprefix_k, dprefix_v)':<40}")
    for backend, dev, dtype in runs:
        os.environ["FASTPEFT_BACKEND"] = backend
        try:
            got = _run(_inputs(dev, dtype))
            err = max(_rel(g.cpu(), e) for g, e in zip(got, expected))
            status = "ok" if err < TOLERANCE[dtype] else "MISMATCH"
            ok &= status == "ok"
            print(f"{backend:<10} {dev:<6} {str(dtype).split('.')[-1]:<9} {err:.2e}  {status}")
        except Exception as exc:  # report every backend, then fail
            ok = False
            print(f"{backend:<10} {dev:<6} {str(dtype).split('.')[-1]:<9} FAILED: {exc.__class__.__name__}: {exc}")
    print("all backends agree with float64" if ok else "self-check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
