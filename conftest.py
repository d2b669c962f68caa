"""Test set-up shared by tests/ and compile_tests/.

Without a GPU, Triton kernels run under the interpreter: TRITON_INTERPRET must be set before triton is
imported, so it is set here, before any test module loads. Interpreter tests feed fp16/fp32 (its bf16 tl.dot is
wrong on CPU).
"""
import os
import sys
import tempfile

# A fresh TorchInductor cache per test session: its on-disk key covers op schemas, not the ops' Python autograd
# formulas, so a cache left by an older checkout could replay stale graphs (see README, torch.compile caches).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="dsa_ops_inductor_"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped cleanly without one)")
