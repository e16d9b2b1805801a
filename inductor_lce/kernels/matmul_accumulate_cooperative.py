"""out[M, N] (+)= A[M, K] @ B[K, N] through the compensated running state (MODE 1 only: hi = out itself, lo an int8
[M, N]), warp-specialized for Hopper (Gluon) with the state moved by TMA: the fused op's grad_weight
(A = the grad_logits chunk transposed, M = V, K = chunk rows, N = D), as matmul_accumulate_tma.py.

    acc[m, n] = sum_k A[m, k] * B[k, n]      # [BLOCK_M, BLOCK_N] CTA tile, fp32, by wgmma from shared memory
    (hi, lo) = matmul_accumulate.fold(acc, hi, lo)   # MODE 1, FIRST / LAST as there

Why: the other kernels read the state (3 bytes per element of out) with plain loads after the tile's K loop, so
the tensor cores idle while it arrives (matmul_accumulate_tma.py runs at ~65-75% of cuBLAS, bench/NOTES.md 8.10);
the Gluon ping-pong (matmul_accumulate_wgmma.py) overlaps it but with 128 x 128 tiles re-reads its operands from
L2 1.33x as often. Here one CTA tile of 128 x 256 is shared by two consumer warpgroups ("cooperative", the
default partition of 8 warps, each warpgroup 64 rows), and:

* an operand loader warp issues the operands' TMA loads into a ring of STAGES slots (_gluon.py);
* a state loader warp brings each tile's state (hi and lo, column half by column half) into STATE_BUFS
  shared-memory buffers by TMA as soon as the consumers have stored what was there: with two buffers a tile's
  state lands while the consumers still run its K loop; with one (for a deeper ring) the second half waits;
* the consumers accumulate each column half in its own [BLOCK_M, BLOCK_N / 2] wgmma accumulator (two wgmma per
  K step), so the epilogue folds one half at a time (128 + 48 registers per thread, not 128 + 96);
* the epilogue reads the state from shared memory, folds, writes the result back into the same buffers and
  stores them by TMA (asynchronous), then frees the buffers for the next state.

Measured (NOTES 8.12): as fast as matmul_accumulate_tma.py, not faster: the state's load latency is hidden, but
the epilogue's own work (~4 us per tile) still idles the tensor cores, as both warpgroups fold together.

TMA reads zeros past the tensors' ends and clips its stores there: no masks. Grid: (min(NUM_SMS, tiles),),
persistent, tiles grouped as _grid.grouped_tile_of. GPU only (sm_90; Gluon has no interpreter): the host
(lce_triton._matmul_accumulate) times it against the other grad_weight kernels per shape.
"""
from __future__ import annotations

import functools

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
except ImportError:   # (triton without Gluon's Hopper API)
    gluon = None

from ._config import configs
from ._gluon import acquire_slot, ready_slot
from ._grid import grouped_tile_of
from .matmul_accumulate import fold

