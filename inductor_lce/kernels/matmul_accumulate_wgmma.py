"""out[M, N] (+)= A[M, K] @ B[K, N] through a running state, warp-specialized for Hopper (Gluon): the fused op's
grad_weight (A = the grad_logits chunk transposed, M = V, K = chunk rows, N = D), as matmul_accumulate_tma.py.

    acc[m, n] = sum_k A[m, k] * B[k, n]      # [BLOCK_M, BLOCK_N] tile, fp32, by wgmma from shared memory
    then matmul_accumulate's load_state / fold / store_state: MODE 0 (fp32 state) / MODE 1 (compensated
    hi + int8 lo) / MODE 2 (hi + 4-bit lo), FIRST / LAST

Why a Gluon kernel: the epilogue reads and writes the state (6 bytes per element of out in MODE 1). In the
Triton kernels the same warps run the K loop and the epilogue, so the tensor cores idle during that traffic
(~60% of cuBLAS, bench/NOTES.md 8.5-8.6), and Triton's automatic Hopper warp specialization gives wrong results
for that kernel in triton 3.6 (NOTES 8.7). Here the roles are explicit ("ping-pong"):

* one producer warp issues the TMA loads of both operands, tile after tile, into one ring of STAGES slots;
* two consumer warpgroups (the default partition and a worker) take this program's tiles in turn, and their
  K loops strictly alternate (barriers order[0] / order[1]), so the ring is consumed in the order it is filled
  and every wait's phase parity is unambiguous; while one folds its tile into the state, the other's wgmma
  keep the tensor cores busy.

Measured on the H100 (NOTES 8.8, 8.10): per chunk, against matmul_accumulate_tma.py, it wins where the chunk is
short (K = 768 rows: 0.89 against 1.13 ms), ties at K = 2048 and loses at 8192 x 4096 x 128256 (K = 1408: 3.1
against 2.7 ms): a 128 x 128 tile per consumer (what one warpgroup's registers hold) re-reads its operands from
L2 V * D * K / 32 bytes per chunk, 1.33x the 128 x 256 Triton tile's. So the host times it (each of its
configs) against the other grad_weight kernels on the first rows of the first accumulating launch per shape
and keeps the fastest (Settings.fused_grad_weight_kernel "auto"; "wgmma" forces it): in session 5 it won
in the op at 8192 x 4096 x 128256 and at the e2e shape (NOTES 8.13).

Operands as in matmul_accumulate_tma.py: A through its transpose (the row-major [K, M] chunk, boxes [BLOCK_K,
BLOCK_M], read by wgmma as an M-major [BLOCK_M, BLOCK_K] view), B row-major [K, N] (boxes [BLOCK_K, BLOCK_N]);
TMA reads zeros past the tensors' ends. The epilogue (COALESCE: after a shared-memory round trip into a
coalesced layout, else in the accumulator's own layout) loads and stores the state with masks.
Grid: (min(NUM_SMS, number of tiles),), persistent. GPU only (sm_90): Gluon has no interpreter; the host
(lce_triton._matmul_accumulate) takes it where TMA applies, and tests/test_kernels.py checks it on the GPU.
"""
from __future__ import annotations

import functools

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
except ImportError:   # (triton without Gluon's Hopper API)
    gluon = None

from ._config import configs
from ._gluon import acquire_slot, ready_slot
from ._grid import grouped_tile_of
from .matmul_accumulate import fold, lo_offsets, load_state, store_state

