"""Compile int8fx's CUDA sources to cubins with NVRTC: no GPU, no driver, no CUDA toolkit needed.

Why the raw bindings: `cupy.cuda.compiler.compile_using_nvrtc` asks the driver for the device's
architecture and fails on a machine without one (CI). `cupy_backends.cuda.libs.nvrtc` wraps the NVRTC
library itself (from the `nvidia-cuda-nvrtc` wheel), which compiles for any architecture it supports.
So CI and a GPU run go through this one function and load the same bytes.

Every compile passes `--ptxas-options=-v`; the resource report (registers, spills, stack) is parsed
into `Compiled.resources` so tests can hold the kernels to "no spills, no local memory" without a GPU.

Caching: compiled programs are memoised per process; with `disk=True` (what the runtime launchers use)
they are also stored under $INT8FX_KERNEL_CACHE (default ~/.cache/int8fx/kernels), keyed by a hash
of the sources, options, architecture, name expressions and NVRTC version, so editing a kernel can
never load a stale cubin.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
BASE_OPTIONS = ("-std=c++17", "--ptxas-options=-v")


class CompileError(RuntimeError):
    """NVRTC rejected a source; the message carries the compiler log."""


@dataclass(frozen=True)
class Compiled:
    """One compiled program: the cubin, the mangled name of each requested kernel and ptxas's report."""

    source: str
    arch: str
    cubin: bytes
    lowered: dict = field(default_factory=dict)  # name expression -> mangled kernel name
    resources: dict = field(default_factory=dict)  # mangled name -> {"registers", "stack", "spill_stores", "spill_loads"}
    log: str = ""

    def usage(self, expression: str) -> dict:
        return self.resources[self.lowered[expression]]


def bindings():
    """The raw NVRTC bindings. Raises ImportError naming what to install."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("int8fx's CUDA kernels need CuPy's NVRTC bindings: pip install 'int8fx[dev]' "
                          "(cupy-cuda13x and nvidia-cuda-nvrtc)") from e
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    return tuple(bindings().getVersion())


def supported_archs() -> tuple[int, ...]:
    """Compute capabilities (as 80, 90, ...) this NVRTC can emit machine code for."""
    return tuple(bindings().getSupportedArchs())


def _headers() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(SOURCE_DIR.glob("*.cuh"))}


def source_text(name: str) -> str:
    return (SOURCE_DIR / name).read_text()


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict:
    """ptxas -v text -> {mangled kernel name: {"registers", "stack", "spill_stores", "spill_loads"}}."""
    out: dict = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = _STACK.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            current["registers"] = int(m.group(1))
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("INT8FX_KERNEL_CACHE", Path.home() / ".cache" / "int8fx" / "kernels"))


def _key(source: str, headers: dict, options: tuple, arch: str, expressions: tuple) -> str:
    h = hashlib.sha256()
    for part in (source, json.dumps(sorted(headers.items())), json.dumps(options), arch, json.dumps(expressions),
                 json.dumps(nvrtc_version())):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def compile_source(name: str, arch: str, expressions: tuple[str, ...], options: tuple[str, ...] = (),
                   disk: bool = False) -> Compiled:
    """Compile `int8fx/kernels/<name>` for `arch` ("sm_80", "sm_90", "sm_90a", ...), instantiating every
    kernel named in `expressions` (e.g. "gemm_s8<128,128,64,2,4,4>"). Raises CompileError with the log."""
    return _compile(name, source_text(name), arch, tuple(expressions), tuple(options), disk)


@functools.lru_cache(maxsize=None)
def _compile(name: str, source: str, arch: str, expressions: tuple, options: tuple, disk: bool) -> Compiled:
    headers = _headers()
    opts = (f"--gpu-architecture={arch}",) + BASE_OPTIONS + options
    key = _key(source, headers, opts, arch, expressions)
    path = _cache_dir() / f"{Path(name).stem}-{arch}-{key}"
    if disk and path.with_suffix(".json").exists() and path.with_suffix(".cubin").exists():
        meta = json.loads(path.with_suffix(".json").read_text())
        return Compiled(name, arch, path.with_suffix(".cubin").read_bytes(), meta["lowered"], meta["resources"], meta["log"])
    nv = bindings()
    # (this binding takes the source and name as str, headers and include names as bytes)
    prog = nv.createProgram(source, name, [v.encode() for v in headers.values()],
                            [k.encode() for k in headers])
    try:
        for e in expressions:
            nv.addNameExpression(prog, e)
        try:
            nv.compileProgram(prog, list(opts))
        except nv.NVRTCError as e:
            raise CompileError(f"NVRTC failed on {name} for {arch}: {e}\n{nv.getProgramLog(prog)}") from None
        log = nv.getProgramLog(prog)
        cubin = _get_cubin(nv, prog)
        lowered = {e: nv.getLoweredName(prog, e) for e in expressions}
    finally:
        nv.destroyProgram(prog)
    compiled = Compiled(name, arch, cubin, lowered, parse_ptxas_log(log), log)
    if disk:
        _store(path, compiled)
    return compiled


def elf_extent(image: bytes) -> int:
    """Bytes an ELF64 image must have: the end of its program and section header tables."""
    phoff, shoff = struct.unpack_from("<QQ", image, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", image, 0x36)
    return max(phoff + phentsize * phnum, shoff + shentsize * shnum)


@functools.lru_cache(maxsize=1)
def _libnvrtc():
    """The libnvrtc CuPy loaded (same handle: program handles are only valid with it), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if re.search(r"/libnvrtc\.so[.\d]*$", line.strip())}
    except OSError:
        return None
    return ctypes.CDLL(sorted(paths)[0]) if paths else None


