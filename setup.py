"""dsa_ops: DeepSeek sparse-attention kernels as torch.library custom ops (CuTe-DSL, Triton, torch reference).

Pure Python: the kernels are JIT-compiled (Triton, CuTe-DSL) on first use, so `pip install -e .` needs no
compiler. torch is not pinned here on purpose: install the torch build for your machine first (CI uses the
local CPU build `torch==2.13.0`; the GPU machine has its CUDA build), so pip never pulls a second torch.
"""
from setuptools import find_packages, setup

setup(
    name="dsa_ops",
    version="0.1.0",
    description="DeepSeek sparse attention (DSA, V4 hybrid, NSA) kernels as torch.ops.dsa custom ops",
    packages=find_packages(include=["dsa_ops", "dsa_ops.*", "meta_kernels", "meta_kernels.*",
                                    "csrc_dsl", "csrc_dsl.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5"],
    extras_require={
        "triton": ["triton>=3.2"],
        # CuTe-DSL kernels: the DSL compiles for sm_90a even without a GPU (CI checks every shipped config);
        # launching needs apache-tvm-ffi; nvdisasm lets the tests read the SASS.
        "cute": ["nvidia-cutlass-dsl>=4.8", "nvidia-cutlass-dsl-libs-cu13>=4.8", "apache-tvm-ffi",
                 "nvidia-cuda-nvdisasm"],
        "test": ["pytest", "expecttest", "numpy", "triton>=3.2"],
    },
)
