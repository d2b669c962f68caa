"""Is the CuTe DSL usable here, and if not, why not (as a sentence a user can act on)."""
from __future__ import annotations

import functools
import importlib
from typing import Optional

INSTALL_MESSAGE = "nvidia-cutlass-dsl is not installed: pip install nvidia-cutlass-dsl>=4.8"
TVM_FFI_MESSAGE = "apache-tvm-ffi is not installed (needed to launch CuTe-DSL kernels): pip install apache-tvm-ffi"
MIN_VERSION = (4, 8)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None when `cutlass.cute` imports (so kernels can be compiled); else the message to show."""
    try:
        cutlass = importlib.import_module("cutlass")
        importlib.import_module("cutlass.cute")
    except Exception as exc:  # ImportError, or a broken install whose native libraries fail to load
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("cutlass", "cutlass.cute"):
            return INSTALL_MESSAGE
        return f"{INSTALL_MESSAGE} (import failed: {type(exc).__name__}: {exc})".splitlines()[0]
    version = getattr(cutlass, "__version__", "0")
    if _version_tuple(version) < MIN_VERSION:
        return f"{INSTALL_MESSAGE} (found {version})"
    return None


def is_available() -> bool:
    """True when the CuTe DSL can compile kernels on this machine (no GPU needed)."""
    return unavailable_reason() is None


@functools.lru_cache(maxsize=None)
def launch_unavailable_reason() -> Optional[str]:
    """None when compiled kernels can also be called from torch (the DSL plus TVM-FFI are present)."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    try:
        importlib.import_module("tvm_ffi")
    except Exception:
        return TVM_FFI_MESSAGE
    return None


def require(for_launch: bool = False) -> None:
    """Raise RuntimeError with the install hint when the DSL (or, for a launch, TVM-FFI) is missing."""
    reason = launch_unavailable_reason() if for_launch else unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
