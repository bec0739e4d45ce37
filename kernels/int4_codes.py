"""INT4 codes to floats inside Triton kernels, exactly and without int-to-float conversions.

An integer-to-float conversion issues at a quarter of the FP32 rate on Hopper, and the
decode loop converts every code. The bit trick instead: a code q ORed into the low mantissa
bits of 2^e is the float 2^e + q, and subtracting 2^e (or 2^e + z) is exact:
  fp16  2^10 = 0x6400 (ulp 1 up to 2048)   bf16  2^7 = 0x4300 (ulp 1 up to 256)
  fp32  2^23 = 0x4B000000
`dequant_words` does it two codes per 32-bit register (two fp16/bf16 halves), eight codes
per int32 word of the canonical layout (column 8i + j in nibble j), in 11 PTX instructions
per word: 3 shifts, 4 lop3 (and-or in one), 4 packed fma that subtract 2^e + z.
"""

from __future__ import annotations

import triton
import triton.language as tl

# $8 is the word, $9 the packed pair -(2^e + z) in the output dtype. Nibbles j and j + 4 of
# (word >> 4j) land in the two halves; the fma by 1.0 subtracts 2^e + z from both at once.
# {scale}: for dequant_operand, times the row's scale ($10, in both halves): one more fma per
# pair, rounding (q - z) * s once to the output dtype, as Marlin and Machete do (an fma by -0,
# not mul.bf16x2, which needs sm_90).
_WORD_TO_8 = """{{
.reg .b32 t0, t1, t2, t3, s1, s2, s3, m, one, o;
mov.b32 m, {magic};
mov.b32 one, {one};
mov.b32 o, 0x80008000;
shr.b32 s1, $8, 4;
shr.b32 s2, $8, 8;
shr.b32 s3, $8, 12;
lop3.b32 t0, $8, 0x000F000F, m, 0xEA;
lop3.b32 t1, s1, 0x000F000F, m, 0xEA;
lop3.b32 t2, s2, 0x000F000F, m, 0xEA;
lop3.b32 t3, s3, 0x000F000F, m, 0xEA;
fma.rn.{ty} t0, t0, one, $9;
fma.rn.{ty} t1, t1, one, $9;
fma.rn.{ty} t2, t2, one, $9;
fma.rn.{ty} t3, t3, one, $9;
{scale}mov.b32 {{$0, $4}}, t0;
mov.b32 {{$1, $5}}, t1;
mov.b32 {{$2, $6}}, t2;
mov.b32 {{$3, $7}}, t3;
}}"""
_SCALE = "".join(f"fma.rn.{{ty}} t{i}, t{i}, $10, o;\n" for i in range(4))
_BF16 = dict(magic="0x43004300", one="0x3F803F80", ty="bf16x2")
_FP16 = dict(magic="0x64006400", one="0x3C003C00", ty="f16x2")
ASM_BF16 = tl.constexpr(_WORD_TO_8.format(**_BF16, scale=""))
ASM_FP16 = tl.constexpr(_WORD_TO_8.format(**_FP16, scale=""))
ASM_BF16_SCALED = tl.constexpr(_WORD_TO_8.format(**_BF16, scale=_SCALE.format(**_BF16)))
ASM_FP16_SCALED = tl.constexpr(_WORD_TO_8.format(**_FP16, scale=_SCALE.format(**_FP16)))


