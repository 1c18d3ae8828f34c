"""Build decisions of setup.py, the pure-Python wheel (FASTPEFT_BUILD_CUDA=0 FASTPEFT_BUILD_CPU=0), and the
messages of the lazy extension loaders."""

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_module():
    # Imported under another name than __main__, setup.py defines its helpers without calling setup().
    spec = importlib.util.spec_from_file_location("fastpeft_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_cuda_0_never_builds(setup_module):
    assert setup_module.build_cuda_decision({"FASTPEFT_BUILD_CUDA": "0"}) == (False, False, "FASTPEFT_BUILD_CUDA=0")


def test_build_cuda_rejects_unknown_values(setup_module):
    with pytest.raises(RuntimeError, match="FASTPEFT_BUILD_CUDA"):
        setup_module.build_cuda_decision({"FASTPEFT_BUILD_CUDA": "yes"})


def test_build_cuda_auto_follows_torch_and_nvcc(setup_module):
    import torch

    build, forced, reason = setup_module.build_cuda_decision({})
    assert not forced
    if torch.version.cuda is None:
        assert (build, reason) == (False, "torch was built without CUDA")
    else:
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = shutil.which("nvcc") or (CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists())
        assert build == bool(nvcc), reason


def test_build_cpu_follows_the_flag_and_torch(setup_module):
    assert setup_module.build_cpu_decision({"FASTPEFT_BUILD_CPU": "0"}) == (False, False, "FASTPEFT_BUILD_CPU=0")
    assert setup_module.build_cpu_decision({}) == (True, False, "torch importable")
    assert setup_module.build_cpu_decision({"FASTPEFT_BUILD_CPU": "1"})[:2] == (True, True)
    with pytest.raises(RuntimeError, match="FASTPEFT_BUILD_CPU"):
        setup_module.build_cpu_decision({"FASTPEFT_BUILD_CPU": "auto"})


@pytest.mark.skipif(os.environ.get("FASTPEFT_REQUIRE_CPU_EXTENSION") != "1",
                    reason="only where the install built it on purpose (.ci/run sets FASTPEFT_REQUIRE_CPU_EXTENSION=1)")
def test_cpu_extension_is_built_and_loads():
    from fastpeft import _backend

    module, reason = _backend.cpu_extension()
    assert module is not None, reason
    assert _backend.cpu_extension_enabled()


def test_max_jobs_is_bounded_by_cores(setup_module):
    jobs = setup_module.default_max_jobs()
    assert 1 <= jobs <= (os.cpu_count() or 1)


def _source_tree(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("fastpeft", "fastpeft_kernels", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return source


def _build_wheel(source, out, **flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTPEFT_BUILD_")}
    env.update(flags)
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(out), str(source)], capture_output=True, text=True, env=env, timeout=300)


def test_wheel_without_cuda_holds_every_module_and_no_extension(tmp_path):
    source = _source_tree(tmp_path)
    result = _build_wheel(source, tmp_path / "dist", FASTPEFT_BUILD_CUDA="0", FASTPEFT_BUILD_CPU="0")
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("fastpeft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"fastpeft/{p.relative_to(ROOT / 'fastpeft').as_posix()}" for p in (ROOT / "fastpeft").rglob("*.py")}
    expected |= {f"fastpeft/kernels/{p.name}" for p in (ROOT / "fastpeft_kernels").glob("*.py")}
    assert "fastpeft/kernels/prefix_decode.py" in expected
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert not [n for n in names if n.endswith(".so")], "an extension was built with FASTPEFT_BUILD_*=0"


def test_a_failed_cpu_extension_build_warns_unless_forced(tmp_path):
    source = _source_tree(tmp_path)
    kernel = source / "csrc" / "cpu" / "short_prefix_attention.cpp"
    kernel.write_text("#error a compiler that cannot build it\n" + kernel.read_text())
    result = _build_wheel(source, tmp_path / "dist", FASTPEFT_BUILD_CUDA="0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "building the CPU extension fastpeft._cpu failed" in result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("fastpeft-*.whl")
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")]
    forced = _build_wheel(source, tmp_path / "forced", FASTPEFT_BUILD_CUDA="0", FASTPEFT_BUILD_CPU="1")
    assert forced.returncode != 0 and "a compiler that cannot build it" in forced.stdout + forced.stderr


def test_extension_failure_reasons():
    from fastpeft import _backend

    missing = _backend._extension_failure_reason(ModuleNotFoundError("No module named 'fastpeft._C'",
                                                                     name="fastpeft._C"))
    assert "not built" in missing and "--no-build-isolation" in missing
    abi = _backend._extension_failure_reason(ImportError("_C.so: undefined symbol: _ZN3c106detail14torchCheckFail"))
    assert "rebuild it against the installed torch" in abi and "undefined symbol" in abi
    other = _backend._extension_failure_reason(ImportError("libcudart.so.13: cannot open shared object file"))
    assert "libcudart" in other
    cpu = _backend._extension_failure_reason(ModuleNotFoundError("No module named 'fastpeft._cpu'",
                                                                 name="fastpeft._cpu"), "fastpeft._cpu")
    assert cpu.startswith("fastpeft._cpu is not built") and "FASTPEFT_BUILD_CPU" in cpu


@pytest.mark.skipif(importlib.util.find_spec("fastpeft._C") is not None, reason="the extension is built here")
def test_missing_cuda_extension_warns_once_and_never_raises():
    from fastpeft import _backend

    _backend.cuda_extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = _backend.cuda_extension()
            second = _backend.cuda_extension()
        assert first[0] is None and first == second
        assert len([w for w in caught if "CUDA extension unavailable" in str(w.message)]) == 1
    finally:
        _backend.cuda_extension.cache_clear()


def test_missing_cpu_extension_warns_once_and_runs_python(monkeypatch):
    import fastpeft
    from fastpeft import _backend
    from fastpeft.ops.backends import sdpa_short
    from tests.cases import CASES, make_inputs

    expected = fastpeft.prefix_attention(**make_inputs(CASES[0], seed=1))
    real_import_module = importlib.import_module

    def import_module(name, *args):
        if name == "fastpeft._cpu":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import_module(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    _backend.cpu_extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not sdpa_short.compiled()
            out = fastpeft.prefix_attention(**make_inputs(CASES[0], seed=1))
        assert len([w for w in caught if "CPU extension unavailable" in str(w.message)]) == 1
        assert (out - expected).abs().max().item() < 1e-5
    finally:
        _backend.cpu_extension.cache_clear()
