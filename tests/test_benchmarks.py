"""The benchmark harness and suites: FLOP/byte counts against brute force, the baselines' numerics against the
float64 concatenation reference, the results schema, and ``fastpeft bench --quick`` end to end (JSON + PNG)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastpeft.bench import harness, kernel
from tests.reference import concat_reference
from tests.test_cli import user_environment

TIMEOUT_S = 240


def test_visible_keys_and_flops_match_a_brute_force_count():
    for L, S, P, causal in ((5, 5, 3, True), (3, 7, 2, True), (4, 6, 0, False), (1, 9, 4, True)):
        mask = kernel.prefix_causal_mask(1, L, S, P, "cpu")[0, 0] if causal else torch.ones(L, P + S, dtype=torch.bool)
        B, Hq, D = 2, 4, 8
        # each visible (query, key) pair costs one D-long dot product for the scores and one for the output
        brute = 2 * 2 * B * Hq * D * int(mask.sum())
        assert harness.attention_flops(B, Hq, L, S, P, D, causal, "fwd") == pytest.approx(brute)
        assert harness.attention_flops(B, Hq, L, S, P, D, causal, "bwd") == pytest.approx(2.5 * brute)
        assert harness.attention_flops(B, Hq, L, S, P, D, causal, "fwd+bwd") == pytest.approx(3.5 * brute)


def test_prefix_causal_mask_is_bottom_right_aligned():
    mask = kernel.prefix_causal_mask(2, 2, 5, 2, "cpu")
    assert mask.shape == (2, 1, 2, 7)
    expected = torch.tensor([[1, 1, 1, 1, 1, 1, 0],   # query 0 sits at key position 3
                             [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[1, 0], expected)


def test_decode_bytes_counts_each_tensor_once():
    B, Hq, Hkv, S, D, T, P = 3, 8, 2, 10, 16, 2, 4
    elements = (B * Hq * D) * 2 + (B * Hkv * S * D) * 2 + (T * Hkv * P * D) * 2  # q+out, k+v, prefix k+v
    assert harness.decode_bytes(B, Hq, Hkv, S, D, T, P, 2) == 2 * elements


def test_timing_quantiles_are_ordered():
    timing = harness._timing_from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (timing.p20_ms, timing.median_ms, timing.p80_ms) == (1.8, 3.0, 4.2)
    calls = []
    timing = harness.time_cpu(lambda: calls.append(1), warmup=2, min_reps=4, max_reps=4, budget_s=0)
    assert len(calls) == 6 and timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert harness.relative_error(ref + torch.tensor([0.3, 0.4]), ref) == pytest.approx(0.1)
    assert harness.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_baseline_providers_compute_prefix_attention(dtype):
    shape = dict(B=2, Hq=4, Hkv=2, L=9, P=5, D=16, dtype=str(dtype).replace("torch.", ""))
    inputs, _ = kernel.make_inputs(shape, torch.device("cpu"), seed=3)
    expected = concat_reference(*[x.detach() for x in inputs], causal=True)
    for build in (lambda: kernel.peft_concat_provider(shape, "cpu"), lambda: kernel.fastpeft_provider(
            torch.device("cpu"))):
        label, forward = build()
        out = forward(*inputs)
        assert harness.relative_error(out, expected) < (1e-5 if dtype == torch.float32 else 1e-12), label
    # without the prefix, the speed-of-light provider is ordinary causal attention: it must differ
    _, sdpa = kernel.sdpa_provider()
    assert harness.relative_error(sdpa(*inputs), expected) > 1e-3


def _run_record(**overrides):
    record = dict(suite="kernel", case="c", shape={"B": 1}, provider="p", metric="time", value=1.0, unit="ms",
                  quantiles={"p20": 0.5, "p50": 1.0, "p80": 2.0})
    record.update(overrides)
    run = harness.new_run(torch.device("cpu"), True, ["kernel"])
    run["results"].append(record)
    return run


@pytest.mark.parametrize("bad", [dict(value=float("nan")), dict(provider=None),
                                 dict(quantiles={"p20": 2.0, "p50": 1.0, "p80": 3.0}), dict(shape="B=1")])
def test_validate_run_rejects_malformed_records(bad):
    harness.validate_run(_run_record())
    with pytest.raises(ValueError):
        harness.validate_run(_run_record(**bad))


def test_results_never_overwrite_and_render(tmp_path):
    run = _run_record()
    first, second = harness.write_run(run, tmp_path), harness.write_run(run, tmp_path)
    assert first != second and os.path.basename(first) == f"{run['date'][:10]}-cpu.json"
    table = harness.render_markdown(run)
    assert "| c | p | 1.000 |" in table and harness.CPU_NOTE in table


def test_bench_quick_kernel_writes_json_markdown_and_png(tmp_path):
    env = user_environment()
    result = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--quick", "--suite", "kernel",
                             "--device", "cpu", "--out", str(tmp_path / "results")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert harness.CPU_NOTE in result.stdout
    files = sorted(os.listdir(tmp_path / "results"))
    assert len(files) == 3 and [os.path.splitext(f)[1] for f in files] == [".json", ".md", ".png"]
    assert files[0].endswith("-cpu.json") and len({os.path.splitext(f)[0] for f in files}) == 1
    with open(tmp_path / "results" / files[2], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "results" / files[1]).read_text()
    assert "| peft-concat |" in markdown and markdown in result.stdout
    run = json.loads((tmp_path / "results" / files[0]).read_text())
    harness.validate_run(run)
    assert run["device"]["type"] == "cpu" and run["note"] == harness.CPU_NOTE
    assert run["versions"]["torch"] and run["suites"] == ["ceilings", "kernel"]
    records = [r for r in run["results"] if r["suite"] == "kernel"]
    providers = {r["provider"] for r in records}
    assert {"peft-concat", "sdpa-no-prefix"} <= providers
    fused = [p for p in providers if p.startswith("fastpeft[")]
    assert len(fused) == 1
    for provider in ("peft-concat", fused[0]):
        modes = {r["shape"]["mode"] for r in records if r["provider"] == provider and r["metric"] == "time"}
        assert modes == {"fwd", "bwd", "fwd+bwd"}
        parity = [r["value"] for r in records if r["provider"] == provider and r["metric"] == "parity"]
        # float32 computations against the float64 reference: rounding-level, and measured (not a copy)
        assert len(parity) == 3 and 0 < min(parity) and max(parity) < 1e-5
    assert any(r["metric"] == "speedup" and r["provider"] == fused[0] for r in records)
    assert any("flex" in note for note in run["notes"])  # skipped on CPU, and said so


@pytest.mark.gpu
def test_bench_quick_kernel_on_cuda(tmp_path):
    """On a GPU: the fused kernel, PEFT's path, FlexAttention and SDPA all measured in bf16, with parity."""
    result = subprocess.run([sys.executable, "-m", "fastpeft", "bench", "--quick", "--suite", "kernel",
                             "--device", "cuda", "--out", str(tmp_path)], cwd=tmp_path, env=user_environment(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((tmp_path / sorted(p for p in os.listdir(tmp_path) if p.endswith(".json"))[0]).read_text())
    harness.validate_run(run)
    assert run["device"]["type"] == "cuda" and run["note"] is None
    records = [r for r in run["results"] if r["suite"] == "kernel"]
    assert {"peft-concat", "flex", "sdpa-no-prefix"} <= {r["provider"] for r in records}, run["notes"]
    fused = [r for r in records if r["provider"].startswith("fastpeft[")]
    assert fused and fused[0]["provider"] in ("fastpeft[triton]", "fastpeft[cuda]")
    parity = [r["value"] for r in fused if r["metric"] == "parity"]
    assert len(parity) == 3 and max(parity) < 2e-2  # bf16 kernels vs the fp32 reference
    assert all(r["value"] > 0 for r in fused if r["metric"] == "peak_memory")


def test_serve_load_test_quick_agrees_with_peft(tmp_path):
    """The HTTP load test (--quick: 2 and 4 streaming clients): every response equals PEFT's greedy continuation
    (teacher-forced oracle) and the cached PEFT baseline's tokens; the run (the harness's schema) has both sides'
    throughput, time to first token and inter-token latency, the KV bytes the pool's blocks held (never more than the
    slot cache would have) and the server's memory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_serve_http.py"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=root)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (path,) = tmp_path.glob("serve-http-*-cpu.json")
    record = json.loads(path.read_text())
    harness.validate_run(record)
    assert (tmp_path / path.name.replace(".json", ".md")).read_text().count("| 2 clients | fastpeft serve |") == 1
    values = {(r["case"], r["provider"], r["metric"]): r["value"] for r in record["results"]}
    baseline = ("one request at a time", "PEFT + KV cache")
    for case in (("2 clients", "fastpeft serve"), ("4 clients", "fastpeft serve"), baseline):
        for metric in ("throughput", "ttft_p50", "ttft_p99", "itl_p50", "itl_p99", "latency_p50", "latency_p99"):
            assert values[(*case, metric)] > 0, (case, metric)
        assert values[(*case, "ttft_p50")] <= values[(*case, "ttft_p99")]
        if case == baseline:
            continue
        assert values[(*case, "equal_to_peft_forward")] == values[(*case, "equal_to_peft_cached")] == 8
        assert values[(*case, "speedup_vs_peft")] > 0 and values[(*case, "rss_after")] > 0
        assert 0 < values[(*case, "kv_held_peak")] <= values[(*case, "kv_pool")] == values[(*case, "slot_cache")]
        assert record["engine_stats"][case[0].split()[0]]["failed"] == 0