@triton.jit
def as_float(q, DT: tl.constexpr, MODE: tl.constexpr):
    """Codes 0..15 (any integer type) as exact DT values; MODE 0 converts, MODE > 0 uses the bit trick."""
    if MODE == 0:
        return q.to(DT)
    if DT == tl.float16:
        return (q.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    elif DT == tl.bfloat16:
        return (q.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0
    else:
        return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


# -(2^e + z) as the bits of the output dtype: 2^e + z for a zero point z below 2^7 (bf16) or 2^10 (fp16) is
# 2^e with z as its mantissa bits, so its negation is z ORed into these (-2^7 in bf16, -2^10 in fp16). Integer
# work only, where converting z to fp32, adding, negating and rounding to the dtype took four instructions a
# row and group (INT4 zero points are 0..15: the same bits, tests/test_int4_triton.py).
NEG_MAGIC_BF16 = tl.constexpr(0xC300)
NEG_MAGIC_FP16 = tl.constexpr(0xE400)


@triton.jit
def neg_magic_zero(z, DT: tl.constexpr):
    """The 16-bit pattern of -(2^e + z) in DT (int32 lanes), for integer zero points z in 0..15."""
    if DT == tl.float16:
        return z | NEG_MAGIC_FP16
    else:
        return z | NEG_MAGIC_BF16


@triton.jit
def dequant_words(words, z, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words [R, W] and zero-points z [R] (uint8) -> q - z as DT [R, W, 2, 2, 2]
    (reshape to [R, 8W] for the canonical column order). USE_ASM False (Triton's
    interpreter, which runs no PTX): the same values by plain integer ops."""
    if USE_ASM:
        bias = _pair(neg_magic_zero(z.to(tl.int32), DT), words)
        if DT == tl.float16:
            q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
                ASM_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, bias], dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        else:
            q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
                ASM_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [words, bias], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        zf = z.to(tl.float32)[:, None]
        q0 = (((words >> 0) & 0xF).to(tl.float32) - zf).to(DT)
        q1 = (((words >> 4) & 0xF).to(tl.float32) - zf).to(DT)
        q2 = (((words >> 8) & 0xF).to(tl.float32) - zf).to(DT)
        q3 = (((words >> 12) & 0xF).to(tl.float32) - zf).to(DT)
        q4 = (((words >> 16) & 0xF).to(tl.float32) - zf).to(DT)
        q5 = (((words >> 20) & 0xF).to(tl.float32) - zf).to(DT)
        q6 = (((words >> 24) & 0xF).to(tl.float32) - zf).to(DT)
        q7 = (((words >> 28) & 0xF).to(tl.float32) - zf).to(DT)
    # join appends a minor axis, so the first join is the most significant bit of j:
    # [..., a, b, c] holds nibble 4a + 2b + c.
    return tl.join(tl.join(tl.join(q0, q4), tl.join(q2, q6)), tl.join(tl.join(q1, q5), tl.join(q3, q7)))


@triton.jit
def _pair(v, words):
    """A 16-bit value per row ([R], or [B, R]) as both halves of an int32, broadcast to words' shape
    ([R, W], or [B, R, W])."""
    v = v.to(tl.int32) & 0xFFFF
    return tl.expand_dims(v | (v << 16), len(words.shape) - 1) + tl.zeros_like(words)


@triton.jit
def k4_order(x):
    """x [B, M, C] (C a multiple of 32) with its columns in the order dequant_operand gives a batch of
    weights: within each 32 columns, position 16a + 4i + 2b + c holds column 16a + 8b + 2i + c. A dot
    sums over its K in any order, as long as both operands share it: in this one each thread's four
    consecutive K of a batched dot's operand are one code word's, so the dequantized weight stays in the
    registers it was unpacked in (in canonical order Triton took it through shared memory)."""
    B: tl.constexpr = x.shape[0]
    M: tl.constexpr = x.shape[1]
    C: tl.constexpr = x.shape[2]
    return tl.reshape(tl.permute(tl.reshape(x, (B, M, C // 32, 2, 2, 4, 2)), (0, 1, 2, 3, 5, 4, 6)), (B, M, C))


@triton.jit
def dequant_operand(words, z, s, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words [R, W] in int4_layouts' "operand" layout, zero-points z [R] (uint8) and scales
    s [R] -> (q - z) * s as DT [R, 8W] in canonical column order, each value rounded once. Or a
    batch of them: words [B, R, W], z and s [B, R] -> [B, R, 8W] (a batched dot's operand), its
    columns in k4_order, the order in which each thread of a batched dot's operand (kWidth 4) already
    holds them.
    (Float offsets, w = q s + m, are not taken: m rounded to DT before the sum loses the weight
    where q s is close to -m; such weights keep the canonical layout.)

    Word i of a 32-column chunk holds, in nibble 4c + 2b + a, the chunk's column
    16a + 8b + 2(i mod 4) + c: joining the nibbles (minor axes a, b, c) and moving i mod 4 between
    b and c gives the columns in order, and that order is the tensor-core register operand's
    (kWidth 2), so the join, permute and reshape are free register renames."""
    if USE_ASM:
        if DT == tl.float16:  # the bit trick's 2^e: fp16's 2^10, bf16's 2^7
            asm: tl.constexpr = ASM_FP16_SCALED
            out: tl.constexpr = (tl.float16,) * 8
        else:
            asm: tl.constexpr = ASM_BF16_SCALED
            out: tl.constexpr = (tl.bfloat16,) * 8
        q0, q1, q2, q3, q4, q5, q6, q7 = tl.inline_asm_elementwise(
            asm, "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r",
            [words, _pair(neg_magic_zero(z.to(tl.int32), DT), words),
             _pair(s.to(DT).to(tl.int16, bitcast=True), words)],
            dtype=out, is_pure=True, pack=1)
    else:
        zf = tl.expand_dims(z.to(tl.float32), len(words.shape) - 1)
        sf = tl.expand_dims(s.to(tl.float32), len(words.shape) - 1)
        q0 = ((((words >> 0) & 0xF).to(tl.float32) - zf) * sf).to(DT)
        q1 = ((((words >> 4) & 0xF).to(tl.float32) - zf) * sf).to(DT)
        q2 = ((((words >> 8) & 0xF).to(tl.float32) - zf) * sf).to(DT)
        q3 = ((((words >> 12) & 0xF).to(tl.float32) - zf) * sf).to(DT)
        q4 = ((((words >> 16) & 0xF).to(tl.float32) - zf) * sf).to(DT)
        q5 = ((((words >> 20) & 0xF).to(tl.float32) - zf) * sf).to(DT)
        q6 = ((((words >> 24) & 0xF).to(tl.float32) - zf) * sf).to(DT)
        q7 = ((((words >> 28) & 0xF).to(tl.float32) - zf) * sf).to(DT)
    # join appends a minor axis, so the innermost join's is the first of the three: [..., a, b, c]
    # holds nibble 4c + 2b + a. Nibbles j and j + 4, which the assembly leaves in one register,
    # are columns 2i and 2i + 1: the operand's register pair, so no byte permutes either.
    q = tl.join(tl.join(tl.join(q0, q1), tl.join(q2, q3)), tl.join(tl.join(q4, q5), tl.join(q6, q7)))
    if len(words.shape) == 2:
        R: tl.constexpr = words.shape[0]
        W: tl.constexpr = words.shape[1]
        q = tl.permute(tl.reshape(q, (R, W // 4, 4, 2, 2, 2)), (0, 1, 3, 4, 2, 5))
        q = tl.reshape(q, (R, 8 * W))
    else:
        B: tl.constexpr = words.shape[0]
        R: tl.constexpr = words.shape[1]
        W: tl.constexpr = words.shape[2]
        # [.., chunk, i, a, b, c] -> [.., chunk, a, i, b, c]: k4_order
        q = tl.permute(tl.reshape(q, (B, R, W // 4, 4, 2, 2, 2)), (0, 1, 2, 4, 3, 5, 6))
        q = tl.reshape(q, (B, R, 8 * W))
    return q