if gluon is not None:

    @gluon.jit
    def _operand_loader(a_t_desc, b_desc, hi_desc, lo_desc, bufs_a, bufs_b, hi_bufs, lo_bufs, ready, empty,
                        state_ready, state_empty, M, N, K, FIRST: gl.constexpr, LAST: gl.constexpr,
                        GROUP_M: gl.constexpr, STAGES: gl.constexpr, STATE_BUFS: gl.constexpr, NUM_SMS: gl.constexpr):
        """(worker partitions share one signature) Loads every K step of this program's tiles into the ring: the
        A^T box, then B's two column halves."""
        BLOCK_K: gl.constexpr = a_t_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = a_t_desc.block_type.shape[1]
        HALF_N: gl.constexpr = b_desc.block_type.shape[1]
        num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, 2 * HALF_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        step_bytes: gl.constexpr = a_t_desc.block_type.nbytes + 2 * b_desc.block_type.nbytes
        step = 0
        for tile_id in range(gl.program_id(0), num_tiles, NUM_SMS):
            pid_m, pid_n = grouped_tile_of(tile_id, M, N, BLOCK_M, 2 * HALF_N, GROUP_M)
            for ki in range(k_tiles):
                slot = acquire_slot(empty, ready, step, STAGES, step_bytes)
                tma.async_copy_global_to_shared(a_t_desc, [ki * BLOCK_K, pid_m * BLOCK_M], ready.index(slot),
                                                bufs_a.index(slot))
                for h in gl.static_range(2):
                    tma.async_copy_global_to_shared(b_desc, [ki * BLOCK_K, (2 * pid_n + h) * HALF_N],
                                                    ready.index(slot), bufs_b.index(2 * slot + h))
                step += 1

    @gluon.jit
    def _state_loader(a_t_desc, b_desc, hi_desc, lo_desc, bufs_a, bufs_b, hi_bufs, lo_bufs, ready, empty,
                      state_ready, state_empty, M, N, K, FIRST: gl.constexpr, LAST: gl.constexpr,
                      GROUP_M: gl.constexpr, STAGES: gl.constexpr, STATE_BUFS: gl.constexpr, NUM_SMS: gl.constexpr):
        """Loads each tile's state (hi and lo), column half after column half, into the STATE_BUFS buffers as soon
        as the consumers have stored what was there: with 2 buffers a tile's state lands during its K loop."""
        if not FIRST:
            BLOCK_M: gl.constexpr = a_t_desc.block_type.shape[1]
            HALF_N: gl.constexpr = b_desc.block_type.shape[1]
            num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, 2 * HALF_N)
            half_bytes: gl.constexpr = hi_desc.block_type.nbytes + lo_desc.block_type.nbytes
            turn = 0
            for tile_id in range(gl.program_id(0), num_tiles, NUM_SMS):
                pid_m, pid_n = grouped_tile_of(tile_id, M, N, BLOCK_M, 2 * HALF_N, GROUP_M)
                for h in gl.static_range(2):
                    buf = h % STATE_BUFS
                    # uses of a buffer so far: 2 * turn + h with one buffer, turn with two
                    phase = (turn & 1) if STATE_BUFS == 2 else h
                    mbarrier.wait(state_empty.index(buf), phase ^ 1)
                    mbarrier.expect(state_ready.index(buf), half_bytes)
                    coord = [pid_m * BLOCK_M, (2 * pid_n + h) * HALF_N]
                    tma.async_copy_global_to_shared(hi_desc, coord, state_ready.index(buf), hi_bufs.index(buf))
                    tma.async_copy_global_to_shared(lo_desc, coord, state_ready.index(buf), lo_bufs.index(buf))
                turn += 1

    @gluon.jit
    def _fold_half(acc, hi_desc, lo_desc, hi_buf, lo_buf, coord, layout: gl.constexpr, FIRST: gl.constexpr,
                   LAST: gl.constexpr):
        """One column half of the epilogue: the state from shared memory, fold, the result back into the same
        buffers, and their TMA stores issued."""
        prev_hi = 0.0
        prev_lo = 0.0
        if not FIRST:
            prev_hi = hi_buf.load(layout)
            prev_lo = lo_buf.load(layout)
        hi, lo = fold(acc, prev_hi, prev_lo, hi_desc.dtype, 1, FIRST, LAST, False)
        hi_buf.store(hi)
        if not LAST:
            lo_buf.store(lo)
        fence_async_shared()
        tma.async_copy_shared_to_global(hi_desc, coord, hi_buf)
        if not LAST:
            tma.async_copy_shared_to_global(lo_desc, coord, lo_buf)

    @gluon.jit
    def _consumers(a_t_desc, b_desc, hi_desc, lo_desc, bufs_a, bufs_b, hi_bufs, lo_bufs, ready, empty, state_ready,
                   state_empty, M, N, K, FIRST: gl.constexpr, LAST: gl.constexpr, GROUP_M: gl.constexpr,
                   STAGES: gl.constexpr, STATE_BUFS: gl.constexpr, NUM_SMS: gl.constexpr):
        """The default partition (two warpgroups): wgmma over the ring for both column halves, then the epilogue
        half by half."""
        BLOCK_K: gl.constexpr = a_t_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = a_t_desc.block_type.shape[1]
        HALF_N: gl.constexpr = b_desc.block_type.shape[1]
        gl.static_assert(BLOCK_M == 128, "two warpgroups of 64 rows")
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                         instr_shape=[16, HALF_N, 16])
        num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, 2 * HALF_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        step = 0
        turn = 0
        for tile_id in range(gl.program_id(0), num_tiles, NUM_SMS):
            pid_m, pid_n = grouped_tile_of(tile_id, M, N, BLOCK_M, 2 * HALF_N, GROUP_M)
            acc0 = gl.zeros([BLOCK_M, HALF_N], gl.float32, layout)
            acc1 = gl.zeros([BLOCK_M, HALF_N], gl.float32, layout)
            prev_slot = 0
            for ki in range(k_tiles):
                slot = ready_slot(ready, step, STAGES)
                a = bufs_a.index(slot).permute((1, 0))                   # [BLOCK_M, BLOCK_K], M-major
                acc0 = warpgroup_mma(a, bufs_b.index(2 * slot), acc0, is_async=True)
                acc1 = warpgroup_mma(a, bufs_b.index(2 * slot + 1), acc1, is_async=True)
                # at most this step's two wgmma in flight: the previous step's slot is free again
                acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))
                mbarrier.arrive(empty.index(prev_slot), pred=ki > 0)
                prev_slot = slot
                step += 1
            acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
            mbarrier.arrive(empty.index(prev_slot))

            row0 = pid_m * BLOCK_M
            for h in gl.static_range(2):
                buf = h % STATE_BUFS
                if not FIRST:
                    mbarrier.wait(state_ready.index(buf), (turn & 1) if STATE_BUFS == 2 else h)
                _fold_half(acc0 if h == 0 else acc1, hi_desc, lo_desc, hi_bufs.index(buf), lo_bufs.index(buf),
                           [row0, (2 * pid_n + h) * HALF_N], layout, FIRST, LAST)
                if STATE_BUFS == 1 or h == 1:
                    tma.store_wait(0)     # the stores have read the buffers: the next state may land there
                    for b in gl.static_range(STATE_BUFS):
                        mbarrier.arrive(state_empty.index(buf - b))
            turn += 1

    @gluon.jit
    def matmul_accumulate_cooperative_kernel_jit(
        a_t_desc, b_desc,                  # A^T [K, M], B [K, N]: row-major, boxes [BLOCK_K, BLOCK_M], [BLOCK_K, BLOCK_N / 2]
        hi_desc, lo_desc,                  # out [M, N] (16-bit) and lo [M, N] (int8): boxes [BLOCK_M, BLOCK_N / 2]
        M, N, K,
        FIRST: gl.constexpr, LAST: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
        STATE_BUFS: gl.constexpr, NUM_SMS: gl.constexpr,
    ):
        BLOCK_K: gl.constexpr = a_t_desc.block_type.shape[0]
        BLOCK_M: gl.constexpr = a_t_desc.block_type.shape[1]
        HALF_N: gl.constexpr = b_desc.block_type.shape[1]
        gl.static_assert(STATE_BUFS == 1 or STATE_BUFS == 2, "one or two column halves of state buffered")
        # ring: STAGES x (A^T box + B's two halves); state: STATE_BUFS column halves of hi and lo
        bufs_a = gl.allocate_shared_memory(a_t_desc.dtype, [STAGES, BLOCK_K, BLOCK_M], a_t_desc.layout)
        bufs_b = gl.allocate_shared_memory(b_desc.dtype, [2 * STAGES, BLOCK_K, HALF_N], b_desc.layout)
        hi_bufs = gl.allocate_shared_memory(hi_desc.dtype, [STATE_BUFS, BLOCK_M, HALF_N], hi_desc.layout)
        lo_bufs = gl.allocate_shared_memory(lo_desc.dtype, [STATE_BUFS, BLOCK_M, HALF_N], lo_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        state_ready = gl.allocate_shared_memory(gl.int64, [STATE_BUFS, 1], mbarrier.MBarrierLayout())
        state_empty = gl.allocate_shared_memory(gl.int64, [STATE_BUFS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(STATE_BUFS):
            mbarrier.init(state_ready.index(i), count=1)
            mbarrier.init(state_empty.index(i), count=1)
        # (the argument tuples written out: a tuple assigned to a variable would turn the constexprs into tensors)
        gl.warp_specialize([
            (_consumers, (a_t_desc, b_desc, hi_desc, lo_desc, bufs_a, bufs_b, hi_bufs, lo_bufs, ready, empty,
                          state_ready, state_empty, M, N, K, FIRST, LAST, GROUP_M, STAGES, STATE_BUFS, NUM_SMS)),
            (_operand_loader, (a_t_desc, b_desc, hi_desc, lo_desc, bufs_a, bufs_b, hi_bufs, lo_bufs, ready, empty,
                               state_ready, state_empty, M, N, K, FIRST, LAST, GROUP_M, STAGES, STATE_BUFS,
                               NUM_SMS)),
            (_state_loader, (a_t_desc, b_desc, hi_desc, lo_desc, bufs_a, bufs_b, hi_bufs, lo_bufs, ready, empty,
                             state_ready, state_empty, M, N, K, FIRST, LAST, GROUP_M, STAGES, STATE_BUFS, NUM_SMS)),
        ], [1, 1], [24, 24])


@functools.lru_cache(maxsize=None)
def cooperative_configs() -> tuple:
    """The configs (_config.configs("grad_weight_cooperative")) as launch arguments, read once."""
    out = []
    for cfg in configs("grad_weight_cooperative"):
        kw = dict(cfg.kwargs)
        out.append(dict(kernel="cooperative", name=f"Gluon cooperative {kw['BLOCK_K']} x {kw['STAGES']} stages, "
                        f"{kw['STATE_BUFS']} state buffers",
                        BLOCK_M=kw["BLOCK_M"], BLOCK_N=kw["BLOCK_N"], BLOCK_K=kw["BLOCK_K"], maxnreg=cfg.maxnreg,
                        num_warps=cfg.num_warps, constexprs=dict(STAGES=kw["STAGES"], STATE_BUFS=kw["STATE_BUFS"])))
    return tuple(out)


cooperative_kernel = matmul_accumulate_cooperative_kernel_jit if gluon is not None else None
