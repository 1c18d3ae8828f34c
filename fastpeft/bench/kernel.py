"""Kernel suite: ``fastpeft.prefix_attention`` against the ways attention with a prefix is computed today.

Providers, all on the same inputs in the same process:

- ``fastpeft[<backend>]``: the fused op (the backend the dispatcher picks here: triton/cuda on a GPU, ``sdpa``
  on CPU: PyTorch's fused attention ops on the prefix and on the keys, merged by log-sum-exp).
- ``peft-concat``: what PEFT + transformers do with SDPA: the shared prefix expanded to every row and
  concatenated with the keys/values, the kv heads repeated for GQA (transformers' ``repeat_kv``), and SDPA
  with a materialized boolean mask ``[B, 1, L, P+S]`` (built once per shape, outside the timing, as
  transformers builds it once per forward for all layers).
- ``flex``: ``torch.nn.attention.flex_attention``, compiled, over the same concatenation with a
  prefix-causal block mask (prefix always visible, bottom-right causal on the keys). CUDA only: FlexAttention
  has no backward on CPU, so the CPU smoke run skips it with a note.
- ``sdpa-no-prefix``: SDPA on the sequence alone (``is_causal``, native GQA): the speed of light, the same
  attention without the prefix's ``P`` extra keys. It computes something else, so it has no parity.

Modes: ``fwd`` (forward with inputs requiring grad, as in training), ``bwd`` (the backward of a retained
graph), ``fwd+bwd``. Metrics: time (ms, median and 20/80 percentiles), TFLOP/s (see
``harness.attention_flops``), peak memory (CUDA: allocator peak; CPU: ``peak_rss``, the resident-set
high-water mark above the resident set before the call, measured in a subprocess where glibc maps every
allocation over 64 KiB separately so that freed tensors leave the resident set: approximate, Linux only), speedup
over ``peft-concat``, and parity: the relative
error of the output (fwd) or the worst of the five input gradients (bwd) against the PyTorch reference one
precision above the inputs (float64 for float32, float32 for bf16/fp16), measured on the first two rows of
the batch (the reference materializes the scores).
"""

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from . import harness

SUITE = "kernel"
MODES = ("fwd", "bwd", "fwd+bwd")
BASELINE = "peft-concat"
PARITY_ROWS = 2

MAIN_SHAPE = dict(B=8, Hq=32, Hkv=8, L=2048, P=128, D=128, dtype="bfloat16")
"""The shape of issue #7: a 7B-class attention layer, prefix tuning with 128 virtual tokens."""

GPU_SHAPES = [
    MAIN_SHAPE,
    {**MAIN_SHAPE, "D": 64},
    {**MAIN_SHAPE, "L": 512},
    {**MAIN_SHAPE, "L": 4096},
    {**MAIN_SHAPE, "P": 16},
    {**MAIN_SHAPE, "P": 512},
    {**MAIN_SHAPE, "dtype": "float16"},
]
CPU_SHAPES = [  # issue 11's CPU targets: >= 1.0x PEFT at L=512, >= 1.5x at L=2048
    dict(B=2, Hq=8, Hkv=2, L=512, P=128, D=64, dtype="float32"),
    dict(B=2, Hq=8, Hkv=2, L=2048, P=128, D=64, dtype="float32"),
    dict(B=2, Hq=8, Hkv=2, L=512, P=128, D=64, dtype="bfloat16"),
    dict(B=2, Hq=8, Hkv=2, L=2048, P=128, D=64, dtype="bfloat16"),
]
CPU_QUICK_SHAPES = [dict(B=2, Hq=4, Hkv=2, L=64, P=16, D=32, dtype="float32")]


def shapes_for(device, quick):
    if device.type == "cuda":
        return GPU_SHAPES[:1] if quick else GPU_SHAPES
    return CPU_QUICK_SHAPES if quick else CPU_SHAPES


