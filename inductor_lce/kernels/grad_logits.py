"""Backward, step 1 of a V-slab: grad_logits for classes [v_begin, v_begin + slab) from recomputed logits.

    z[n, v]           = fp32(dtype(hidden[n] . weight[v] + bias[v]))          # tl.dot tiles, as in the forward
    s[n, v]           = c * tanh(z[n, v] / c) if HAS_SOFTCAP else z[n, v]     # c = softcap, fp32
    g[n]              = grad_loss[n] if target[n] != ignore_index else 0
    grad_s[n, v]      = exp(s[n, v] - lse[n]) * (g[n] + grad_lse[n]) - [v == target[n]] * g[n]
                        + grad_sum[n]                                         # grad_lse / grad_sum: optional
    grad_logits[n, j] = dtype(grad_s[n, v] * (1 - (s[n, v] / c)^2)) if HAS_SOFTCAP else dtype(grad_s[n, v]),
                        v = v_begin + j
    grad_bias[v]     += sum_n grad_logits[n, j]    # of the rounded grad_logits; fp32 atomics (HAS_BIAS)

grad_lse / grad_sum are not masked on ignored tokens (only g is); without HAS_SOFTCAP ``softcap`` is unused (with
it, it is made fp32 first: Inductor may pass it as fp64). The per-element steps are the ``_softmax`` helpers.
grad_logits: [N, slab] in the input dtype, row stride ``stride_out``; it feeds the two cuBLAS/Triton
matmuls of the slab (grad_weight[slab] = grad_logits.T @ hidden, grad_hidden += grad_logits @ weight[slab]).
Grid: one program per [BLOCK_M, BLOCK_N] tile, grouped GROUP_M row blocks at a time for L2 reuse (``_grid``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import configs
from ._grid import grouped_tile
from ._logits_tile import logits_tile
from ._softmax import grad_logits_out, row_grad_weights, scores, softmax_grad


@triton.jit
def grad_logits_kernel_jit(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr,      # [N, D], [V, D], [V], [N] int64
    lse_ptr, grad_loss_ptr, grad_lse_ptr, grad_sum_ptr,  # [N] fp32 each (grad_lse, grad_sum optional)
    grad_logits_ptr, grad_bias_ptr,                    # [N, slab] out, [V] fp32 accumulated
    N, D, v_begin, slab, n_bucket, stride_hidden, stride_weight, stride_out, ignore_index,
    softcap,                                           # fp32 scalar (> 0 if used)
    HAS_BIAS: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, HAS_GRAD_SUM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    if HAS_SOFTCAP:
        softcap = tl.cast(softcap, tl.float32)  # Inductor passes a Python float as fp64: keep every tile fp32
    pid_m, pid_n = grouped_tile(N, slab, BLOCK_M, BLOCK_N, GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                       # [BLOCK_M] tokens
    row_ok = rows < N
    rows_safe = tl.where(row_ok, rows, 0)
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                          # [BLOCK_N] column in the slab
    col_ok = j < slab
    cols = v_begin + tl.where(col_ok, j, 0)                              # class ids (in-bounds)
    h_rows = hidden_ptr + rows_safe.to(tl.int64)[:, None] * stride_hidden
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_weight
    z = logits_tile(h_rows, w_rows, bias_ptr, cols, D, HAS_BIAS, EVEN_K, DOT_FP32, DOT_PRECISION,
                    BLOCK_M, BLOCK_N, BLOCK_K)                           # [BLOCK_M, BLOCK_N] logits, fp32

    target, lse, g, g_total = row_grad_weights(target_ptr, lse_ptr, grad_loss_ptr, grad_lse_ptr, rows_safe,
                                               ignore_index, HAS_GRAD_LSE)
    s, th = scores(z, softcap, HAS_SOFTCAP)
    grad = softmax_grad(s, lse, g_total, g, cols[None, :] == target[:, None])
    if HAS_GRAD_SUM:
        grad += tl.load(grad_sum_ptr + rows_safe)[:, None]
    grad = grad_logits_out(grad, th, grad_logits_ptr.dtype.element_ty, HAS_SOFTCAP, DOT_FP32)
    out = grad_logits_ptr + rows_safe.to(tl.int64)[:, None] * stride_out + j[None, :]
    tl.store(out, grad, mask=row_ok[:, None] & col_ok[None, :])
    if HAS_BIAS:
        col_sum = tl.sum(tl.where(row_ok[:, None], grad.to(tl.float32), 0.0), axis=0)
        tl.atomic_add(grad_bias_ptr + cols, col_sum, mask=col_ok)


# restore_value: autotuning replays the kernel, which must not add grad_bias twice
grad_logits_kernel = triton.autotune(
    configs=configs("grad_logits"), key=["D", "slab", "n_bucket"], restore_value=["grad_bias_ptr"]
)(
    grad_logits_kernel_jit
)