if gluon is not None:

    @gluon.jit
    def _producer(a_t_desc, b_desc, bufs_a, bufs_b, ready, empty, order, M, N, K, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                  NUM_SMS: gl.constexpr, consumer: gl.constexpr, state_ptr, lo_ptr, out_ptr, stride_state, stride_out,
                  MODE: gl.constexpr, FIRST: gl.constexpr, LAST: gl.constexpr, COALESCE: gl.constexpr):
        """(the consumers' signature: worker partitions share one) Loads every K step of this program's tiles,
        in order, into the ring."""
        num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        nbytes: gl.constexpr = (BLOCK_K * BLOCK_M + BLOCK_K * BLOCK_N) * 2
        step = 0
        for tile_id in range(gl.program_id(0), num_tiles, NUM_SMS):
            pid_m, pid_n = grouped_tile_of(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            for ki in range(k_tiles):
                slot = acquire_slot(empty, ready, step, STAGES, nbytes)
                tma.async_copy_global_to_shared(a_t_desc, [ki * BLOCK_K, pid_m * BLOCK_M], ready.index(slot),
                                                bufs_a.index(slot))
                tma.async_copy_global_to_shared(b_desc, [ki * BLOCK_K, pid_n * BLOCK_N], ready.index(slot),
                                                bufs_b.index(slot))
                step += 1

    @gluon.jit
    def _consumer(a_t_desc, b_desc, bufs_a, bufs_b, ready, empty, order, M, N, K, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                  NUM_SMS: gl.constexpr, consumer: gl.constexpr,
                  state_ptr, lo_ptr, out_ptr, stride_state, stride_out, MODE: gl.constexpr, FIRST: gl.constexpr,
                  LAST: gl.constexpr, COALESCE: gl.constexpr):
        """Consumer `consumer` (0 or 1): this program's tiles number consumer, consumer + 2, ...: wgmma over the
        ring (its K loop strictly after the other consumer's previous one: order[consumer]), then the state
        update of the tile."""
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        # the epilogue's layout: COALESCE, 8 consecutive columns per thread, a warp over 2 rows x 128 columns
        # (a shared-memory round trip of the accumulator), else the accumulator's own (2 columns per thread)
        if COALESCE:
            state_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        else:
            state_layout: gl.constexpr = acc_layout
        row_layout: gl.constexpr = gl.SliceLayout(1, state_layout)
        col_layout: gl.constexpr = gl.SliceLayout(0, state_layout)
        num_tiles = gl.cdiv(M, BLOCK_M) * gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, BLOCK_K)
        rows_in_tile = gl.arange(0, BLOCK_M, layout=row_layout)
        cols_in_tile = gl.arange(0, BLOCK_N, layout=col_layout)
        turn = 0
        for tile_id in range(gl.program_id(0) + consumer * NUM_SMS, num_tiles, 2 * NUM_SMS):
            pid_m, pid_n = grouped_tile_of(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            step = (2 * turn + consumer) * k_tiles        # the ring position of this tile's first K step
            # consumer 0's first wait passes at once (barriers start "phase 1 complete"); then the two alternate
            mbarrier.wait(order.index(consumer), (turn & 1) ^ (1 - consumer))
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
            prev_slot = 0
            for ki in range(k_tiles):
                slot = ready_slot(ready, step, STAGES)
                a = bufs_a.index(slot).permute((1, 0))             # [BLOCK_M, BLOCK_K], M-major
                acc = warpgroup_mma(a, bufs_b.index(slot), acc, is_async=True)
                # at most one wgmma in flight: the previous step's buffers are free again
                acc = warpgroup_mma_wait(1, deps=(acc, ))
                mbarrier.arrive(empty.index(prev_slot), pred=ki > 0)
                prev_slot = slot
                step += 1
            mbarrier.arrive(order.index(1 - consumer))           # the other consumer's K loop may start
            acc = warpgroup_mma_wait(0, deps=(acc, ))
            mbarrier.arrive(empty.index(prev_slot))
            if COALESCE:
                acc = gl.convert_layout(acc, state_layout)
            turn += 1

            rows = pid_m * BLOCK_M + rows_in_tile
            cols = pid_n * BLOCK_N + cols_in_tile
            mask = (rows < M)[:, None] & (cols < N)[None, :]
            row_base = rows.to(gl.int64)[:, None]
            out_ptrs = out_ptr + (row_base * stride_out + cols[None, :])
            lo_cols, stride_lo = lo_offsets(cols, stride_out, stride_state, MODE)   # MODE 1: out's strides; 2: bytes
            lo_ptrs = lo_ptr + (row_base * stride_lo + lo_cols[None, :])
            state_ptrs = state_ptr + (row_base * stride_state + cols[None, :])
            prev_a = 0.0
            prev_b = 0.0
            if not FIRST:
                prev_a, prev_b = load_state(out_ptrs, state_ptrs, lo_ptrs, mask, cols, MODE)
            new_a, new_b = fold(acc, prev_a, prev_b, out_ptr.dtype.element_ty, MODE, FIRST, LAST, False)
            store_state(out_ptrs, state_ptrs, lo_ptrs, new_a, new_b, mask, MODE, LAST)

    @gluon.jit
    def matmul_accumulate_wgmma_kernel_jit(
        a_t_desc, b_desc,                          # A^T [K, M] and B [K, N], row-major, Gluon TMA descriptors
        state_ptr, lo_ptr, out_ptr,                # as matmul_accumulate.py
        M, N, K, stride_state, stride_out,
        MODE: gl.constexpr, FIRST: gl.constexpr, LAST: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr,
        STAGES: gl.constexpr, NUM_SMS: gl.constexpr, CONSUMER_REGS: gl.constexpr, COALESCE: gl.constexpr,
    ):
        # one ring of STAGES slots, filled in tile order; order[c]: consumer c may start its next K loop
        bufs_a = gl.allocate_shared_memory(a_t_desc.dtype, [STAGES, BLOCK_K, BLOCK_M], a_t_desc.layout)
        bufs_b = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_K, BLOCK_N], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(order.index(i), count=1)
        gl.warp_specialize([
            (_consumer, (a_t_desc, b_desc, bufs_a, bufs_b, ready, empty, order, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                         GROUP_M, STAGES, NUM_SMS, 0, state_ptr, lo_ptr, out_ptr, stride_state, stride_out, MODE,
                         FIRST, LAST, COALESCE)),
            (_consumer, (a_t_desc, b_desc, bufs_a, bufs_b, ready, empty, order, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                         GROUP_M, STAGES, NUM_SMS, 1, state_ptr, lo_ptr, out_ptr, stride_state, stride_out, MODE,
                         FIRST, LAST, COALESCE)),
            (_producer, (a_t_desc, b_desc, bufs_a, bufs_b, ready, empty, order, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K,
                         GROUP_M, STAGES, NUM_SMS, 0, state_ptr, lo_ptr, out_ptr, stride_state, stride_out, MODE,
                         FIRST, LAST, COALESCE)),
        ], [4, 1], [CONSUMER_REGS, 24])


@functools.lru_cache(maxsize=None)
def wgmma_configs() -> tuple:
    """The tiles (_config.configs("grad_weight_wgmma")) as launch arguments, read once. The host times them
    against matmul_accumulate_tma.py on the first accumulating launch per shape (lce_triton._grad_weight_kernel)."""
    out = []
    for cfg in configs("grad_weight_wgmma"):
        kw = dict(cfg.kwargs)
        out.append(dict(kernel="wgmma", name=f"Gluon ping-pong {kw['STAGES']} stages", BLOCK_M=kw["BLOCK_M"],
                        BLOCK_N=kw["BLOCK_N"], BLOCK_K=kw["BLOCK_K"], maxnreg=cfg.maxnreg, num_warps=cfg.num_warps,
                        constexprs=kw))
    return tuple(out)


wgmma_kernel = matmul_accumulate_wgmma_kernel_jit if gluon is not None else None
