"""Every CUDA source in csrc/ compiles for Hopper with nvcc alone (the .cu files include no torch header),
without register spills. Skipped where nvcc is not on PATH."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))


def _cxx_standard(setup_module):
    """The -std flag setup.py gives the compilers for the installed torch (C++20 from torch 2.14)."""
    import torch

    return f"-std={setup_module.torch_cxx_standard(Path(torch.__file__).parent / 'include') or 'c++17'}"


def test_csrc_has_cuda_sources():
    assert CUDA_SOURCES, f"no .cu files under {CSRC}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_for_sm90a(source, tmp_path, setup_module):
    # The flags setup.py gives nvcc, minus torch's; ptxas reports spills and local memory as warnings.
    command = ["nvcc", "-c", _cxx_standard(setup_module), "-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
               "-Xptxas=-warn-spills,-warn-lmem-usage", f"-I{CSRC}", str(source),
               "-o", str(tmp_path / (source.stem + ".o"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), f"{source.name} compiles with warnings:\n{result.stderr}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0


def test_cuda_sources_include_no_torch_header():
    for source in CUDA_SOURCES + sorted(CSRC.glob("*.h")):
        text = source.read_text()
        for header in ("torch/", "ATen/", "c10/"):
            assert f"#include <{header}" not in text, f"{source.name} includes a {header} header"


def _cuda_include_dir():
    """The CUDA toolkit's include directory (torch's CUDA_HOME, $CUDA_HOME, or /usr/local/cuda), or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    homes = [CUDA_HOME, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates = [Path(home) / "include" for home in homes if home]
    return next((c for c in candidates if (c / "cuda_runtime_api.h").exists()), None)


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include_dir() is None,
                    reason="needs g++ and the CUDA toolkit headers")
def test_bindings_parse_against_installed_torch_headers(tmp_path, setup_module):
    # The binding is only built on a CUDA machine; a syntax-only compile against this torch's headers catches
    # API mistakes earlier. A CPU-only torch wheel ships the c10/cuda headers but not the one CMake generates
    # (it only declares the shared-library build), so a stand-in is provided for those wheels.
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    generated = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    generated.parent.mkdir(parents=True)
    generated.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*include_paths(), str(_cuda_include_dir()), sysconfig.get_paths()["include"], str(CSRC)]
    if not any((Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in include_paths()):
        includes.append(str(tmp_path))
    command = ["g++", _cxx_standard(setup_module), "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               *[f"-I{p}" for p in includes], str(CSRC / "bindings.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