def _get_cubin(nv, prog) -> bytes:
    """The whole cubin. CuPy's getCUBIN (14.2) returns one byte short of nvrtcGetCUBINSize (the end of the
    program header table is cut: it loads only because a Python bytes object happens to be followed by
    a NUL), so the buffer is read through libnvrtc directly; without it, the missing byte is restored."""
    lib = _libnvrtc()
    if lib is not None:
        size = ctypes.c_size_t()
        if lib.nvrtcGetCUBINSize(ctypes.c_void_p(prog), ctypes.byref(size)) == 0:
            buf = ctypes.create_string_buffer(size.value)
            if lib.nvrtcGetCUBIN(ctypes.c_void_p(prog), buf) == 0:
                return buf.raw
    cubin = nv.getCUBIN(prog)
    missing = elf_extent(cubin) - len(cubin)
    return cubin + b"\0" * missing if 0 < missing <= 1 else cubin


def _store(path: Path, c: Compiled) -> None:
    """Write cubin + metadata atomically (rename), so concurrent processes never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for suffix, data in ((".cubin", c.cubin), (".json", json.dumps(
                {"lowered": c.lowered, "resources": c.resources, "log": c.log}).encode())):
            fd, tmp = tempfile.mkstemp(dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path.with_suffix(suffix))
    except OSError:  # a read-only home is not an error: the in-process cache still holds the result
        pass


def main() -> None:
    """`python -m int8fx.kernels.nvrtc`: compile every variant for every target arch and print ptxas's
    resource report (what CI checks, readable)."""
    import time

    from .geometry import COMPILE_ARCHS, TILES, kernel_variants

    print(f"NVRTC {'.'.join(map(str, nvrtc_version()))}, targets {', '.join(COMPILE_ARCHS)}")
    smem = {t.expression: t.smem_bytes for t in TILES}
    print(f"{'arch':7s} {'kernel':32s} {'regs':>5s} {'spill':>6s} {'stack':>6s} {'dyn smem':>9s}")
    for arch in COMPILE_ARCHS:
        for src, exprs in kernel_variants().items():
            t0 = time.perf_counter()
            c = compile_source(src, arch, exprs)
            for e in exprs:
                u = c.usage(e)
                print(f"{arch:7s} {e:32s} {u['registers']:5d} {u['spill_stores'] + u['spill_loads']:6d} "
                      f"{u['stack']:6d} {smem.get(e, 0):9d}")
            print(f"{arch:7s} {src}: {len(c.cubin)} bytes of cubin in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
