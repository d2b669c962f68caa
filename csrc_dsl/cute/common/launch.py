"""What a launcher needs at call time."""
from __future__ import annotations

import os


def env_choice(name: str, choices, default: str) -> str:
    """The value of environment variable `name` (one of `choices`, else ValueError), or `default` when it is
    unset or blank: how the launchers let tests and benchmarks pick a kernel variant."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if text not in choices:
        raise ValueError(f"{name}={text!r}: expected one of {tuple(choices)}")
    return text


def current_stream():
    """torch's current CUDA stream as the driver handle a compiled kernel takes.

    Read at every call, never cached: under `torch.cuda.graph(...)` the current stream is the capture
    stream, so the launch is recorded into the graph; under `with torch.cuda.stream(s)` it runs on `s`.
    """
    import torch
    from cuda.bindings import driver

    return driver.CUstream(torch.cuda.current_stream().cuda_stream)


def is_sm90(device) -> bool:
    import torch

    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major == 9


def sm90_unavailable_reason():
    """None when SM90 CuTe-DSL kernels can be launched here; else why not (no GPU, not Hopper, no DSL/TVM-FFI)."""
    import torch

    from .availability import launch_unavailable_reason

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if torch.cuda.get_device_capability()[0] != 9:
        return "needs an SM90 (Hopper) GPU"
    return launch_unavailable_reason()
