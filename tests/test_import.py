"""`import fastpeft` stays light: no Triton, Dynamo, transformers or PEFT, and no CUDA initialization."""

import subprocess
import sys


def test_import_loads_no_heavy_module_and_touches_no_gpu():
    code = (
        "import sys, torch, fastpeft\n"
        "heavy = [m for m in ('triton', 'torch._dynamo', 'transformers', 'peft', 'fastpeft.kernels.prefix_attention')"
        " if m in sys.modules]\n"
        "print('loaded:', heavy)\n"
        "print('cuda initialized:', torch.cuda.is_initialized())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout, result.stdout
    assert "cuda initialized: False" in result.stdout, result.stdout


def test_kernels_subpackage_is_an_attribute_without_importing_triton():
    code = ("import sys, fastpeft\n"
            "print(fastpeft.kernels.__name__, 'triton' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["fastpeft.kernels", "False"]