def shape_label(shape):
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[shape["dtype"]]
    return (f"{short} B{shape['B']} H{shape['Hq']}/{shape['Hkv']} L{shape['L']} P{shape['P']} D{shape['D']}")


def make_inputs(shape, device, seed=0):
    """Random q ``[B,Hq,L,D]``, k/v ``[B,Hkv,L,D]``, a shared prefix ``[Hkv,P,D]`` and an output gradient, all
    requiring grad (self-attention over the sequence: S = L, causal)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, shape["dtype"])
    B, Hq, Hkv, L, P, D = (shape[k] for k in ("B", "Hq", "Hkv", "L", "P", "D"))

    def randn(*dims):
        return torch.randn(*dims, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    inputs = [randn(B, Hq, L, D), randn(B, Hkv, L, D), randn(B, Hkv, L, D), randn(Hkv, P, D), randn(Hkv, P, D)]
    dout = torch.randn(B, Hq, L, D, generator=g).to(device=device, dtype=dtype)
    return inputs, dout


def prefix_causal_mask(B, L, S, P, device):
    """Boolean ``[B, 1, L, P+S]``, True = visible: every prefix entry, and keys ``j <= S-L+i`` (what
    transformers materializes for PEFT's prefix under SDPA)."""
    keys = torch.arange(S, device=device)
    causal = keys[None, :] <= (torch.arange(L, device=device)[:, None] + (S - L))
    mask = torch.cat([torch.ones(L, P, dtype=torch.bool, device=device), causal], dim=1)
    return mask[None, None].expand(B, 1, L, P + S).contiguous()


def _expand_concat(k, v, prefix_k, prefix_v):
    B = k.shape[0]
    keys = torch.cat([prefix_k.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([prefix_v.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
    return keys, values


def repeat_kv(x, groups):
    """``[B, Hkv, S, D]`` -> ``[B, Hkv*groups, S, D]``, each kv head repeated for its query heads."""
    if groups == 1:
        return x
    B, Hkv, S, D = x.shape
    return x[:, :, None].expand(B, Hkv, groups, S, D).reshape(B, Hkv * groups, S, D)


def fastpeft_provider(device):
    """(label, forward) for the fused op, labelled with the backend the dispatcher picks here."""
    from ..ops import prefix_attention
    from ..ops.registry import select

    backend = select(torch.device(device), torch.float32, decode=False, bias=False)

    def forward(q, k, v, prefix_k, prefix_v):
        return prefix_attention(q, k, v, prefix_k, prefix_v, causal=True)
    return f"fastpeft[{backend}]", forward


def peft_concat_provider(shape, device):
    B, L, P = shape["B"], shape["L"], shape["P"]
    groups = shape["Hq"] // shape["Hkv"]
    mask = prefix_causal_mask(B, L, L, P, device)

    def forward(q, k, v, prefix_k, prefix_v):
        keys, values = _expand_concat(k, v, prefix_k, prefix_v)
        return F.scaled_dot_product_attention(q, repeat_kv(keys, groups), repeat_kv(values, groups),
                                              attn_mask=mask)
    return BASELINE, forward


def flex_provider(shape, device):
    """(label, forward), or raises when FlexAttention is unavailable here."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L, P = shape["L"], shape["P"]
    S = L

    def prefix_causal(batch, head, q_idx, kv_idx):
        return (kv_idx < P) | (kv_idx - P <= q_idx + (S - L))

    block_mask = create_block_mask(prefix_causal, B=None, H=None, Q_LEN=L, KV_LEN=P + S, device=device)
    # Every shape (and the parity sub-batch) compiles anew; start from empty caches so the suite's many shapes
    # never hit dynamo's recompile limit, past which flex_attention silently runs unfused.
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=False)

    def forward(q, k, v, prefix_k, prefix_v):
        keys, values = _expand_concat(k, v, prefix_k, prefix_v)
        return compiled(q, keys, values, block_mask=block_mask, enable_gqa=True)
    return "flex", forward


def sdpa_provider():
    def forward(q, k, v, prefix_k, prefix_v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return "sdpa-no-prefix", forward


def _reference_forward(q, k, v, prefix_k, prefix_v):
    """The float32 PyTorch reference of the fused op (``fastpeft.ops.reference``), differentiable."""
    from ..ops.reference import reference_prefix_attention

    B, T = q.shape[0], 1
    index = torch.zeros(B, dtype=torch.int32, device=q.device)
    lengths = torch.full((T,), prefix_k.shape[1], dtype=torch.int32, device=q.device)
    return reference_prefix_attention(q, k, v, prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), index, lengths,
                                      None, True, q.shape[-1] ** -0.5)


def reference_dtype(dtype):
    """The precision of the parity reference: one step above the inputs' (float64 for float32 inputs, float32
    for bfloat16/float16 ones, whose kernels accumulate in float32)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _parity(forward, inputs, dout):
    """(forward error, worst gradient error) of ``forward`` against the PyTorch reference computed in
    ``reference_dtype``, on the first ``PARITY_ROWS`` rows."""
    rows = [x[:PARITY_ROWS].detach().requires_grad_(True) for x in inputs[:3]]
    prefix = [x.detach().requires_grad_(True) for x in inputs[3:]]
    sub_inputs, sub_dout = rows + prefix, dout[:PARITY_ROWS]
    out = forward(*sub_inputs)
    grads = torch.autograd.grad(out, sub_inputs, sub_dout)
    ref_dtype = reference_dtype(inputs[0].dtype)
    ref_inputs = [x.detach().to(ref_dtype).requires_grad_(True) for x in sub_inputs]
    ref_out = _reference_forward(*ref_inputs)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, sub_dout.to(ref_dtype))
    forward_error = harness.relative_error(out, ref_out)
    grad_error = max(harness.relative_error(g, r) for g, r in zip(grads, ref_grads))
    return forward_error, grad_error


def _measure(recorder, shape, label, forward, inputs, dout, device, quick, baseline_ms, with_parity):
    B, Hq, L, P, D = (shape[k] for k in ("B", "Hq", "L", "P", "D"))
    S = L
    prefix_keys = P if label != "sdpa-no-prefix" else 0
    parity = _parity(forward, inputs, dout) if with_parity else None

    differentiated = inputs if prefix_keys else inputs[:3]  # without a prefix, only q, k, v are used

    def run_fwd():
        return forward(*inputs)

    def run_fwd_bwd():
        return torch.autograd.grad(forward(*inputs), differentiated, dout)

    retained = forward(*inputs)

    def run_bwd():
        return torch.autograd.grad(retained, differentiated, dout, retain_graph=True)

    for mode, fn in (("fwd", run_fwd), ("bwd", run_bwd), ("fwd+bwd", run_fwd_bwd)):
        case = f"{shape_label(shape)} {mode}"
        record_shape = {**shape, "S": S, "causal": True, "mode": mode}
        timing = harness.time_fn(fn, device, quick)
        recorder.add_time(SUITE, case, record_shape, label, timing)
        flops = harness.attention_flops(B, Hq, L, S, prefix_keys, D, True, mode)
        recorder.add(SUITE, case, record_shape, label, "throughput", flops / (timing.median_ms * 1e-3) / 1e12,
                     "TFLOP/s")
        if mode != "bwd":
            peak = harness.peak_memory_bytes(fn, device)
            if peak is not None:
                recorder.add(SUITE, case, record_shape, label, "peak_memory", peak / 2**20, "MiB")
        if mode in baseline_ms and label != BASELINE:
            recorder.add(SUITE, case, record_shape, label, "speedup", baseline_ms[mode] / timing.median_ms, "x")
        if label == BASELINE:
            baseline_ms[mode] = timing.median_ms
        if parity is not None:
            recorder.add(SUITE, case, record_shape, label, "parity", parity[0] if mode == "fwd" else parity[1],
                         "rel", reference=f"{str(reference_dtype(inputs[0].dtype)).replace('torch.', '')} "
                                          f"PyTorch reference, first {PARITY_ROWS} rows")
    del retained


def run(recorder, device, quick=False):
    """Measure every provider on every shape for this device; failures become notes, never abort the suite."""
    if device.type != "cuda":
        recorder.note("flex: skipped on CPU (FlexAttention has no CPU backward; it is compared on CUDA)")
    for shape in shapes_for(device, quick):
        recorder.log(f"[kernel] {shape_label(shape)}")
        inputs, dout = make_inputs(shape, device)
        baseline_ms = {}
        builders = [(BASELINE, lambda: peft_concat_provider(shape, device)),
                    ("fastpeft", lambda: fastpeft_provider(device))]
        if device.type == "cuda":
            builders.append(("flex", lambda: flex_provider(shape, device)))
        builders.append(("sdpa-no-prefix", sdpa_provider))
        for label, build in builders:
            try:
                label, forward = build()
                _measure(recorder, shape, label, forward, inputs, dout, device, quick, baseline_ms,
                         with_parity=label != "sdpa-no-prefix")
            except Exception as exc:  # a provider missing or failing here must not hide the others' numbers
                recorder.note(f"{label} on {shape_label(shape)}: {exc.__class__.__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if device.type == "cpu" and not quick:
            _record_cpu_peak_rss(recorder, shape)


# ----------------------------------------------------------------------------------------------------------
# CPU peak memory: the resident-set high-water mark, in a subprocess whose allocator returns freed memory


def _record_cpu_peak_rss(recorder, shape):
    """Run ``python -m fastpeft.bench.kernel SHAPE`` and record its per-provider peaks (metric ``peak_rss``)."""
    try:
        result = subprocess.run([sys.executable, "-m", "fastpeft.bench.kernel", json.dumps(shape)],
                                capture_output=True, text=True, timeout=600, env=dict(os.environ))
        peaks = json.loads(result.stdout.strip().splitlines()[-1])
    except Exception as exc:  # no /proc, a failed child: the other numbers stand without it
        recorder.note(f"peak_rss on {shape_label(shape)}: not measured ({exc.__class__.__name__}: {exc})")
        return
    for label, by_mode in peaks.items():
        for mode, peak in by_mode.items():
            record_shape = {**shape, "S": shape["L"], "causal": True, "mode": mode}
            recorder.add(SUITE, f"{shape_label(shape)} {mode}", record_shape, label, "peak_rss", peak / 2**20,
                         "MiB", method="VmHWM - VmRSS before the call, glibc mmap threshold 64 KiB")


def _status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


def _peak_rss_bytes(fn):
    """Resident-set high-water mark of ``fn()`` above the resident set before it (its result kept alive)."""
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set
    result = fn()
    peak = _status_bytes("VmHWM")
    del result
    return max(peak - before, 0)


def _peak_rss_main(shape):
    """Child of ``_record_cpu_peak_rss``: prints ``{provider: {mode: bytes}}`` as one JSON line."""
    import ctypes
    import gc

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)   # M_MMAP_THRESHOLD: fixed (no dynamic growth), so big tensors are unmapped on free
    libc.mallopt(-1, 0)           # M_TRIM_THRESHOLD: give the heap's top back at once
    device = torch.device("cpu")
    inputs, dout = make_inputs(shape, device)
    peaks = {}
    for label, forward in (peft_concat_provider(shape, device), fastpeft_provider(device)):
        modes = {"fwd": lambda: forward(*inputs),
                 "fwd+bwd": lambda: torch.autograd.grad(forward(*inputs), inputs, dout)}
        peaks[label] = {}
        for mode, fn in modes.items():
            fn()  # warm-up: thread pools, one-time buffers
            gc.collect()
            peaks[label][mode] = _peak_rss_bytes(fn)
    print(json.dumps(peaks))


if __name__ == "__main__":
    _peak_rss_main(json.loads(sys.argv[1]))
