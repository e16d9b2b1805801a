"""``round_to(x, dtype)``: fp32 -> dtype with round-to-nearest-even, also under Triton's interpreter.

triton 3.6's interpreter converts fp32 -> bf16 by truncation (relative error up to 2^-7 instead of 2^-8),
which would make interpreted logits and gradients differ from the GPU's and from PyTorch. When
``EMULATE`` (interpreting) the bf16 rounding is done on the bits (add 0x7FFF plus the lowest kept bit, then
drop the low 16 bits; NaN/inf are not special-cased) before the conversion, which is then exact. On the
GPU it is the plain conversion (hardware RTNE).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    if EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
