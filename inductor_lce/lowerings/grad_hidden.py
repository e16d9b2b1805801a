"""Backward, step 3 of a V-slab: grad_hidden += grad_logits @ weight_slab, without bf16 drift over slabs.

    acc[n, d] = sum_j grad_logits[n, j] * weight_slab[j, d]      # [N, D] tile by tl.dot, fp32, K = slab

The running sum over slabs lives in one of two states (MODE):

* MODE 0 (fp32): state[n, d] += acc in an fp32 [N, D] buffer; the LAST slab writes dtype(state + acc)
  into grad_hidden. 4 bytes per element: used where N * D * 4 fits the workspace, or for fp32 inputs
  (state is grad_hidden itself).
* MODE 1 (compensated): the state is hi + lo * unit(hi) with hi = grad_hidden itself (its dtype) and lo an
  int8 [N, D] buffer: each slab computes total = hi + lo * unit(hi) + acc, stores hi = dtype(total) and
  lo = round((total - hi) / unit(hi)) clamped to [-127, 127]. unit(hi) = half an ulp of hi / 2^7, a power
  of two read off hi's exponent bits (so both scalings are exact multiplications, no division):
  |total - hi| <= half an ulp, so lo keeps 7 more bits than the dtype (bf16: 15-bit significand) for
  1 extra byte per element instead of 2 for fp32.
  Plain dtype accumulation over S slabs would add ~sqrt(S) roundings of the running sum (1e-2 relative
  error at S = 64 in bf16, measured; see bench/NOTES.md).

Grid: one program per [BLOCK_M, BLOCK_N] tile of [N, D], grouped GROUP_M row blocks at a time.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import configs
from ._rounding import round_to


@triton.jit
def lo_unit(hi):
    """(unit, 1 / unit) in fp32 for a bf16/fp16 tensor hi: unit = 2^(exponent(hi) - mantissa bits - 8)."""
    bits = hi.to(tl.int16, bitcast=True).to(tl.int32)
    if hi.dtype == tl.bfloat16:   # 8 exponent bits (bias 127), 7 mantissa bits; tiny |hi| < 2^-111 share one unit
        unit_exp = tl.maximum((bits >> 7) & 0xFF, 16) - 127 - 15
    else:                         # fp16: 5 exponent bits (bias 15), 10 mantissa bits; subnormals use e = 1
        unit_exp = tl.maximum((bits >> 10) & 0x1F, 1) - 15 - 18
    unit = ((unit_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_unit = ((127 - unit_exp) << 23).to(tl.float32, bitcast=True)
    return unit, inv_unit


@triton.jit
def grad_hidden_kernel_jit(
    grad_logits_ptr, weight_ptr,                       # [N, slab] (row stride stride_gl), weight_slab [slab, D]
    state_ptr, lo_ptr, out_ptr,                        # MODE 0: fp32 [N, D]; MODE 1: int8 [N, D]; out [N, D]
    N, D, slab, n_bucket, stride_gl, stride_weight, stride_state, stride_out,
    MODE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
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

    row0 = pid_m * BLOCK_M
    local_rows = tl.arange(0, BLOCK_M)                                  # [BLOCK_M] tokens row0 + i
    row_ok = row0 + local_rows < N
    local_rows = tl.where(row_ok, local_rows, 0)                        # in-bounds loads; stores are masked
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                      # [BLOCK_N] hidden features
    col_ok = cols < D
    if not EVEN_D:  # (D % BLOCK_N == 0 keeps the columns provably contiguous for vector loads)
        cols = tl.where(col_ok, cols, 0)
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit row-block bases, 32-bit offsets inside a tile; the K loop advances the pointers
    a_ptrs = grad_logits_ptr + row0.to(tl.int64) * stride_gl + (local_rows[:, None] * stride_gl + offs_k[None, :])
    b_ptrs = weight_ptr + (offs_k[:, None] * stride_weight + cols[None, :])

    mask = row_ok[:, None] & col_ok[None, :]
    offs = local_rows[:, None] * stride_out + cols[None, :]            # same layout for out, state and lo
    out_ptrs = out_ptr + row0.to(tl.int64) * stride_out + offs
    state_ptrs = state_ptr + row0.to(tl.int64) * stride_state + (local_rows[:, None] * stride_state + cols[None, :])
    lo_ptrs = lo_ptr + row0.to(tl.int64) * stride_out + offs            # lo is [N, D] contiguous like out
    # The running state is loaded before the K loop so that its HBM traffic overlaps the tensor-core work
    # (loaded after the loop, every tile's epilogue waited on it: 1.5x slower per slab, bench/NOTES.md).
    if not FIRST:
        if MODE == 0:
            prev = tl.load(state_ptrs, mask=mask, other=0.0)
        else:
            prev_hi = tl.load(out_ptrs, mask=mask, other=0.0)
            prev_lo = tl.load(lo_ptrs, mask=mask, other=0)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, slab, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < slab - k0, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < slab - k0, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_weight

    if MODE == 0:
        total = acc
        if not FIRST:
            total += prev
        if LAST:
            tl.store(out_ptrs, round_to(total, out_ptr.dtype.element_ty, DOT_FP32), mask=mask)
        else:
            tl.store(state_ptrs, total, mask=mask)
    else:
        total = acc
        if not FIRST:
            unit, _ = lo_unit(prev_hi)
            total += prev_hi.to(tl.float32) + prev_lo.to(tl.float32) * unit
        new_hi = round_to(total, out_ptr.dtype.element_ty, DOT_FP32)
        tl.store(out_ptrs, new_hi, mask=mask)
        if not LAST:
            _, inv_unit = lo_unit(new_hi)
            q = (total - new_hi.to(tl.float32)) * inv_unit
            q = tl.minimum(tl.maximum(tl.floor(q + 0.5), -127.0), 127.0)
            tl.store(lo_ptrs, q.to(tl.int8), mask=mask)


# restore_value: autotuning replays the kernel, which must not add a slab twice
grad_hidden_kernel = triton.autotune(
    configs=configs("grad_hidden"), key=["D", "slab", "n_bucket"],
    restore_value=["state_ptr", "lo_ptr", "out_ptr"],
)(grad_hidden_kernel_jit)
