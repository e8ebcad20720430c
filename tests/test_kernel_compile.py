"""Every CUDA kernel variant the launchers can request compiles to cubins for sm_80 and sm_90, in CI.

No GPU and no driver are needed: NVRTC (the nvidia-cuda-nvrtc wheel, through CuPy's raw bindings)
compiles and assembles. If the bindings or the library are missing, these tests fail rather than
skip: CI installs them through the dev extra, and a silently skipped compile check verifies nothing.

Beyond "it compiles":
  * ptxas's resource report: no spills, no local memory, registers x threads within one SM's register
    file (else the launch fails with "too many resources requested");
  * every launch the CuPy launchers make, recorded on CPU tensors, names a compiled variant and passes
    arguments whose number, width and pointer-ness match the compiled kernel's signature (read back from
    the mangled name NVRTC produced): an argument-order slip that would crash a GPU run fails here;
  * a syntax error and a PTX error planted in a kernel make compilation raise (the guard on the guard).
"""
import re

import numpy as np
import pytest
import torch

from int8fx.kernels import cupy_backend as cb
from int8fx.kernels import geometry as geo
from int8fx.kernels import nvrtc
from int8fx.nn.modules import make_spec

CASES = [(src, arch) for arch in geo.COMPILE_ARCHS for src in geo.kernel_variants()]


def _compiled(src, arch):
    return nvrtc.compile_source(src, arch, geo.kernel_variants()[src])  # memoised per process


def test_nvrtc_is_installed_and_targets_ampere_and_hopper():
    nvrtc.bindings()
    assert nvrtc.nvrtc_version() >= (12, 0)
    assert {80, 90} <= set(nvrtc.supported_archs())


@pytest.mark.parametrize("src,arch", CASES)
def test_every_variant_compiles(src, arch):
    c = _compiled(src, arch)
    assert c.cubin[:4] == b"\x7fELF"
    # complete: CuPy's own getCUBIN drops the last byte, which nvrtc._get_cubin works around
    assert len(c.cubin) >= nvrtc.elf_extent(c.cubin)
    for expr in geo.kernel_variants()[src]:
        name = c.lowered[expr]
        assert name.encode() in c.cubin, f"{expr} ({name}) missing from the {arch} cubin"


@pytest.mark.parametrize("src,arch", CASES)
def test_no_spills_and_registers_fit(src, arch):
    c = _compiled(src, arch)
    tiles = {t.expression: t for t in geo.TILES}
    for expr in geo.kernel_variants()[src]:
        u = c.usage(expr)
        assert u["spill_stores"] == 0 and u["spill_loads"] == 0 and u["stack"] == 0, (expr, arch, u)
        threads = tiles[expr].threads if expr in tiles else 256
        assert u["registers"] * threads <= 65536, (expr, arch, u)


# ----------------------------------------------------------------------------- launcher <-> kernel signatures
_BUILTIN = {"x": "i64", "i": "i32", "f": "f32"}


def kernel_param_kinds(mangled: str) -> list[str]:
    """Parameter kinds ("ptr", "i64", "i32", "f32") of an Itanium-mangled kernel name, for the types
    int8fx's kernels use: pointers (P..., or a substitution S.._, which in these signatures only ever
    stands for a repeated pointer type), long long, int, float."""
    m = re.match(r"_Z(\d+)", mangled)
    pos = m.end() + int(m.group(1))
    s = mangled
    if pos < len(s) and s[pos] == "I":  # template arguments, then the return type
        depth = 0
        while True:
            ch = s[pos]
            if ch in "IL":
                depth += 1
            elif ch == "E":
                depth -= 1
            pos += 1
            if depth == 0:
                break
        assert s[pos] == "v"
        pos += 1
    kinds = []
    while pos < len(s):
        ch = s[pos]
        if ch == "P":
            pos += 1
            while s[pos] in "KVr":
                pos += 1
            if s[pos] in "TS":
                pos = s.index("_", pos) + 1
            elif s[pos].isdigit():
                n = re.match(r"\d+", s[pos:]).group(0)
                pos += len(n) + int(n)
            else:
                pos += 1
            kinds.append("ptr")
        elif ch == "S":
            pos = s.index("_", pos) + 1
            kinds.append("ptr")
        else:
            kinds.append(_BUILTIN[ch])
            pos += 1
    return kinds


def test_mangled_name_parser():
    assert kernel_param_kinds("_Z13splitk_reducePKiiiiiPvxxxxiPKfS3_S3_i") == (
        ["ptr", "i32", "i32", "i32", "i32", "ptr"] + ["i64"] * 4 + ["i32", "ptr", "ptr", "ptr", "i32"])
    assert kernel_param_kinds("_Z11absmax_colsI6bf16_tLi4EEvPKT_xiPKfPf") == ["ptr", "i64", "i32", "ptr", "ptr"]


def _arg_kind(a) -> str:
    return {np.uint64: "ptr", np.int64: "i64", np.int32: "i32", np.float32: "f32"}[type(a)]


@pytest.fixture
def recorded(monkeypatch):
    """Run the launchers on CPU tensors with the GPU launch replaced by a recorder."""
    calls = []
    monkeypatch.setattr(cb, "_launch", lambda dev, src, expr, grid, block, args, smem=0:
                        calls.append((src, expr, tuple(grid), tuple(block), tuple(args), smem)))
    monkeypatch.setattr(cb, "_sm_count", lambda dev: 132)
    monkeypatch.setattr(cb, "_smem_limit", lambda dev: geo.SMEM_LIMIT_SM90)
    return calls


