"""Every python block of the README runs as written, in order, from an empty folder (each block in a fresh
interpreter, sharing the folder, so that a block may load what an earlier one saved)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_python_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(readme_python_blocks()) >= 4


def test_readme_python_blocks_run_in_order(tmp_path):
    for number, block in enumerate(readme_python_blocks(), start=1):
        result = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"README python block {number} failed:\n{block}\n{result.stderr[-3000:]}"
    assert (tmp_path / "fp-readme-prefix" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "fp-readme-tenants" / "legal" / "adapter_config.json").is_file()
    assert (tmp_path / "fp-readme-t5" / "translate" / "adapter_config.json").is_file()
    assert (tmp_path / "fp-readme-t5-tenants" / "classify" / "adapter_config.json").is_file()
    assert (tmp_path / "fp-readme-fsdp" / "adapter_model.safetensors").is_file()
