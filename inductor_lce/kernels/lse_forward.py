"""Forward: per-token log-sum-exp, target logit and sum of the (soft-capped) logits of ``hidden @ weight.T + bias``,
never storing logits.

For tokens n (BLOCK_M per program) and the classes v of one V-split p:

    z[n, v]           = fp32(dtype(hidden[n] . weight[v] + bias[v]))  # tl.dot tiles, fp32 acc., rounded like F.linear
    s[n, v]           = c * tanh(z[n, v] / c) if HAS_SOFTCAP else z[n, v]   # c = softcap; fp32, not rounded
    max2[p, n]        = max_v  s[n, v] * log2(e)                      # [SPLITS, N]  running max (log2 units)
    sumexp[p, n]      = sum_v  exp2(s[n, v] * log2(e) - max2[p, n])   # [SPLITS, N]  online rescaled sum
    partial_sum[p, n] = sum_v  s[n, v]                                # [SPLITS, N]  fp32
    target_logit[n]   = s[n, target[n]]                               # [N]  stored by the one split holding target[n]

The host combines the splits: lse = ln2 * (M + log2(sum_p sumexp[p] * exp2(max2[p] - M))), M = max_p max2[p],
and sum_logits = sum_p partial_sum[p]. tanh is ``_tanh.tanh_f32`` (exp2 + polynomial; libdevice's is an extern
call the interpreter cannot run). Without HAS_SOFTCAP the ``softcap`` argument is unused; with it, it is made fp32
first (Inductor may pass it as fp64). Scores and the online update are the shared ``_softmax`` helpers.
Grid: (cdiv(N, BLOCK_M), SPLITS); program (m, p) walks the classes [p * v_per_split, (p + 1) * v_per_split).
Consecutive programs share a split, so the weight tiles they stream are read from L2 by all row blocks.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import LOG2E, configs
from ._logits_tile import logits_tile
from ._softmax import online_lse, scores


@triton.jit
def lse_forward_kernel_jit(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr,       # [N, D], [V, D], [V], [N] int64
    max2_ptr, sumexp_ptr, sum_ptr, target_logit_ptr,    # [SPLITS, N] fp32 x3, [N] fp32
    N, V, D, v_per_split, n_bucket, stride_hidden, stride_weight, softcap,   # softcap: fp32 scalar (> 0 if used)
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                        # [BLOCK_M]
    row_ok = rows < N
    rows_safe = tl.where(row_ok, rows, 0)                                 # in-bounds loads; stores are masked
    target = tl.load(target_ptr + rows_safe)
    v_begin = split * v_per_split     # the host makes v_begin < V; the last split's tiles past V are masked
    h_rows = hidden_ptr + rows_safe.to(tl.int64)[:, None] * stride_hidden  # [BLOCK_M, 1]

    max2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sumexp = tl.zeros([BLOCK_M], tl.float32)
    partial_sum = tl.zeros([BLOCK_M], tl.float32)
    target_logit = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SOFTCAP:
        softcap = tl.cast(softcap, tl.float32)  # Inductor passes a Python float as fp64: keep every tile fp32
    for t in range(0, v_per_split, BLOCK_N):  # loop bounds from arguments only (Triton's interpreter needs it)
        cols = v_begin + t + tl.arange(0, BLOCK_N)                        # [BLOCK_N] class ids
        col_ok = (cols < V) & (t + tl.arange(0, BLOCK_N) < v_per_split)
        w_rows = weight_ptr + tl.where(col_ok, cols, v_begin).to(tl.int64)[:, None] * stride_weight
        z = logits_tile(h_rows, w_rows, bias_ptr, tl.where(col_ok, cols, v_begin), D, HAS_BIAS, EVEN_K, DOT_FP32,
                        DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)          # [BLOCK_M, BLOCK_N] logits, fp32
        s, _ = scores(z, softcap, HAS_SOFTCAP)                            # scores, fp32
        # (a masked column never equals a target of this split, the only one whose logit is stored)
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), axis=1)
        partial_sum += tl.sum(tl.where(col_ok[None, :], s, 0.0), axis=1)
        # (tile 0 always has a valid column)
        max2, sumexp = online_lse(max2, sumexp, tl.where(col_ok[None, :], s * LOG2E, float("-inf")))

    tl.store(max2_ptr + split * N + rows, max2, mask=row_ok)
    tl.store(sumexp_ptr + split * N + rows, sumexp, mask=row_ok)
    tl.store(sum_ptr + split * N + rows, partial_sum, mask=row_ok)
    has_target = row_ok & (target >= v_begin) & (target < v_begin + v_per_split)
    tl.store(target_logit_ptr + rows, target_logit, mask=has_target)


lse_forward_kernel = triton.autotune(configs=configs("lse_forward"), key=["D", "v_per_split", "n_bucket"])(
    lse_forward_kernel_jit
)
