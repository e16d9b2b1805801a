"""Forward, cuBLAS-logits variant: fold one logits slab into the running log-sum-exp (no tl.dot).

For the classes v = v_begin + j of a slab whose logits came from cuBLAS (``F.linear`` semantics, already
rounded to the input dtype):

    z[n, j]          = fp32(logits[n, j])                                     # [N, slab]
    s[n, j]          = c * tanh(z[n, j] / c) if HAS_SOFTCAP else z[n, j]      # c = softcap; fp32, not rounded
    new_max2[n]      = max(max2[n], max_j s[n, j] * log2(e))                  # [N] running state, log2 units
    sumexp[n]        = sumexp[n] * exp2(max2[n] - new_max2[n]) + sum_j exp2(s[n, j] * log2(e) - new_max2[n])
    sum_logits[n]   += sum_j s[n, j]                                          # [N] fp32
    target_logit[n]  = s[n, target[n] - v_begin]  if target[n] is in the slab

FIRST initialises the state (max2 = -inf, sumexp = 0, sum_logits = 0, target_logit = 0). Grid: (cdiv(N, BLOCK_M),).
Without HAS_SOFTCAP the ``softcap`` argument is unused; with it, it is made fp32 first (Inductor may pass it
as fp64). Scores and the online update are the shared ``_softmax`` helpers.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import LOG2E, row_configs
from ._softmax import online_lse, scores


@triton.jit
def lse_update_kernel_jit(
    logits_ptr, target_ptr,                            # [N, slab] (row stride stride_logits), [N] int64
    max2_ptr, sumexp_ptr, sum_ptr, target_logit_ptr,   # [N] fp32 each, updated in place
    N, slab, v_begin, stride_logits, softcap,          # softcap: fp32 scalar (> 0 if used)
    FIRST: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows_safe = tl.where(row_ok, rows, 0)
    target_col = tl.load(target_ptr + rows_safe) - v_begin              # [BLOCK_M] target's column in the slab
    if FIRST:
        max2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        sumexp = tl.zeros([BLOCK_M], tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        target_logit = tl.zeros([BLOCK_M], tl.float32)
    else:
        max2 = tl.load(max2_ptr + rows_safe)
        sumexp = tl.load(sumexp_ptr + rows_safe)
        total = tl.load(sum_ptr + rows_safe)
        target_logit = tl.load(target_logit_ptr + rows_safe)
    if HAS_SOFTCAP:
        softcap = tl.cast(softcap, tl.float32)  # Inductor passes a Python float as fp64: keep every tile fp32
    row_base = logits_ptr + rows_safe.to(tl.int64)[:, None] * stride_logits
    for j0 in range(0, slab, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_ok = j < slab
        z = tl.load(row_base + j[None, :], mask=col_ok[None, :], other=float("-inf")).to(tl.float32)
        s, _ = scores(z, softcap, HAS_SOFTCAP)
        if HAS_SOFTCAP:
            s = tl.where(col_ok[None, :], s, float("-inf"))          # (masked columns gave -softcap)
        target_logit += tl.sum(tl.where((j[None, :] == target_col[:, None]) & col_ok[None, :], s, 0.0), axis=1)
        total += tl.sum(tl.where(col_ok[None, :], s, 0.0), axis=1)
        max2, sumexp = online_lse(max2, sumexp, s * LOG2E)
    tl.store(max2_ptr + rows, max2, mask=row_ok)
    tl.store(sumexp_ptr + rows, sumexp, mask=row_ok)
    tl.store(sum_ptr + rows, total, mask=row_ok)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_ok)


lse_update_kernel = triton.autotune(
    configs=row_configs(), key=["slab", "N"],
    restore_value=["max2_ptr", "sumexp_ptr", "sum_ptr", "target_logit_ptr"],
)(lse_update_kernel_jit)
