"""The static kernel report (benchmarks/static_report.py): the Triton kernels compiled for sm_90a without a GPU,
with the launch arguments bound as a real launch binds them (alignment, value specializations).

Fails when a config the launchers keep at the main benchmark shape (bf16, D=128) spills registers, when a tile
of 64 or more MMA rows compiles to mma.sync instead of wgmma, or when the default (fused) backward does more than
5 matmuls per block pair. The edge shape (float32, D=40, L = T = group = 1) catches the compile errors the
interpreter cannot see. Needs Triton's NVIDIA backend (it ships ptxas and cuobjdump); skipped without it.
The compiles run in two processes without TRITON_INTERPRET (this session decorated the kernels for the
interpreter), the forward and the default backward only, to stay within a minute on two cores; the committed
reports (benchmarks/results/static-*) cover every call and shape."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_static_report():
    """benchmarks/static_report.py (a developer tool beside its script, not an installed module)."""
    spec = importlib.util.spec_from_file_location("static_report", ROOT / "benchmarks" / "static_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


static = _load_static_report()


def _toolchain():
    try:
        import triton.backends
        from triton.backends.nvidia import compiler

        return "nvidia" in triton.backends.backends and os.path.exists(compiler.get_ptxas(90).path)
    except Exception:   # no NVIDIA backend, or its bundled tools missing
        return False


needs_toolchain = pytest.mark.skipif(not _toolchain(), reason="Triton's NVIDIA backend (ptxas) is not installed")


def _report(*args, shards=2):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "bench_static.py"), *args, "--json-only",
                               "--shard", f"{i}/{shards}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT) for i in range(shards)]
    parts = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
        parts.append(json.loads(out))
    return static.merge_reports(parts)


@pytest.fixture(scope="module")
def main_report():
    return _report("--shapes", "main", "--calls", "fwd,bwd[fused]")


def _entries(report, kernel=None, call=None):
    return [e for shape in report["shapes"] for e in shape["kernels"]
            if (kernel is None or static._short_name(e["kernel"]) == kernel) and (call is None or call in e["calls"])]


@needs_toolchain
def test_kept_configs_do_not_spill_and_keep_wgmma(main_report):
    assert _entries(main_report, "fwd") and _entries(main_report, "bwd_dkdv")
    assert static.check(main_report) == []


@needs_toolchain
def test_fused_backward_does_five_matmuls_per_block_pair(main_report):
    fused = _entries(main_report, call="bwd[fused]")
    assert not [e for e in fused if static._short_name(e["kernel"]) == "bwd_dq"], "the fused backward runs no dq pass"
    for e in fused:
        if static._short_name(e["kernel"]) in ("bwd_dkdv", "bwd_prefix_dkdv"):
            assert e["dots_per_loop"] and set(e["dots_per_loop"]) == {5}, (e["kernel"], e["config"], e["dots_per_loop"])
            assert any(name.startswith("red.") or name.startswith("atom.") for name in e["atomics"]), e["kernel"]


@needs_toolchain
def test_compiled_as_a_real_launch(main_report):
    # Bound through Triton's binder, the aligned bf16 operands load with 16-byte cp.async into a 3-stage ring (the
    # old hand-made signature compiled to scalar loads and half the shared memory).
    fwd = [e for e in _entries(main_report, "fwd") if e["config"]["BLOCK_M"] == 128 and e["config"]["BLOCK_N"] == 64
           and e["config"]["num_stages"] == 3]
    assert fwd, "the 128x64 forward config is no longer kept at the main shape"
    assert fwd[0]["cp_async_by_bytes"].get("16") and fwd[0]["shared_bytes"] >= 131072 and fwd[0]["mma"] == "wgmma"
    assert "T" in fwd[0]["specialized_to_1"]   # a shared prefix is a table of one entry


@needs_toolchain
def test_prefix_gradients_fill_the_machine(main_report):
    for e in _entries(main_report, "bwd_prefix_dkdv", call="bwd[fused]"):
        assert e["grid"][1] > 1 and e["waves"] >= 1, (e["config"], e["grid"], e["waves"])


@needs_toolchain
def test_edge_shape_compiles():
    report = _report("--shapes", "edge", "--quick")
    kernels = {static._short_name(e["kernel"]) for e in _entries(report)}
    assert {"fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq", "bwd_prefix_dkdv", "grad_reduce"} <= kernels
    assert {"L", "T", "group"} <= set(_entries(report, "fwd")[0]["specialized_to_1"])


# The parsers, on hand-written text (no toolchain needed).

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/                   FFMA R2, R3, R4, -R5 ;
        /*0030*/                   MUFU.EX2 R2, R2 ;
        /*0040*/              @!P0 BRA 0x10 ;
        /*0050*/                   FMUL R6, R6, R7 ;
        /*0060*/                   STL [R1], R6 ;
        /*0070*/                   EXIT ;
"""

PTX = """
	cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;
	@%p1 ld.global.v4.b32 { %r3, %r4, %r5, %r6 }, [ %rd2 + 0 ];
	ld.global.b32 %r7, [ %rd3 + 0 ];
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r8}, %rd4, %rd5, 1, 1, 1, 0, 1;
	red.global.gpu.relaxed.add.v4.f32 [ %rd6 + 0 ], { %r9, %r10, %r11, %r12 };
"""


def test_sass_loop_mix():
    loops = static.sass_loops(static.sass_instructions(SASS))
    assert len(loops) == 1 and loops[0]["instructions"] == 4
    assert loops[0]["mix"]["mma"] == 1 and loops[0]["mix"]["ffma"] == 1 and loops[0]["mix"]["mufu"] == 1


def test_ptx_features():
    f = static.ptx_features(PTX)
    assert f["mma"] == "wgmma" and f["mma_shapes"] == ["m64n64k16"]
    assert f["cp_async_by_bytes"] == {"16": 1} and f["ld_global_by_bytes"] == {"4": 1, "16": 1}
    assert f["atomics"] == {"red.global.gpu.relaxed.add.v4.f32": 1}


def test_occupancy_by_registers_and_shared_memory():
    # 236 registers x 256 threads round to 61440 of 65536: one CTA; 131072 B + 1 KB of 233472: one CTA.
    assert static.occupancy("sm_90a", 236, 131072, 8) == {"by_registers": 1, "by_shared": 1, "by_warps": 8,
                                                          "ctas_per_sm": 1}
    assert static.occupancy("sm_90a", 128, 49152, 4)["ctas_per_sm"] == 4
