"""Compiled kernels, cached in memory and on disk, keyed on static scalars only.

A kernel module describes one compiled variant with a frozen dataclass of static scalars (dtype name, head
dims, H, flags, tile sizes, arch): never a sequence length or batch size, which stay dynamic inside the
compiled kernel. `KernelCache.get(config)` returns the compiled function:

1. from memory (a dict keyed on the config);
2. else from disk: `<cache root>/<fingerprint>/<cache name>/<sha256 of the config>.o`, an object file written
   by the DSL's `export_to_c` and read back by `cutlass.cute.runtime.load_module` (nvidia-cutlass-dsl 4.8.1
   supports both, for functions compiled with `--enable-tvm-ffi`). The fingerprint is a sha256 over the
   kernel's source files, the cutlass and tvm-ffi versions and the Python version, so editing a kernel or
   upgrading the DSL never loads a stale binary;
3. else it compiles (seconds) and writes the disk copy.

Disk root: $DSA_OPS_CUTE_CACHE_DIR, else $XDG_CACHE_HOME/dsa_ops/cute, else ~/.cache/dsa_ops/cute.
`DSA_OPS_CUTE_DISK_CACHE=0` turns the disk level off. A disk failure (read-only home, a file from another
machine that will not load) only costs a compile: it warns once and carries on.

`warmup(configs)` compiles ahead of time, e.g. before capturing a CUDA graph, since nothing may be
compiled inside a capture.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ENV_CACHE_DIR = "DSA_OPS_CUTE_CACHE_DIR"
ENV_DISK_CACHE = "DSA_OPS_CUTE_DISK_CACHE"
EXPORTED_NAME = "dsa_ops_kernel"
STATIC_TYPES = (bool, int, float, str)

_CACHES: dict[type, "KernelCache"] = {}


def check_static(config: Any) -> None:
    """A cache key must be a frozen dataclass whose fields are plain scalars (no tensors, no shapes)."""
    if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:
        raise TypeError(f"a kernel config must be a frozen dataclass, got {type(config).__name__}")
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not isinstance(value, STATIC_TYPES):
            raise TypeError(f"{type(config).__name__}.{f.name} must be a static scalar, got {type(value).__name__}")


def disk_cache_root() -> Path | None:
    if os.environ.get(ENV_DISK_CACHE, "1").strip() == "0":
        return None
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsa_ops" / "cute"


def source_fingerprint(files: Sequence[Path]) -> str:
    """sha256 of the kernel sources plus the versions that change the generated code or its ABI."""
    import cutlass

    digest = hashlib.sha256()
    digest.update(f"python{sys.version_info.major}.{sys.version_info.minor}".encode())
    digest.update(f"cutlass={getattr(cutlass, '__version__', '?')}".encode())
    try:
        import tvm_ffi

        digest.update(f"tvm_ffi={getattr(tvm_ffi, '__version__', '?')}".encode())
    except ImportError:
        digest.update(b"tvm_ffi=absent")
    for path in sorted(Path(p).resolve() for p in files):
        content = path.read_bytes()
        digest.update(path.name.encode())
        digest.update(len(content).to_bytes(8, "little"))
        digest.update(content)
    return digest.hexdigest()


def config_digest(config: Any) -> str:
    """Stable across processes: the dataclass name and its fields in declaration order."""
    fields = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)]
    return hashlib.sha256(repr((type(config).__qualname__, fields)).encode()).hexdigest()[:40]


@functools.lru_cache(maxsize=None)
def _preload_runtime_libraries() -> None:
    """Loading an exported object calls into the DSL's runtime libraries; make their symbols global first
    (the DSL's own loader opens them privately)."""
    import cutlass.cute as cute

    for path in cute.runtime.find_runtime_libraries(enable_tvm_ffi=True):
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


class KernelCache:
    """Compiled functions for one kernel family. `compile_fn(config)` must return a TVM-FFI compiled function."""

    def __init__(self, name: str, config_type: type, compile_fn: Callable[[Any], Any],
                 source_files: Sequence[Path]):
        self.name = name
        self.config_type = config_type
        self._compile_fn = compile_fn
        self._source_files = tuple(Path(p) for p in source_files)
        self._memory: dict[Any, Any] = {}
        self._modules: list[Any] = []  # keeps loaded object files alive as long as their functions
        self._lock = threading.Lock()
        self._warned = False
        _CACHES[config_type] = self

    def __contains__(self, config: Any) -> bool:
        return config in self._memory

    def get(self, config: Any) -> Any:
        fn = self._memory.get(config)
        if fn is not None:
            return fn
        check_static(config)
        with self._lock:
            fn = self._memory.get(config)
            if fn is None:
                fn = self._load(config)
                if fn is None:
                    fn = self._compile_fn(config)
                    self._store(config, fn)
                self._memory[config] = fn
        return fn

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()

    # -- disk ------------------------------------------------------------------------------------------
    @functools.cached_property
    def directory(self) -> Path | None:
        root = disk_cache_root()
        if root is None:
            return None
        return root / source_fingerprint(self._source_files)[:32] / self.name

    def path_for(self, config: Any) -> Path | None:
        return None if self.directory is None else self.directory / f"{config_digest(config)}.o"

    def _load(self, config: Any) -> Any:
        path = self.path_for(config)
        if path is None or not path.is_file():
            return None
        try:
            import cutlass.cute as cute

            _preload_runtime_libraries()
            module = cute.runtime.load_module(str(path), enable_tvm_ffi=True)
            fn = getattr(module, EXPORTED_NAME)
        except Exception as exc:
            self._warn(f"could not load {path} ({type(exc).__name__}: {exc}); compiling instead")
            return None
        self._modules.append(module)
        return fn

    def _store(self, config: Any, fn: Any) -> None:
        path = self.path_for(config)
        if path is None or not hasattr(fn, "export_to_c"):
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.o")
            fn.export_to_c(object_file_path=str(partial), function_name=EXPORTED_NAME)
            os.replace(partial, path)  # atomic: a reader sees a whole file or none
        except Exception as exc:
            self._warn(f"could not write the disk cache at {path} ({type(exc).__name__}: {exc})")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"[dsa_ops cute cache {self.name}] {message}", RuntimeWarning, stacklevel=3)


def cache_for(config: Any) -> KernelCache:
    try:
        return _CACHES[type(config)]
    except KeyError:
        raise TypeError(f"no CuTe-DSL kernel cache is registered for {type(config).__name__}") from None


def warmup(configs: Iterable[Any]) -> int:
    """Compiles (or loads from disk) every config ahead of time; returns how many are now in memory."""
    count = 0
    for config in configs:
        cache_for(config).get(config)
        count += 1
    return count
