"""Instructions per INT4 code in the native kernels' main loop, from SASS, with no GPU.

Triton compiles for a named target (sm_90 by default) without a device; nvdisasm (shipped
with Triton) turns the cubin into SASS. The longest loop of each kernel is its K loop; its
instruction count divided by the codes one thread handles per iteration is the issue cost
per code: the figure the kernel variants in benchmarks/NOTES.md predict from.

Integer arguments are specialized as Triton does at run time for Llama shapes (pointers
16-byte aligned, integers multiples of 16), so vector widths match a real launch.

  python3 benchmarks/sass_counts.py                       # every mode, the decode and tile configs
  python3 benchmarks/sass_counts.py --modes asm --dtype fp16 --config 16,128,128,4,4,3
  python3 benchmarks/sass_counts.py --modes asm --config 1,128,128,8,4,3 --config 1,64,128,4,4,3 --count BAR.SYNC,LDG.E.U16
  python3 benchmarks/sass_counts.py --modes operand --config 128,128,64,1,8,3 --ptxas   # + ptxas's own verdict
  python3 benchmarks/sass_counts.py --modes operand --config 128,128,64,1,8,3 --count LDG.E.U,LDGSTS [--unpacked]
  python3 benchmarks/sass_counts.py --modes operand --config 128,128,64,1,4,4 --listing HGMMA,WARPGROUP,BAR
  python3 benchmarks/sass_counts.py --ws 128,128,4 --ws 128,256,3 --ptxas   # kernels/int4_wgmma.py's tiles
  python3 benchmarks/sass_counts.py --ws 128,128,4 --release-lag 2 --count BAR   # barriers a step, stage freed later
  python3 benchmarks/sass_counts.py --ws 128,256,3 --fixup-rows 16 --ptxas   # stream-K parts summed 16 rows at a time
  python3 benchmarks/sass_counts.py --ws 128,128,4 --consumer-parts 2 --ptxas --count BAR   # two consumer partitions

--ptxas assembles the kernel's PTX again with `ptxas -v` for sm_90a and adds its register count and
any performance warning (C75xx), e.g. C7515: "wgmma.mma_async instructions are serialized", which
every operand tile had until its K loop was made provably non-empty (benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quantbridge.kernels import int4_configs as kc
from quantbridge.kernels import int4_settings as settings
from quantbridge.kernels import int4_triton as kt

_TY = {"bf16": "bf16", "fp16": "fp16"}


def _signature(fn, dtype: str, words: bool, offsets: bool) -> dict[str, str]:
    ptr = {"x_ptr": dtype, "qw_ptr": "i32" if words else "u8", "s_ptr": dtype, "z_ptr": "u8",
           "m_ptr": "fp32" if offsets else "u8", "out_ptr": dtype, "ws_ptr": "fp32", "cnt_ptr": "i32", "b_ptr": dtype}
    sig = {}
    for name in fn.arg_names:
        if name in ptr:
            sig[name] = "*" + ptr[name]
        elif name[0].isupper() and name not in ("M", "N", "K", "NGROUPS"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def compile_sass(cfg: kc.Config, mode: str, dtype: str = "bf16", group: int = 128, k: int = 8192,
                 offsets: bool = False, arch: int = 90) -> str:
    """SASS of the kernel one configuration launches (M = 1 for GEMV tiles, 16 otherwise)."""
    return _compile(cfg, mode, dtype, group, k, offsets, arch)[0]


def ptxas_verdict(cfg: kc.Config, mode: str, dtype: str = "bf16", group: int = 128, k: int = 8192) -> str:
    """ptxas -v on the kernel's PTX for sm_90a: registers, and its performance warnings (or none)."""
    return _ptxas(_compile(cfg, mode, dtype, group, k, False, 90)[1])


def _ptxas(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True, check=True)
    lines = (r.stdout + r.stderr).splitlines()
    regs = next((ln.split("Used ")[1].split(",")[0] for ln in lines if "Used " in ln), "? registers")
    warn = [ln.split("ptxas info    : ")[-1].split(" in the function")[0] for ln in lines if "(C75" in ln]
    spills = [m.group(0) for ln in lines if (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ln))
              and (m.group(1), m.group(2)) != ("0", "0")]
    warn += spills
    return f"ptxas: {regs}; " + ("; ".join(warn) if warn else "no performance warning")


