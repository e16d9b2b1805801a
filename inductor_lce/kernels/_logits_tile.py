"""``logits_tile``: one [BLOCK_M, BLOCK_N] tile of logits, rounded like F.linear, for the kernels that recompute
logits instead of reading them (lse_forward.py, grad_logits.py).

    z[m, n] = fp32(dtype(sum_k hidden[m, k] * weight[n, k] + bias[n]))    # tl.dot over D, fp32 accumulator

h_rows / w_rows: [BLOCK_M, 1] / [BLOCK_N, 1] pointers to the rows' starts (callers clamp rows and columns past
the matrix to valid ones and mask what they store); bias_cols: [BLOCK_N] class ids of bias_ptr (read only
if HAS_BIAS). The product is rounded to the input dtype once, after the bias, as cuBLAS's addmm does; DOT_FP32
(the interpreter, where bf16 tl.dot is wrong) upcasts the operands and emulates the rounding (``_rounding``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._rounding import round_to


@triton.jit
def logits_tile(h_rows, w_rows, bias_ptr, bias_cols, D, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            a = tl.load(h_rows + k[None, :])                                  # [BLOCK_M, BLOCK_K]
            b = tl.load(w_rows + k[None, :])                                  # [BLOCK_N, BLOCK_K]
        else:
            a = tl.load(h_rows + k[None, :], mask=k[None, :] < D, other=0.0)
            b = tl.load(w_rows + k[None, :], mask=k[None, :] < D, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + bias_cols).to(tl.float32)[None, :]
    return round_to(acc, h_rows.dtype.element_ty, DOT_FP32).to(tl.float32)  # logits in the input dtype
