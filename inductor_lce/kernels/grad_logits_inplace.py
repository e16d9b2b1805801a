"""Backward, cuBLAS-logits variant of step 1: turn a logits slab into grad_logits in place (no tl.dot).

For a slab of classes v = v_begin + j whose logits [N, slab] came from cuBLAS (input dtype):

    z[n, j]           = fp32(logits[n, j])
    s[n, j]           = c * tanh(z[n, j] / c) if HAS_SOFTCAP else z[n, j]           # c = softcap, fp32
    g[n]              = grad_loss[n] if target[n] != ignore_index else 0
    grad_s[n, j]      = exp(s[n, j] - lse[n]) * (g[n] + grad_lse[n]) - [v == target[n]] * g[n]
                        + grad_sum[n]                                               # grad_lse / grad_sum: optional
    grad_logits[n, j] = dtype(grad_s[n, j] * (1 - (s[n, j] / c)^2))  if HAS_SOFTCAP else dtype(grad_s[n, j])
    grad_bias[v]     += sum_n grad_logits[n, j]        # of the rounded grad_logits; fp32 atomics (HAS_BIAS)

grad_lse / grad_sum are not masked on ignored tokens (only g is). Without HAS_SOFTCAP the ``softcap``
argument is unused (with it, it is made fp32 first: Inductor may pass it as fp64). The per-element steps are the
``_softmax`` helpers, shared with grad_logits.py and softmax_grad_rows.py.
Grid: (cdiv(N, BLOCK_M), cdiv(slab, BLOCK_N)).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import row_configs
from ._softmax import grad_logits_out, row_grad_weights, scores, softmax_grad


@triton.jit
def grad_logits_inplace_kernel_jit(
    logits_ptr, target_ptr, lse_ptr, grad_loss_ptr,                 # [N, slab] in/out, [N] x3
    grad_lse_ptr, grad_sum_ptr,                                     # [N] fp32 each (optional)
    grad_bias_ptr,                                                  # [V] fp32, accumulated
    N, slab, v_begin, stride_logits, ignore_index, softcap,         # softcap: fp32 scalar (> 0 if used)
    HAS_BIAS: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, HAS_GRAD_SUM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EMULATE_ROUNDING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if HAS_SOFTCAP:
        softcap = tl.cast(softcap, tl.float32)  # Inductor passes a Python float as fp64: keep every tile fp32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows_safe = tl.where(row_ok, rows, 0)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = j < slab
    mask = row_ok[:, None] & col_ok[None, :]
    ptrs = logits_ptr + rows_safe.to(tl.int64)[:, None] * stride_logits + j[None, :]
    z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    target, lse, g, g_total = row_grad_weights(target_ptr, lse_ptr, grad_loss_ptr, grad_lse_ptr, rows_safe,
                                               ignore_index, HAS_GRAD_LSE)
    s, th = scores(z, softcap, HAS_SOFTCAP)
    grad = softmax_grad(s, lse, g_total, g, (v_begin + j)[None, :] == target[:, None])
    if HAS_GRAD_SUM:
        grad += tl.load(grad_sum_ptr + rows_safe)[:, None]
    grad = grad_logits_out(grad, th, logits_ptr.dtype.element_ty, HAS_SOFTCAP, EMULATE_ROUNDING)
    tl.store(ptrs, grad, mask=mask)
    if HAS_BIAS:
        col_sum = tl.sum(tl.where(mask, grad.to(tl.float32), 0.0), axis=0)
        tl.atomic_add(grad_bias_ptr + v_begin + j, col_sum, mask=col_ok)


# restore_value: autotuning replays the kernel, which works in place
grad_logits_inplace_kernel = triton.autotune(
    configs=row_configs(), key=["slab", "N"], restore_value=["logits_ptr", "grad_bias_ptr"]
)(grad_logits_inplace_kernel_jit)
