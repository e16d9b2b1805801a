"""``grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)``: the (pid_m, pid_n) tile this program of a 1-D GEMM grid
computes. Consecutive programs walk GROUP_M row blocks down one column block before the next column block, so
the operand tiles they share are read from L2 (grid: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) programs)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    return grouped_tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def grouped_tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of tile number ``pid`` in that order (persistent kernels walk the tile numbers)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n
