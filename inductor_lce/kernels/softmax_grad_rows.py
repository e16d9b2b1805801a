"""Fused op (three GEMMs), step 2 of a row chunk: logits rows -> loss, lse, and grad_logits in place (no tl.dot).

For each row n of a logits chunk [rows, V] (cuBLAS output: bf16 / fp16 / fp32, row stride ``stride_logits``):

    z[n, v]      = fp32(logits[n, v])
    s[n, v]      = c * tanh(z[n, v] / c) if HAS_SOFTCAP else z[n, v]             # c = softcap, fp32
    lse[n]       = log(sum_v exp(s[n, v]))                   # pass 1: online max and sum of exp2 in log2 units
    loss[n]      = lse[n] - s[n, target[n]]  if target[n] != ignore_index else 0
    g[n]         = grad_scale                if target[n] != ignore_index else 0   # grad_scale read on the device
    logits[n, v] = dtype((exp(s[n, v] - lse[n]) - [v == target[n]]) * g[n] * (1 - (s[n, v] / c)^2))   # pass 2
                   (no last factor without HAS_SOFTCAP; ignored rows are written too, with zeros)

Pass 1 reads the row, pass 2 reads and rewrites it: memory-bound. Each step covers BLOCK_N columns of BLOCK_M rows;
the full blocks are unmasked (vector loads/stores when the row stride allows), one masked block takes the tail.
The per-element math is the ``_softmax`` helpers shared with the other logits kernels.
Grid: (cdiv(rows, BLOCK_M),).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import LOG2E, row_configs
from ._softmax import grad_logits_out, online_lse, scores, softmax_grad

_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _fold_block(row_base, cols, V, target, max2, sumexp, target_logit, softcap,
                HAS_SOFTCAP: tl.constexpr, MASKED: tl.constexpr):
    """Pass 1 on one block of columns: the running (max2, sumexp) and the target's score."""
    if MASKED:
        col_ok = cols < V
        z = tl.load(row_base + cols[None, :], mask=col_ok[None, :], other=0.0).to(tl.float32)
    else:
        z = tl.load(row_base + cols[None, :]).to(tl.float32)
    s, _ = scores(z, softcap, HAS_SOFTCAP)
    target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), axis=1)
    s2 = s * LOG2E
    if MASKED:
        s2 = tl.where(col_ok[None, :], s2, float("-inf"))
    max2, sumexp = online_lse(max2, sumexp, s2)
    return max2, sumexp, target_logit


@triton.jit
def _grad_block(row_base, cols, V, target, lse, g, row_ok, softcap,
                HAS_SOFTCAP: tl.constexpr, EMULATE_ROUNDING: tl.constexpr, MASKED: tl.constexpr):
    """Pass 2 on one block of columns: grad_logits written over the logits."""
    ptrs = row_base + cols[None, :]
    if MASKED:
        mask = row_ok[:, None] & (cols < V)[None, :]
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        mask = row_ok[:, None]
        z = tl.load(ptrs).to(tl.float32)
    s, t = scores(z, softcap, HAS_SOFTCAP)
    grad = softmax_grad(s, lse, g, g, cols[None, :] == target[:, None])
    tl.store(ptrs, grad_logits_out(grad, t, row_base.dtype.element_ty, HAS_SOFTCAP, EMULATE_ROUNDING), mask=mask)


@triton.jit
def softmax_grad_rows_kernel_jit(
    logits_ptr, target_ptr, loss_ptr, lse_ptr, grad_scale_ptr,   # [rows, V] in/out, [rows] int64, [rows] fp32 x2, []
    n_rows, V, stride_logits, ignore_index, softcap,             # softcap: > 0 if used
    HAS_SOFTCAP: tl.constexpr, EMULATE_ROUNDING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if HAS_SOFTCAP:
        softcap = tl.cast(softcap, tl.float32)  # Inductor passes a Python float as fp64: keep every tile fp32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows_safe = tl.where(row_ok, rows, 0)                               # in-bounds loads; stores are masked
    target = tl.load(target_ptr + rows_safe)
    row_base = logits_ptr + rows_safe.to(tl.int64)[:, None] * stride_logits
    cols = tl.arange(0, BLOCK_N)
    v_full = V - V % BLOCK_N                                            # columns in unmasked blocks

    max2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sumexp = tl.zeros([BLOCK_M], tl.float32)
    target_logit = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(0, v_full, BLOCK_N):
        max2, sumexp, target_logit = _fold_block(row_base, v0 + cols, V, target, max2, sumexp, target_logit, softcap,
                                                 HAS_SOFTCAP, False)
    if v_full < V:
        max2, sumexp, target_logit = _fold_block(row_base, v_full + cols, V, target, max2, sumexp, target_logit,
                                                 softcap, HAS_SOFTCAP, True)
    lse = (max2 + tl.log2(sumexp)) * _LN2
    valid = target != ignore_index
    tl.store(loss_ptr + rows, tl.where(valid, lse - target_logit, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)

    g = tl.where(valid, tl.load(grad_scale_ptr), 0.0)
    for v0 in range(0, v_full, BLOCK_N):
        _grad_block(row_base, v0 + cols, V, target, lse, g, row_ok, softcap, HAS_SOFTCAP, EMULATE_ROUNDING, False)
    if v_full < V:
        _grad_block(row_base, v_full + cols, V, target, lse, g, row_ok, softcap, HAS_SOFTCAP, EMULATE_ROUNDING, True)


# restore_value: autotuning replays the kernel, which works in place (the host runs its first launch per V on a few
# hundred rows alone, so that this copy is not the whole chunk; loss / lse are rewritten identically)
softmax_grad_rows_kernel = triton.autotune(
    configs=row_configs("softmax_grad_rows"), key=["V"], restore_value=["logits_ptr"]
)(softmax_grad_rows_kernel_jit)