def _compile(cfg: kc.Config, mode: str, dtype: str, group: int, k: int, offsets: bool, arch: int) -> tuple[str, str]:
    """(SASS, PTX) of one configuration's kernel."""
    bm, bn, bk, sk, warps, stages = cfg
    mode_i = settings.CODE_MODES[mode]
    slices = kc.warp_k(cfg)
    words = bm == 1 or (mode_i >= 3 and bk // slices <= group and (bm <= 64 or mode_i == 8))  # the kernel's WORD_TILES
    fn = kt._int4_gemv_kernel if bm == 1 else kt._int4_matmul_kernel
    head = (group, bn, bk, sk) if bm == 1 else (group, bm, bn, bk, sk, bm <= 16)
    consts = head + (False, offsets, mode_i, k % bk == 0, True) + ((stages if mode_i == 5 else 1,) if bm == 1 else ()) \
        + (mode == "tiled" or (mode == "operand" and settings.OPERAND_TILED),)
    sig = _signature(fn, _TY[dtype], words, offsets)
    if bm != 1:  # operand tiles read packed scales and zero points, as a bound layer's do (SCALES_PACKED)
        packed = settings.SCALES_PACKED and mode == "operand" and not offsets
        # SZ_PACKED (int4_layouts.sz_format), WARP_K
        consts += ((2 if settings.SZ_SPLIT else 1) if packed else 0, slices)
        if packed:
            sig["s_ptr"] = "*i32"
    if bm == 1 and mode == "xprep":
        sig["x_ptr"] = "*fp32"  # the GEMV reads the activations _prep_x_kernel prepared
    names = [n for n in fn.arg_names if sig[n] == "constexpr"]
    # M is 1 for a GEMV launch (specialized away), and never assumed a multiple of 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if sig[n] != "constexpr" and n != "M"}
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(zip(names, consts)), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    return _sass(compiled.asm["cubin"]), compiled.asm["ptx"]


def _sass(cubin: bytes) -> str:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def compile_ws(cfg: tuple[int, int, int], dtype: str = "bf16", group: int = 128, k: int = 8192,
               n: int = 28672, sliced: bool = False) -> tuple[str, str, int]:
    """(SASS, PTX, shared memory bytes) of int4_wgmma's warp-specialized tile (BLOCK_M, BLOCK_N, STAGES)
    for sm_90a, with the TMA descriptors a launch on an [M=BLOCK_M, K] x and [N, K] codes makes.
    sliced: the specialization of a split run summed in slices (the kernel's SLICED, which a launch
    takes from int4_wgmma.sums_sliced), else of every other launch."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from quantbridge.kernels import int4_wgmma as ws
    from quantbridge.kernels.int4_codes import ASM_BF16_SCALED, ASM_FP16_SCALED

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x_desc, q_desc = ws.descriptors(torch.empty(cfg[0], k, dtype=tdt), torch.empty(n, k // 2, dtype=torch.uint8), cfg)
    fn = ws._int4_ws_kernel
    consts = {"HAS_BIAS": False, "ASM": (ASM_FP16_SCALED if dtype == "fp16" else ASM_BF16_SCALED).value,
              "TWO_E": 1024.0 if dtype == "fp16" else 128.0, "BLOCK_N": cfg[1], "STAGES": cfg[2],
              "IN_FLIGHT": ws.IN_FLIGHT, "LAG": settings.RELEASE_LAG, "FIXUP": settings.FIXUP_ROWS,
              "LOADS": settings.FIXUP_LOADS,
              "SPLIT": settings.SZ_SPLIT, "SLICED": sliced, "PARTS": settings.CONSUMER_PARTS,
              "num_warps": 8 // settings.CONSUMER_PARTS}  # a consumer partition's warps, as launch passes them
    if group == 128:  # Triton specializes an integer argument equal to 1 as a constant, as a launch's is here
        consts["GROUP_TILES"] = 1
    sig = {a: "constexpr" if a in consts else "i32" for a in fn.arg_names}
    sig.update(x_desc=mangle_type(x_desc), q_desc=mangle_type(q_desc), s_ptr="*i32", out_ptr="*" + _TY[dtype],
               b_ptr="*" + _TY[dtype], ws_ptr="*fp32", cnt_ptr="*i32")
    # pointers and the integers a Llama-shaped launch has divisible by 16, as Triton specializes them
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in ("s_ptr", "out_ptr", "b_ptr", "ws_ptr", "cnt_ptr", "N", "NGROUPS", "stride_om")}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()},
                         attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": consts["num_warps"]})
    return _sass(compiled.asm["cubin"]), compiled.asm["ptx"], compiled.metadata.shared


def report_ws(cfg: tuple[int, int, int], dtype: str, count: tuple[str, ...], ptxas: bool, sliced: bool = False) -> str:
    """The warp-specialized tile's lines: its consumers' K loop (one step of 128 columns; with two consumer
    partitions, the first one's: each has its own copy, of BLOCK_N / 2 rows) and counts."""
    sass, ptx, smem = compile_ws(cfg, dtype, sliced=sliced)
    loop = main_loop(sass, holding="HGMMA")
    ops = collections.Counter(opcode(t) for t in loop)
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
    counted = "".join(f"  [{p}: {sum(v for k, v in ops.items() if k.startswith(p))}]" for p in count)
    codes = cfg[1] * 128 / 256  # BLOCK_N x 128 codes per step over two consumer warpgroups (either way)
    out = f"loop ws{cfg} {dtype} {len(loop)} instr  {len(loop) / codes:5.2f}/code  shared {smem} B  {top}{counted}"
    return out + (f"\n{'':26} ws       {_ptxas(ptx)}" if ptxas else "")


def main_loop(sass: str, holding: str | None = None) -> list[str]:
    """The instructions of the longest backward-branch loop (the K loop); with `holding`, of the
    shortest loop that holds an opcode starting so (a warp-specialized kernel's partitions sit
    inside one loop of their own: its K loop is the innermost one with the wgmma)."""
    ins, labels = [], {}
    for line in sass.splitlines():
        lab = re.match(r"\s*\.L_x_(\d+):", line)
        if lab:
            labels[int(lab.group(1))] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(m.group(1))
    loops = []
    for i, text in enumerate(ins):
        m = re.search(r"BRA.*\.L_x_(\d+)", text)
        if m and labels.get(int(m.group(1)), i + 1) <= i:
            loops.append((labels[int(m.group(1))], i))
    if holding is not None:
        loops = [lp for lp in loops if any(opcode(t).startswith(holding) for t in ins[lp[0]:lp[1] + 1])]
        best = min(loops, key=lambda lp: lp[1] - lp[0], default=(0, -1))
    else:
        best = max(loops, key=lambda lp: lp[1] - lp[0], default=(0, -1))
    return ins[best[0]:best[1] + 1]


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def report(cfg: kc.Config, mode: str, dtype: str, offsets: bool = False, count: tuple[str, ...] = ()) -> str:
    """One line: the K loop's length, instructions per code, its six commonest opcodes, and how many
    of its opcodes start with each prefix in `count` (e.g. BAR, LDG, LDGSTS)."""
    loop = main_loop(compile_sass(cfg, mode, dtype, offsets=offsets))
    codes = cfg[1] * cfg[2] / (32 * cfg[4])  # BLOCK_N x BLOCK_K codes per iteration over the threads
    ops = collections.Counter(opcode(t) for t in loop)
    top = ", ".join(f"{k} {v}" for k, v in ops.most_common(6))
    counted = "".join(f"  [{p}: {sum(v for k, v in ops.items() if k.startswith(p))}]" for p in count)
    return f"{str(cfg):26} {mode:8} {dtype} {len(loop):5} instr  {len(loop) / codes:5.2f}/code  {top}{counted}"


def listing(cfg: kc.Config, mode: str, dtype: str, offsets: bool, prefixes: tuple[str, ...]) -> str:
    """The K loop's instructions with the given opcode prefixes, each with its position in the loop:
    where the wgmma, their waits and the barriers sit against the rest (dequantization, loads)."""
    loop = main_loop(compile_sass(cfg, mode, dtype, offsets=offsets))
    return "\n".join(f"{'':26} {i:4}: {t}" for i, t in enumerate(loop) if opcode(t).startswith(prefixes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(settings.CODE_MODES))
    ap.add_argument("--dtype", default="bf16", choices=sorted(_TY))
    ap.add_argument("--config", action="append", help="BM,BN,BK,SPLIT_K,warps,stages (repeatable)")
    ap.add_argument("--offsets", action="store_true", help="float offsets per group (GGUF Q4_1/Q4_K)")
    ap.add_argument("--count", default="", help="opcode prefixes to count in the loop, e.g. BAR.SYNC,LDG.E.U16,LDGSTS")
    ap.add_argument("--ptxas", action="store_true", help="add ptxas -v's registers and performance warnings (sm_90a)")
    ap.add_argument("--listing", default="",
                    help="also print the K loop's instructions whose opcodes start with these prefixes, in order "
                         "(position: instruction), e.g. HGMMA,WARPGROUP,BAR,LDSM,LDGSTS")
    ap.add_argument("--unpacked", action="store_true",
                    help="operand tiles reading scales and zero points separately (SCALES_PACKED off, as up to r4)")
    ap.add_argument("--row-major", action="store_true",
                    help="operand codes stored row-major (OPERAND_TILED off), not tile-major as bound layers of "
                         "whole tiles keep them")
    ap.add_argument("--ws", action="append",
                    help="BLOCK_M,BLOCK_N,STAGES of kernels/int4_wgmma.py's warp-specialized tile (repeatable; "
                         "replaces --config and --modes; counts HGMMA, WARPGROUP.DEPBAR.LE and STS by default)")
    ap.add_argument("--release-lag", type=int, choices=(1, 2),
                    help="int4_settings.RELEASE_LAG for --ws: when a consumer frees a stage (default: the module's)")
    ap.add_argument("--fixup-rows", type=int,
                    help="int4_settings.FIXUP_ROWS for --ws: a stream-K tile summed whole (0) or R rows of x at a time")
    ap.add_argument("--fixup-loads", type=int,
                    help="int4_settings.FIXUP_LOADS for --ws: parts whose loads a row-chunk fix-up issues at once")
    ap.add_argument("--fixup-sliced", action="store_true",
                    help="--ws compiled as a split run summed in slices (int4_settings.FIXUP_SLICED's launches), "
                         "not as every other launch")
    ap.add_argument("--consumer-parts", type=int, choices=(1, 2),
                    help="int4_settings.CONSUMER_PARTS for --ws: the consumer warpgroups as one partition or two")
    ap.add_argument("--sz-split", action="store_true",
                    help="packed scales and zero points split into group-major words, 2.5 bytes a row and group "
                         "(int4_settings.SZ_SPLIT), for operand and --ws tiles")
    a = ap.parse_args(argv)
    settings.SZ_SPLIT = a.sz_split
    if a.ws:
        if a.release_lag is not None:
            settings.RELEASE_LAG = a.release_lag
        if a.fixup_rows is not None:
            settings.FIXUP_ROWS = a.fixup_rows
        if a.fixup_loads is not None:
            settings.FIXUP_LOADS = a.fixup_loads
        if a.consumer_parts is not None:
            settings.CONSUMER_PARTS = a.consumer_parts
        count = tuple(p for p in (a.count or "HGMMA,WARPGROUP.DEPBAR.LE,STS").split(",") if p)
        for c in a.ws:
            print(report_ws(tuple(int(v) for v in c.split(",")), a.dtype, count, a.ptxas, a.fixup_sliced), flush=True)
        return 0
    if a.unpacked:
        settings.SCALES_PACKED = False
    if a.row_major:
        settings.OPERAND_TILED = False
    count = tuple(p for p in a.count.split(",") if p)
    cfgs = [tuple(int(v) for v in c.split(",")) for c in a.config] if a.config else [
        (1, 128, 128, 8, 4, 3), (16, 128, 128, 4, 4, 3), (16, 256, 128, 4, 8, 4), (64, 128, 64, 2, 4, 3)]
    for cfg in cfgs:
        for mode in a.modes.split(","):
            print(report(cfg, mode, a.dtype, a.offsets, count), flush=True)
            if a.ptxas:
                print(f"{'':26} {mode:8} {ptxas_verdict(cfg, mode, a.dtype)}", flush=True)
            if a.listing:
                print(listing(cfg, mode, a.dtype, a.offsets, tuple(a.listing.split(","))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