def _exercise_launchers():
    i8 = lambda *s: torch.zeros(s, dtype=torch.int8)  # noqa: E731  (values never reach a kernel here)
    for G, M, N, K in [(1, 70, 33, 100), (2, 16, 8, 300_000), (1, 4096, 4096, 4096), (1, 64, 576, 50_000)]:
        cb.int_bmm(i8(G, M, K), i8(G, K, N).transpose(1, 2).contiguous().transpose(1, 2))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(6, 8, 12).to(dt)
        for axis in (None, 0, 1, -1):
            cb.absmax(x, axis)
        cb.absmax(x, 1, premul=torch.rand(8))
        cb.quantize(x, torch.rand(()), rounding="stochastic", key=torch.tensor(5, dtype=torch.int32))
        cb.quantize(x, torch.rand(8), axis=1, premul=torch.rand(8))
        cb.quantize(x[:, :3, :5].contiguous(), torch.rand(6), axis=0)  # odd run length: VEC = 1
    spec = make_spec(2, (3, 3), (1, 1), 1, (1, 1), 2)
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(6, 2, 3, 3)
    y, saved = cb.conv_forward(x, w, spec)
    cb.conv_backward(torch.randn_like(y), saved, spec)
    dw_spec = make_spec(3, (1, 3, 3), (1, 2, 1), 0, (1, 1, 2), 4)  # depthwise 3-d, strided, dilated
    y, saved = cb.conv_forward(torch.randn(1, 4, 3, 7, 9), torch.randn(4, 1, 1, 3, 3), dw_spec)
    cb.conv_backward(torch.randn_like(y), saved, dw_spec)


@pytest.mark.parametrize("arch", geo.COMPILE_ARCHS)
def test_launches_match_compiled_signatures(recorded, arch):
    _exercise_launchers()
    seen = {(src, expr) for src, expr, *_ in recorded}
    assert {e for _, e in seen} >= {"splitk_reduce", "im2col_s8<true>", "im2col_s8<false>", "col2im_s32",
                                    "absmax_cols<float,4>", "absmax_runs<bf16_t,4>", "quantize_s8<f16_t,1>"}
    tiles = {t.expression: t for t in geo.TILES}
    for src, expr, grid, block, args, smem in recorded:
        assert expr in geo.kernel_variants()[src], f"launcher requested {expr}, which CI does not compile"
        want = kernel_param_kinds(_compiled(src, arch).lowered[expr])
        assert [_arg_kind(a) for a in args] == want, f"{expr}: launch arguments do not match the kernel signature"
        assert np.prod(block) <= 1024 and grid[0] <= geo.MAX_GRID_X and max(grid[1:], default=1) <= geo.MAX_GRID_YZ
        if expr in tiles:
            assert block == (tiles[expr].threads,) and smem == tiles[expr].smem_bytes


# ----------------------------------------------------------------------------- the guard on the guard
SMALL = "gemm_s8<64,64,64,2,2,4>"


def test_a_syntax_error_fails_compilation():
    src = nvrtc.source_text("gemm_s8.cu").replace("const int nk =", "const int nk = = ", 1)
    with pytest.raises(nvrtc.CompileError, match="gemm_s8"):
        nvrtc._compile("gemm_s8.cu", src, "sm_80", (SMALL,), (), False)


def test_a_ptx_error_fails_compilation():
    """A malformed mma shape passes the C++ front end and is only rejected when ptxas assembles the PTX:
    compile_source must surface that too, since it builds cubins, not PTX."""
    src = nvrtc.source_text("common.cuh")
    assert "m16n8k32.row.col.s32.s8.s8.s32" in src
    bad = nvrtc.source_text("gemm_s8.cu").replace('#include "common.cuh"',
                                                  src.replace("m16n8k32.row.col", "m16n8k33.row.col"), 1)
    with pytest.raises(nvrtc.CompileError):
        nvrtc._compile("gemm_s8.cu", bad, "sm_90", (SMALL,), (), False)


def test_ptxas_report_parser():
    log = ("ptxas info    : Compiling entry function '_Zk' for 'sm_90'\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert nvrtc.parse_ptxas_log(log) == {"_Zk": {"stack": 8, "spill_stores": 4, "spill_loads": 4, "registers": 255}}


# ----------------------------------------------------------------------------- machine code (optional tool)
def _nvdisasm():
    import shutil
    from pathlib import Path

    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia

        for root in nvidia.__path__:
            for cand in Path(root).glob("*/bin/nvdisasm"):
                return str(cand)
    except ImportError:
        pass
    return None


@pytest.mark.parametrize("arch", geo.COMPILE_ARCHS)
def test_gemm_sass_uses_int8_tensor_cores(arch, tmp_path):
    """In the machine code: IMMA.16832.S8.S8 (the INT8 tensor cores), LDGSTS (cp.async), LDSM (ldmatrix), no
    local-memory traffic. Needs nvdisasm (pip install nvidia-cuda-nvdisasm); skipped without it."""
    import subprocess

    tool = _nvdisasm()
    if tool is None:
        pytest.skip("nvdisasm not installed (pip install nvidia-cuda-nvdisasm)")
    c = _compiled("gemm_s8.cu", arch)
    path = tmp_path / "gemm.cubin"
    path.write_bytes(c.cubin)
    sass = subprocess.run([tool, "-c", str(path)], capture_output=True, text=True, check=True).stdout
    for t in geo.TILES:
        body = sass.split(f"\n.text.{c.lowered[t.expression]}:")[1].split("//----")[0]
        mma_per_ktile = (t.bm // t.warps_m // 16) * (t.bn // t.warps_n // 8) * (t.bk // 32)
        assert body.count("IMMA.16832.S8.S8") == mma_per_ktile, t.expression
        assert "LDGSTS" in body and "LDSM" in body and "LDL" not in body and "STL" not in body
