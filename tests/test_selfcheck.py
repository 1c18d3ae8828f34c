"""`python -m fastpeft.selfcheck` (named in the README) runs every backend here and agrees with float64."""

import os
import subprocess
import sys


def test_selfcheck_passes_on_this_machine():
    env = {k: v for k, v in os.environ.items() if k not in ("FASTPEFT_BACKEND", "TRITON_INTERPRET")}
    result = subprocess.run([sys.executable, "-m", "fastpeft.selfcheck"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all backends agree with float64" in result.stdout
    assert "reference  cpu    float32   decode" in result.stdout or "cuda" in result.stdout
    assert "float32   paged" in result.stdout   # the paged decode ran, on every backend that decodes here
