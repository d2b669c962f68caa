"""Compile a kernel for a GPU that is not here, and look at what came out.

nvidia-cutlass-dsl compiles for sm_90a on a machine with no GPU and no driver when it is given fake
tensors (`cutlass.cute.runtime.make_fake_compact_tensor`). This module wraps that compile and the three
checks we make on its output:

- `ptxas_report(ptx)`: registers and spills, from the system `ptxas -v` (the DSL's PTX may use a newer
  `.version` than that ptxas knows; the line is lowered to what it accepts, which is harmless for
  sm_90a code that uses no newer instruction);
- `cubin_resources(cubin)`: registers and stack frame straight from the cubin the DSL itself built (the
  `.nv.info` attributes), so the check does not depend on which ptxas is installed;
- `sass(cubin)`: the disassembly from `nvdisasm` (pip: nvidia-cuda-nvdisasm), to look for HGMMA, LDGSTS, and
  local-memory traffic (LDL/STL) that would mean spills.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any, Optional


def compile_fake(jit_fn: Any, *fake_args: Any, arch: str = "sm_90a") -> tuple[str, bytes]:
    """`cute.compile(jit_fn, *fake_args)` for `arch`; returns (ptx text, cubin bytes). No GPU needed."""
    import cutlass.cute as cute

    with tempfile.TemporaryDirectory(prefix="dsa_ops_cute_") as tmp:
        options = f"--gpu-arch={arch} --keep-ptx --keep-cubin --dump-dir={tmp}"
        compiled = cute.compile(jit_fn, *fake_args, options=options)
        ptx = _read_artifact(compiled.__ptx__, binary=False)
        cubin = _read_artifact(compiled.__cubin__, binary=True)
    return ptx, cubin


def _read_artifact(value: Any, binary: bool):
    """The DSL hands back either the artifact itself or the path it dumped it to."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) if binary else bytes(value).decode()
    if isinstance(value, str) and "\n" not in value and os.path.isfile(value):
        with open(value, "rb" if binary else "r") as f:
            return f.read()
    if isinstance(value, str):
        return value.encode() if binary else value
    raise RuntimeError(f"the DSL returned no artifact ({type(value).__name__}); was --keep-ptx/--keep-cubin set?")


# ------------------------------------------------------------------------------------------------------
# Tools
# ------------------------------------------------------------------------------------------------------
def find_tool(name: str) -> Optional[str]:
    """`name` on PATH, in $CUDA_HOME/bin, or in a pip-installed nvidia-* wheel (nvidia/cu*/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", name)):
            return os.path.join(root, "bin", name)
    try:
        import nvidia  # namespace package of the pip CUDA wheels
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        hits = sorted(glob.glob(os.path.join(base, "*", "bin", name)), reverse=True)  # cu13 before cu12
        if hits:
            return hits[0]
    return None


@dataclass
class PtxasReport:
    registers: int
    spill_stores: int   # bytes
    spill_loads: int    # bytes
    stack_frame: int    # bytes
    text: str           # ptxas's own words


def ptxas_report(ptx: str, arch: str = "sm_90a") -> Optional[PtxasReport]:
    """Runs `ptxas -v` on `ptx`; None when no ptxas is installed. Raises if ptxas rejects the PTX."""
    ptxas = find_tool("ptxas")
    if ptxas is None:
        return None
    with tempfile.TemporaryDirectory(prefix="dsa_ops_ptxas_") as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        for _ in range(2):
            with open(path, "w") as f:
                f.write(ptx)
            proc = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull],
                                  capture_output=True, text=True)
            newest = re.search(r"Unsupported \.version [\d.]+; current version is '([\d.]+)'", proc.stderr)
            if proc.returncode != 0 and newest:
                ptx = re.sub(r"^\.version\s+[\d.]+", f".version {newest.group(1)}", ptx, count=1, flags=re.M)
                continue
            break
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{text}")

    def number(pattern: str) -> int:
        values = [int(v) for v in re.findall(pattern, text)]
        return max(values) if values else 0

    return PtxasReport(
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack_frame=number(r"(\d+) bytes stack frame"),
        text=text,
    )


def sass(cubin: bytes) -> Optional[str]:
    """The SASS of `cubin` from nvdisasm; None when nvdisasm is not installed."""
    nvdisasm = find_tool("nvdisasm")
    if nvdisasm is None:
        return None
    with tempfile.TemporaryDirectory(prefix="dsa_ops_sass_") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvdisasm failed:\n{proc.stderr}")
    return proc.stdout


def count_opcodes(sass_text: str, *prefixes: str) -> dict[str, int]:
    """How many SASS instructions start with each prefix (HGMMA, LDGSTS, LDL, STL, ...)."""
    counts = {p: 0 for p in prefixes}
    for line in sass_text.splitlines():
        match = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not match:
            continue
        opcode = match.group(1)
        for p in prefixes:
            if opcode == p or opcode.startswith(p + "."):
                counts[p] += 1
    return counts


# ------------------------------------------------------------------------------------------------------
# The cubin's own resource table
# ------------------------------------------------------------------------------------------------------
_EIATTR_REGCOUNT = 0x2F
_EIATTR_FRAME_SIZE = 0x11


@dataclass
class CubinResources:
    registers: int      # per thread, as launched
    stack_frame: int    # bytes of local memory per thread (spills land here)


def cubin_resources(cubin: bytes) -> CubinResources:
    """Registers and stack frame of the (largest) kernel in a cubin, read from its `.nv.info` section."""
    regs, frame = 0, 0
    for name, data in _elf_sections(cubin):
        if name != ".nv.info":
            continue
        for attr, payload in _nv_info_entries(data):
            if len(payload) == 8:  # (symbol index, value)
                value = struct.unpack_from("<I", payload, 4)[0]
                if attr == _EIATTR_REGCOUNT:
                    regs = max(regs, value)
                elif attr == _EIATTR_FRAME_SIZE:
                    frame = max(frame, value)
    return CubinResources(registers=regs, stack_frame=frame)


def _elf_sections(blob: bytes):
    if blob[:4] != b"\x7fELF" or blob[4] != 2:
        raise ValueError("not a 64-bit ELF cubin")
    shoff = struct.unpack_from("<Q", blob, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for header in headers:
        start = names_at + header[0]
        name = blob[start:blob.index(b"\0", start)].decode()
        yield name, blob[header[4]:header[4] + header[5]]


def _nv_info_entries(data: bytes):
    """(attribute, payload) pairs. Every entry is 4-byte aligned: format byte, attribute byte, then either
    a 16-bit size and that many payload bytes (format 4) or two inline bytes."""
    i = 0
    while i + 4 <= len(data):
        fmt, attr = data[i], data[i + 1]
        if fmt == 0x04:
            size = struct.unpack_from("<H", data, i + 2)[0]
            yield attr, data[i + 4:i + 4 + size]
            i += 4 + size
        else:
            yield attr, data[i + 2:i + 4]
            i += 4
