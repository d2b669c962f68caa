"""Helper for the CPU tests that compile Triton kernels for sm_90 (Triton's compiler needs no GPU)."""
import os
import subprocess
import sys

import pytest


def run_compiled(code: str) -> str:
    """Runs `code` (Python, from the project root) in a fresh interpreter without TRITON_INTERPRET, so the kernels
    are compiled functions rather than interpreted ones; fails with its stderr if it fails and returns its stdout.
    Skips where this Triton cannot target a GPU from this machine."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("this Triton cannot target a GPU from this machine")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
