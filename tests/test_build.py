"""Build decisions of setup.py (extensions, C++ standard, missing sources), the sdist's files, the pure-Python wheel
(FASTPEFT_BUILD_CUDA=0 FASTPEFT_BUILD_CPU=0), and the messages of the lazy extension loaders."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


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
    from fastpeft.ops import environment

    module, reason = environment.cpu_extension()
    assert module is not None, reason
    assert environment.cpu_extension_enabled()


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cxx_standard_is_the_one_torch_headers_require(setup_module, tmp_path):
    def headers(root, all_h, aten_h):
        _write(root / "torch/csrc/api/include/torch/all.h",
               f"#pragma once\n#if !defined(_MSC_VER) && __cplusplus < {all_h}L\n"
               f"#error C++{str(all_h)[2:4]} or later compatible compiler is required to use PyTorch.\n#endif\n")
        _write(root / "ATen/ATen.h", f"#if !defined(_MSC_VER) && __cplusplus < {aten_h}L\n"
                                     f"#error C++{str(aten_h)[2:4]} or later compatible compiler is required to use "
                                     "ATen.\n#endif\n")
        return root

    assert setup_module.torch_cxx_standard(headers(tmp_path / "t213", 201703, 201703)) == "c++17"
    assert setup_module.torch_cxx_standard(headers(tmp_path / "t214", 202002, 202002)) == "c++20"
    # the strictest header wins: the extensions include both
    assert setup_module.torch_cxx_standard(headers(tmp_path / "mixed", 201703, 202002)) == "c++20"
    # no statement: no -std flag, torch's BuildExtension adds its default
    _write(tmp_path / "silent" / "ATen/ATen.h", "#pragma once\n")
    assert setup_module.torch_cxx_standard(tmp_path / "silent") is None


def test_cxx_standard_of_the_installed_torch(setup_module):
    import torch

    standard = setup_module.torch_cxx_standard(Path(torch.__file__).parent / "include")
    # torch 2.14 moved from C++17 to C++20 (its headers stop with `#error` below it): the headers say so, and
    # setup.py's flags follow them for both extensions.
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    assert standard == ("c++20" if (major, minor) >= (2, 14) else "c++17")


def test_missing_extension_sources_are_named(setup_module, tmp_path):
    assert setup_module.missing_source_files(ROOT, setup_module.CPU_SOURCES + setup_module.CUDA_SOURCES) == []
    # an sdist made without MANIFEST.in: no csrc/ at all, or the sources without their header
    empty = tmp_path / "empty"
    empty.mkdir()
    assert setup_module.missing_source_files(empty, setup_module.CUDA_SOURCES) == ["csrc/*.cpp", "csrc/*.cu"]
    headless = tmp_path / "headless"
    for name in ("csrc/bindings.cpp", "csrc/prefix_decode.cu"):
        _write(headless / name, (ROOT / name).read_text())
    assert setup_module.missing_source_files(headless, setup_module.CUDA_SOURCES) == ["csrc/prefix_decode.h"]


def test_missing_sources_skip_the_extension_with_a_warning_or_fail_when_forced(setup_module, tmp_path):
    build, forced, reason = setup_module.build_cpu_decision({}, root=tmp_path)
    assert (build, forced) == (False, False) and "csrc/cpu/*.cpp" in reason and "git checkout" in reason
    with pytest.raises(RuntimeError, match=r"FASTPEFT_BUILD_CPU=1 .*csrc/cpu/\*\.cpp"):
        setup_module.build_cpu_decision({"FASTPEFT_BUILD_CPU": "1"}, root=tmp_path)
    # before the checks for CUDA torch and nvcc: the missing files are the cause to report, on any machine
    build, forced, reason = setup_module.build_cuda_decision({}, root=tmp_path)
    assert (build, forced) == (False, False) and "csrc/*.cu" in reason
    with pytest.raises(RuntimeError, match=r"FASTPEFT_BUILD_CUDA=1 .*csrc/\*\.cu"):
        setup_module.build_cuda_decision({"FASTPEFT_BUILD_CUDA": "1"}, root=tmp_path)


def test_max_jobs_is_bounded_by_cores(setup_module):
    jobs = setup_module.default_max_jobs()
    assert 1 <= jobs <= (os.cpu_count() or 1)


def _source_tree(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "constraints.txt"):
        shutil.copy(ROOT / name, source / name)
    for name in ("fastpeft", "fastpeft_kernels", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return source


def _build_wheel(source, out, **flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTPEFT_BUILD_")}
    env.update(flags)
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(out), str(source)], capture_output=True, text=True, env=env, timeout=300)


def _sdist_files(source, out, torch_importable):
    """The files of the sdist that setuptools' PEP 517 hook makes of ``source`` (what `python -m build --sdist`
    calls, without the isolated environment: .ci/run-build does that one), relative to its top folder."""
    hide_torch = "" if torch_importable else "sys.modules['torch'] = None; "  # `import torch` then fails
    script = f"import sys; {hide_torch}from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", script, str(out)], cwd=source, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    with tarfile.open(out / result.stdout.strip().splitlines()[-1]) as sdist:
        return {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}


def test_sdist_carries_every_file_the_extension_builds_need(tmp_path):
    source = _source_tree(tmp_path)
    expected = {p.relative_to(source).as_posix() for folder in ("csrc", "fastpeft_kernels")
                for p in (source / folder).rglob("*") if p.is_file()}
    assert {"csrc/prefix_decode.h", "csrc/cpu/short_prefix_attention.cpp",
            "fastpeft_kernels/prefix_decode.py"} <= expected
    expected |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "constraints.txt"}
    without_torch = _sdist_files(source, tmp_path / "without", torch_importable=False)
    assert expected <= without_torch, f"missing from the sdist: {sorted(expected - without_torch)}"
    # the same files whether or not torch is importable while the sdist is made
    assert _sdist_files(source, tmp_path / "with", torch_importable=True) == without_torch


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
    from fastpeft.ops import environment

    missing = environment._extension_failure_reason(ModuleNotFoundError("No module named 'fastpeft._C'",
                                                                     name="fastpeft._C"))
    assert "not built" in missing and "--no-build-isolation" in missing
    abi = environment._extension_failure_reason(ImportError("_C.so: undefined symbol: _ZN3c106detail14torchCheckFail"))
    assert "rebuild it against the installed torch" in abi and "undefined symbol" in abi
    other = environment._extension_failure_reason(ImportError("libcudart.so.13: cannot open shared object file"))
    assert "libcudart" in other
    cpu = environment._extension_failure_reason(ModuleNotFoundError("No module named 'fastpeft._cpu'",
                                                                 name="fastpeft._cpu"), "fastpeft._cpu")
    assert cpu.startswith("fastpeft._cpu is not built") and "FASTPEFT_BUILD_CPU" in cpu


@pytest.mark.skipif(importlib.util.find_spec("fastpeft._C") is not None, reason="the extension is built here")
def test_missing_cuda_extension_warns_once_and_never_raises():
    from fastpeft.ops import environment

    environment.cuda_extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = environment.cuda_extension()
            second = environment.cuda_extension()
        assert first[0] is None and first == second
        assert len([w for w in caught if "CUDA extension unavailable" in str(w.message)]) == 1
    finally:
        environment.cuda_extension.cache_clear()


def test_missing_cpu_extension_warns_once_and_runs_python(monkeypatch):
    import fastpeft
    from fastpeft.ops import environment
    from fastpeft.ops.backends import sdpa_short
    from tests.cases import CASES, make_inputs

    expected = fastpeft.prefix_attention(**make_inputs(CASES[0], seed=1))
    real_import_module = importlib.import_module

    def import_module(name, *args):
        if name == "fastpeft._cpu":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import_module(name, *args)

    monkeypatch.setattr(importlib, "import_module", import_module)
    environment.cpu_extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not sdpa_short.compiled()
            out = fastpeft.prefix_attention(**make_inputs(CASES[0], seed=1))
        assert len([w for w in caught if "CPU extension unavailable" in str(w.message)]) == 1
        assert (out - expected).abs().max().item() < 1e-5
    finally:
        environment.cpu_extension.cache_clear()
