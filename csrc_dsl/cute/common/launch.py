"""What a launcher needs at call time."""
from __future__ import annotations


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
