"""Ceilings of this machine, to read every other number as a fraction of what the hardware does:

- copy bandwidth: a large device-to-device copy, GB/s counting the bytes read plus the bytes written;
- matmul throughput: a large square matmul (bfloat16 on CUDA, float32 on CPU), TFLOP/s at 2*n^3 FLOPs.

The serving suite divides the decode kernel's achieved bandwidth by the copy bandwidth measured here.
"""

import torch

from . import harness

SUITE = "ceilings"


def sizes(device, quick):
    """(bytes of the copied buffer, matmul n, matmul dtype)."""
    if device.type == "cuda":
        return (256 if quick else 1024) * 2**20, 4096 if quick else 8192, torch.bfloat16
    return (16 if quick else 128) * 2**20, 256 if quick else 1024, torch.float32


def measure_copy(device, nbytes, quick):
    """(timing, GB/s) of copying ``nbytes`` into another buffer on ``device``."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    timing = harness.time_fn(lambda: target.copy_(source), device, quick)
    return timing, 2 * nbytes / (timing.median_ms * 1e-3) / 1e9


def measure_matmul(device, n, dtype, quick):
    """(timing, TFLOP/s) of an ``n x n`` by ``n x n`` matmul."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    timing = harness.time_fn(lambda: a @ b, device, quick)
    return timing, 2.0 * n**3 / (timing.median_ms * 1e-3) / 1e12


def run(recorder, device, quick=False):
    """Record the copy bandwidth and matmul throughput; returns ``{"copy_gbps": ..., "matmul_tflops": ...}``."""
    nbytes, n, dtype = sizes(device, quick)
    recorder.log(f"[ceilings] copy {nbytes // 2**20} MiB, matmul {n}^3 {str(dtype).replace('torch.', '')}")
    copy_shape = {"bytes": nbytes}
    timing, gbps = measure_copy(device, nbytes, quick)
    recorder.add_time(SUITE, "device copy", copy_shape, "torch", timing)
    recorder.add(SUITE, "device copy", copy_shape, "torch", "achieved", gbps, "GB/s")
    matmul_shape = {"n": n, "dtype": str(dtype).replace("torch.", "")}
    case = f"matmul {n}^3 {matmul_shape['dtype']}"
    timing, tflops = measure_matmul(device, n, dtype, quick)
    recorder.add_time(SUITE, case, matmul_shape, "torch", timing)
    recorder.add(SUITE, case, matmul_shape, "torch", "achieved", tflops, "TFLOP/s")
    return {"copy_gbps": gbps, "matmul_tflops": tflops}
