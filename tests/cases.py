"""Random inputs for prefix attention tests (never zeros), over the odd shapes the kernels must handle."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    name: str
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    L: int = 7
    S: int = 7
    P: int = 5
    D: int = 16
    T: int = 0              # 0: shared prefix [Hkv, P, D]; otherwise a table of T entries
    ragged: bool = False    # per-entry prefix lengths, including 0
    padding: str = ""       # "", "left" or "right"
    causal: bool = True

    def __str__(self):
        return self.name


CASES = [
    Case("shared-basic"),
    Case("shared-noncausal", causal=False),
    Case("gqa-8-2", Hq=8, Hkv=2, L=9, S=9, P=6, D=40),
    Case("mqa", Hq=4, Hkv=1, L=6, S=6, P=3, D=64),
    Case("table-ragged", B=4, T=3, P=6, ragged=True, D=24),
    Case("table-ragged-leftpad", B=3, T=3, P=5, ragged=True, padding="left", D=40),
    Case("rightpad-noncausal", B=3, padding="right", causal=False, D=96),
    Case("decode", B=3, L=1, S=9, T=2, ragged=True, padding="left", D=64),
    Case("cache-prefill", B=2, L=4, S=10, P=3, D=128),
    Case("d-odd", B=2, L=5, S=5, P=4, D=59),
    Case("no-prefix-length-zero", B=2, T=1, P=4, ragged=True, D=16),
    Case("empty-prefix-p0", B=2, P=0, D=16, padding="left"),
]


def make_inputs(case, dtype=torch.float32, device="cpu", seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)

    B, Hq, Hkv, L, S, P, D = case.B, case.Hq, case.Hkv, case.L, case.S, case.P, case.D
    q, k, v = randn(B, Hq, L, D), randn(B, Hkv, S, D), randn(B, Hkv, S, D)
    inputs = {"q": q, "k": k, "v": v, "causal": case.causal}
    if case.T:
        inputs["prefix_k"], inputs["prefix_v"] = randn(case.T, Hkv, P, D), randn(case.T, Hkv, P, D)
        inputs["prefix_index"] = torch.randint(0, case.T, (B,), generator=g).to(device)
        inputs["prefix_index"][0] = case.T - 1
        if case.ragged:
            lengths = torch.randint(0, P + 1, (case.T,), generator=g)
            lengths[0] = 0
            lengths[-1] = P
            inputs["prefix_lengths"] = lengths.to(device)
    else:
        inputs["prefix_k"], inputs["prefix_v"] = randn(Hkv, P, D), randn(Hkv, P, D)
    if case.padding:
        mask = torch.ones(B, S, dtype=torch.bool)
        for b in range(1, B):
            pad = min(b * 2, S - 1)
            if case.padding == "left":
                mask[b, :pad] = False
            else:
                mask[b, S - pad:] = False
        inputs["key_padding_mask"] = mask.to(device)
    if requires_grad:
        for name in ("q", "k", "v", "prefix_k", "prefix_v"):
            inputs[name].requires_grad_(True)
    return inputs


GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def forward_and_grads(fn, inputs, dout):
    """Run fn(**inputs), backprop dout, and return (out, {name: grad})."""
    for name in GRAD_NAMES:
        inputs[name].grad = None
    out = fn(**inputs)
    out.backward(dout)
    return out.detach(), {name: inputs[name].grad.detach().clone() for name in GRAD_NAMES}
