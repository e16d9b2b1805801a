"""Backward, step 3 of a V-slab: grad_hidden += grad_logits @ weight_slab, without bf16 drift over slabs.

    acc[n, d] = sum_j grad_logits[n, j] * weight_slab[j, d]      # [N, D] tile by tl.dot, fp32, K = slab

The running sum over slabs lives in one of two states (MODE):

* MODE 0 (fp32): state[n, d] += acc in an fp32 [N, D] buffer; the LAST slab writes dtype(state + acc)
  into grad_hidden. 4 bytes per element: used where N * D * 4 fits the workspace, or for fp32 inputs
  (state is grad_hidden itself).
* MODE 1 (compensated): the state is hi + lo * |hi| * lo_step with hi = grad_hidden itself (its dtype)
  and lo an int8 [N, D] buffer: each slab computes total = hi + lo * |hi| * lo_step + acc, stores
  hi = dtype(total) and lo = round((total - hi) / (|hi| * lo_step)) clamped to [-127, 127].
  |total - hi| <= |hi| * 2^-(mantissa bits + 1), so lo_step = 2^-(mantissa bits + 8) keeps ~8 more bits
  than the dtype (bf16: 16-bit significand): 1 extra byte per element instead of 2 for fp32.
  Plain dtype accumulation over S slabs would add ~sqrt(S) roundings of the running sum (1e-2 relative
  error at S = 64 in bf16, measured; see bench/NOTES.md).

Grid: one program per [BLOCK_M, BLOCK_N] tile of [N, D], grouped GROUP_M row blocks at a time.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import configs


@triton.jit
def grad_hidden_kernel_jit(
    grad_logits_ptr, weight_ptr,                       # [N, slab] (row stride stride_gl), weight[slab] [slab, D]
    state_ptr, lo_ptr, out_ptr,                        # MODE 0: fp32 [N, D]; MODE 1: int8 [N, D]; out [N, D]
    N, D, slab, n_bucket, stride_gl, stride_weight, stride_state, stride_out, lo_step,
    MODE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(D, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                      # [BLOCK_M] tokens
    row_ok = rows < N
    rows_safe = tl.where(row_ok, rows, 0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                      # [BLOCK_N] hidden features
    col_ok = cols < D
    cols_safe = tl.where(col_ok, cols, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = grad_logits_ptr + rows_safe[:, None] * stride_gl
    b_cols = weight_ptr + cols_safe[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, slab, BLOCK_K):
        k = k0 + offs_k
        if EVEN_K:
            a = tl.load(a_rows + k[None, :])
            b = tl.load(b_cols + k.to(tl.int64)[:, None] * stride_weight)
        else:
            a = tl.load(a_rows + k[None, :], mask=k[None, :] < slab, other=0.0)
            b = tl.load(b_cols + k.to(tl.int64)[:, None] * stride_weight, mask=k[:, None] < slab, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mask = row_ok[:, None] & col_ok[None, :]
    out_ptrs = out_ptr + rows_safe[:, None] * stride_out + cols_safe[None, :]
    state_ptrs = state_ptr + rows_safe[:, None] * stride_state + cols_safe[None, :]
    if MODE == 0:
        total = acc
        if not FIRST:
            total += tl.load(state_ptrs, mask=mask, other=0.0)
        if LAST:
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(state_ptrs, total, mask=mask)
    else:
        lo_ptrs = lo_ptr + rows_safe[:, None] * stride_state + cols_safe[None, :]
        total = acc
        if not FIRST:
            hi = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
            lo = tl.load(lo_ptrs, mask=mask, other=0).to(tl.float32)
            total += hi + lo * (tl.abs(hi) * lo_step)
        new_hi = total.to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, new_hi, mask=mask)
        if not LAST:
            hi_f = new_hi.to(tl.float32)
            scale = tl.abs(hi_f) * lo_step
            q = tl.where(scale > 0.0, (total - hi_f) / scale, 0.0)
            q = tl.minimum(tl.maximum(tl.floor(q + 0.5), -127.0), 127.0)
            tl.store(lo_ptrs, q.to(tl.int8), mask=mask)


# restore_value: autotuning replays the kernel, which must not add a slab twice
grad_hidden_kernel = triton.autotune(
    configs=configs("grad_hidden"), key=["D", "slab", "n_bucket"],
    restore_value=["state_ptr", "lo_ptr", "out_ptr"],
)(grad_hidden_kernel_jit)
