"""out[M, N] (+)= A[M, K] @ B[K, N] through a running state: the persistent, TMA-fed form of matmul_accumulate.py
for its two users: the fused op's grad_weight (A = the grad_logits chunk transposed, M = V, K = chunk rows, N = D)
and the recompute backward's grad_hidden (A = the grad_logits slab, M = N tokens, K = slab classes, N = D).

    acc[m, n] = sum_k A[m, k] * B[k, n]          # [BLOCK_M, BLOCK_N] tile by tl.dot, fp32
    then matmul_accumulate.py's epilogue: MODE 0 (fp32 state) / MODE 1 (compensated hi + int8 lo) / MODE 2 (hi +
    4-bit lo), FIRST / LAST

What differs from matmul_accumulate.py:
* operands through host-side TMA descriptors: A either as the row-major [K, M] tensor it is the transpose of
  (grad_weight: the logits chunk [c, V]), boxes [BLOCK_K, BLOCK_M] transposed in shared memory for tl.dot, or
  (A_K_MAJOR, grad_hidden) as itself, row-major [M, K], boxes [BLOCK_M, BLOCK_K]; B [K, N] row-major, boxes
  [BLOCK_K, BLOCK_N]; the boxes past the tensor's end read zeros (no masks);
* persistent: NUM_SMS programs walk the tile numbers pid, pid + NUM_SMS, ... (grouped like _grid.grouped_tile), and
  the tile x K loop is flattened, so the pipeliner issues the next tile's loads while this tile's epilogue reads
  and writes the state (the non-persistent kernel leaves the tensor cores idle during that traffic: 6-8 bytes per
  element of out per launch, bench/NOTES.md, "Issue 8").
The host (lce_triton._matmul_accumulate) takes it where TMA applies (16-byte aligned rows and bases, sm_90 or the
interpreter) and uses matmul_accumulate.py elsewhere. Grid: (min(NUM_SMS, number of tiles),).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import configs
from ._grid import grouped_tile_of
from .matmul_accumulate import fold_tile


@triton.jit
def matmul_accumulate_tma_kernel_jit(
    a_desc, b_desc,                                    # A^T [K, M] (A [M, K] if A_K_MAJOR), B [K, N]: row-major, TMA
    state_ptr, lo_ptr, out_ptr,                        # as matmul_accumulate.py (MODE 0 / 1 / 2)
    M, N, K, m_bucket, k_bucket,                       # (m_bucket, k_bucket: autotuning keys only)
    stride_state, stride_out,
    MODE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr, NUM_SMS: tl.constexpr, A_K_MAJOR: tl.constexpr,
):
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    local_rows = tl.arange(0, BLOCK_M)
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = grouped_tile_of(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for ki in range(k_tiles):
            if A_K_MAJOR:
                a = a_desc.load([row0, ki * BLOCK_K])                     # [BLOCK_M, BLOCK_K]
            else:
                a = a_desc.load([ki * BLOCK_K, row0]).T                   # [BLOCK_M, BLOCK_K]
            b = b_desc.load([ki * BLOCK_K, col0])                         # [BLOCK_K, BLOCK_N]
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        row_ok = row0 + local_rows < M
        fold_tile(acc, 0.0, 0.0, out_ptr, state_ptr, lo_ptr, row0, local_rows, row_ok, col0, N, stride_state,
                  stride_out, BLOCK_M, BLOCK_N, MODE, FIRST, LAST, False, DOT_FP32, EPILOGUE_SPLIT)


def _set_boxes(nargs):
    """Config pre-hook: the descriptors' box shapes follow the config's tile (and A's orientation)."""
    a_box = [nargs["BLOCK_M"], nargs["BLOCK_K"]] if nargs["A_K_MAJOR"] else [nargs["BLOCK_K"], nargs["BLOCK_M"]]
    nargs["a_desc"].block_shape = a_box
    nargs["b_desc"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


def _tma_configs() -> list:
    out = []
    for c in configs("grad_weight_tma"):
        c.pre_hook = _set_boxes
        out.append(c)
    return out


def fitting_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Config pruning: MODE 0's fp32 epilogue needs ~48 KB more shared memory than MODE 1's, so 4-stage 128 x 256
    x 64 tiles do not fit sm_90's 227 KB there (offline build: 262 KB). (The tuning key holds the state's
    dtype, so each mode is tuned apart.)"""
    if kwargs.get("MODE") == 0:
        return [c for c in configs if c.num_stages < 4] or configs[-1:]
    return configs


def _autotuned(first: bool):
    # restore_value as in matmul_accumulate.py: a FIRST launch reads no state, so its tuner saves no copy
    return triton.autotune(configs=_tma_configs(), key=["N", "m_bucket", "k_bucket", "A_K_MAJOR"],
                           prune_configs_by=dict(early_config_prune=fitting_configs),
                           restore_value=None if first else ["state_ptr", "lo_ptr", "out_ptr"])(
        matmul_accumulate_tma_kernel_jit)


# (tuner for FIRST launches, tuner for the others)
matmul_accumulate_tma_kernels = (_autotuned(True), _autotuned(False))
