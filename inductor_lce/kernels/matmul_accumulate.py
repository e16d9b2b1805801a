"""out[M, N] (+)= A[M, K] @ B[K, N], accumulated over a sequence of launches without 16-bit drift.

    acc[m, n] = sum_k A[m, k] * B[k, n]          # [BLOCK_M, BLOCK_N] tile by tl.dot, fp32; A and B with any strides

Its two users (lce_triton.py), one launch per step of their loops:
* recompute backward, per V-slab: grad_hidden [N, D] += grad_logits_slab [N, slab] @ weight[slab] [slab, D]
  (A row-major: stride_ak = 1);
* fused op, per row chunk: grad_weight [V, D] += grad_logits_chunk.T [V, rows] @ hidden[rows] [rows, D]
  (A is the chunk transposed: stride_am = 1, stride_ak = the chunk's row stride).

The running sum over launches lives in one of three states (MODE):

* MODE 0 (fp32): state[m, n] += acc in an fp32 [M, N] buffer; the LAST launch writes dtype(state + acc)
  into out. 4 bytes per element: used where M * N * 4 fits the workspace, or for fp32 outputs
  (state is out itself).
* MODE 1 (compensated): 1 extra byte per element instead of 2 for fp32; hi = out itself (its dtype), lo an
  int8 [M, N] buffer, LAST stores dtype(total) (round to nearest even) into out. In between:
  - bf16: the state is fp32 total rounded to 24 bits, hi its top 16 bits and lo the next 8
    (hi:lo:00 = round(total), a 16-bit significand): total = bits(hi:lo:00) + acc, then
    r = bits(total) + 0x80 (rounds the magnitude to nearest at bit 8; a carry moves into the exponent),
    hi = r >> 16, lo = (r >> 8) & 0xFF: ~10 integer ops per element (NOTES 8.9);
  - fp16 (not the top half of an fp32): hi + lo * unit(hi), total = hi + lo * unit(hi) + acc, stores
    hi = dtype(total) and lo = round((total - hi) / unit(hi)) clamped to [-127, 127]. unit(hi) = half an ulp
    of hi / 2^7, a power of two read off hi's exponent bits (so both scalings are exact multiplications):
    |total - hi| <= half an ulp, so lo keeps 7 more bits than the dtype.
  Either way each launch rounds the running sum to 2^-16 (bf16) / 2^-18 (fp16) relative, 2^7 below the dtype's.
* MODE 2 (compensated, 4 bits; bf16 only): half a byte per element, so that the fused op's chunks get more room
  (fewer passes over the state, bench/NOTES.md 8.20): as MODE 1's bf16 form with lo the next 4 bits (hi:lo:000,
  a 12-bit significand: r = bits(total) + 0x800, hi = r >> 16, lo = (r >> 12) & 0xF), two per byte in a uint8
  [M, N / 2] buffer (N even; column 2j in the low half of byte j, 2j + 1 in the high half; row stride
  ``stride_state``). Each launch rounds the running sum to 2^-12 relative, 2^4 below bf16's own rounding: over
  a few launches the result stays within a few % of one rounding of the exact sum (3 launches: 1.001x, CPU
  test). Opt-in (Settings.fused_state "compensated4"): pairing the values of a byte re-lays out the tile, which
  costs the Triton kernels' epilogues 0.7-2.6 KB of spills, the Gluon ping-pong kernel's (8 columns per thread) 88 B.
  Plain dtype accumulation over S launches would add ~sqrt(S) roundings of the running sum (1e-2 relative
  error at S = 64 in bf16, measured; see bench/NOTES.md).

FIRST: no previous state (the first launch), LAST: the final one; a FIRST launch reads no state, so replaying it
(autotuning) changes nothing and needs no saved copy. EVEN_M / EVEN_N / EVEN_K: A's rows / B's columns / the K
range can be read in whole blocks without masks (multiples of the largest block; EVEN_M also when A's storage is
padded past M: the fused op's chunk has a padded row stride, and the rows past M only feed masked outputs). Where
not, the operand loads are masked (masks, not clamped offsets, keep the contiguous dim provably contiguous).
Grid: one program per [BLOCK_M, BLOCK_N] tile of out, grouped GROUP_M row blocks at a time (``_grid``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import configs
from ._grid import grouped_tile
from ._rounding import round_to


@triton.jit
def lo_unit(hi):
    """(unit, 1 / unit) in fp32 for an fp16 tensor hi: unit = 2^(exponent(hi) - 10 mantissa bits - 8) (5 exponent
    bits, bias 15; subnormals use e = 1)."""
    bits = hi.to(tl.int16, bitcast=True).to(tl.int32)
    unit_exp = tl.maximum((bits >> 10) & 0x1F, 1) - 15 - 18
    unit = ((unit_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_unit = ((127 - unit_exp) << 23).to(tl.float32, bitcast=True)
    return unit, inv_unit


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, ALL_ROWS: tl.constexpr, ALL_COLS: tl.constexpr):
    """A [rows, cols] operand tile, masked only along the dims that may run past the matrix (masks, not clamped
    offsets: the contiguous dim stays provably contiguous, so the loads stay vectorized and pipelined)."""
    if ALL_ROWS and ALL_COLS:
        tile = tl.load(ptrs)
    elif ALL_ROWS:
        tile = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    elif ALL_COLS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    return tile


@triton.jit
def _tile_ptrs(ptr, row0, local_rows, cols, stride):
    """[BLOCK_M, width] pointers: a 64-bit row-block base plus 32-bit offsets inside the tile."""
    return ptr + row0.to(tl.int64) * stride + (local_rows[:, None] * stride + cols[None, :])


@triton.jit
def lo_offsets(cols, stride_out, stride_state, MODE: tl.constexpr):
    """(column offsets, row stride) of lo for out's columns ``cols``: MODE 1 out's own; MODE 2 the byte cols // 2
    of lo's rows (stride_state)."""
    if MODE == 2:
        return cols // 2, stride_state
    return cols, stride_out


@triton.jit
def _pairs(x):
    """[R, W] -> its even and its odd columns, each [R, W // 2] (the two halves of MODE 2's bytes)."""
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))


@triton.jit
def load_state(out_ptrs, state_ptrs, lo_ptrs, mask, cols, MODE: tl.constexpr):
    """The running state of a tile of out's columns ``cols``: MODE 0 (fp32 state, fp32 state), MODE 1 (hi, lo),
    MODE 2 (hi, lo: one uint8 4-bit value per element; lo_ptrs point each element at its byte, which each of
    the pair reads: no re-layout on the load side)."""
    if MODE == 0:
        prev_a = tl.load(state_ptrs, mask=mask, other=0.0)
        prev_b = prev_a
    elif MODE == 1:
        prev_a = tl.load(out_ptrs, mask=mask, other=0.0)
        prev_b = tl.load(lo_ptrs, mask=mask, other=0)
    else:
        prev_a = tl.load(out_ptrs, mask=mask, other=0.0)
        byte = tl.load(lo_ptrs, mask=mask, other=0).to(tl.uint8, bitcast=True)
        prev_b = (byte >> ((cols[None, :] & 1) * 4).to(tl.uint8)) & 0xF
    return prev_a, prev_b


@triton.jit
def store_state(out_ptrs, state_ptrs, lo_ptrs, a, b, mask, MODE: tl.constexpr, LAST: tl.constexpr):
    """Stores fold's (a, b): MODE 0: a into the fp32 state, or into out when LAST; MODE 1 / 2: hi a into out and,
    unless LAST, lo b (MODE 2: two per byte)."""
    if MODE == 0:
        tl.store(out_ptrs if LAST else state_ptrs, a, mask=mask)
    else:
        tl.store(out_ptrs, a, mask=mask)
        if not LAST:
            if MODE == 1:
                tl.store(lo_ptrs, b, mask=mask)
            else:
                lo_even, lo_odd = _pairs(b)
                byte_ptrs, _ = _pairs(lo_ptrs)
                byte_mask, _ = _pairs(mask)
                tl.store(byte_ptrs, lo_even | (lo_odd << 4), mask=byte_mask)


@triton.jit
def fold(acc, prev_a, prev_b, out_dtype: tl.constexpr, MODE: tl.constexpr, FIRST: tl.constexpr,
         LAST: tl.constexpr, EMULATE: tl.constexpr):
    """The state update of one tile, values only (the callers load and store): acc (fp32) folded into the
    previous state (prev_a, prev_b) = MODE 0: (fp32 state, unused), MODE 1 / 2: (hi, lo); both unused when FIRST.
    Returns (a, b): MODE 0: a = the new fp32 state, or out's value (out_dtype) when LAST; b unused.
    MODE 1: a = the new hi (out_dtype), b = the new lo (int8; unused when LAST); bf16: the bits of the state
    rounded to 24 bits, fp16: hi + lo * unit(hi); MODE 2 (bf16): rounded to 20 bits, lo uint8 in [0, 16)
    (module docstring)."""
    total = acc
    if MODE == 0:
        if not FIRST:
            total += prev_a
        a = total
        if LAST:
            a = round_to(total, out_dtype, EMULATE)
        b = a
    elif out_dtype == tl.bfloat16:
        # MODE 1: hi:lo:00 (lo 8 bits), MODE 2: hi:lo:000 (lo 4 bits), the state's fp32 bits
        LO_SHIFT: tl.constexpr = 8 if MODE == 1 else 12
        if not FIRST:
            bits = (prev_a.to(tl.uint16, bitcast=True).to(tl.uint32) << 16) | (
                prev_b.to(tl.uint8, bitcast=True).to(tl.uint32) << LO_SHIFT)
            total += bits.to(tl.float32, bitcast=True)
        if LAST:
            a = round_to(total, out_dtype, EMULATE)
            b = a
        else:
            rounded = total.to(tl.uint32, bitcast=True) + (1 << (LO_SHIFT - 1))
            a = (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            b = ((rounded >> LO_SHIFT) & ((1 << (16 - LO_SHIFT)) - 1)).to(tl.uint8)
            if MODE == 1:
                b = b.to(tl.int8, bitcast=True)
    else:
        tl.static_assert(MODE == 1, "MODE 2 (the 4-bit state) is bf16 only")
        if not FIRST:
            unit, _ = lo_unit(prev_a)
            total += prev_a.to(tl.float32) + prev_b.to(tl.float32) * unit
        a = round_to(total, out_dtype, EMULATE)
        b = a
        if not LAST:
            _, inv_unit = lo_unit(a)
            q = (total - a.to(tl.float32)) * inv_unit
            b = tl.minimum(tl.maximum(tl.floor(q + 0.5), -127.0), 127.0).to(tl.int8)
    return a, b


@triton.jit
def _epilogue(acc, prev_a, prev_b, out_ptr, state_ptr, lo_ptr, row0, local_rows, row_ok, col0, N,
              stride_state, stride_out, width: tl.constexpr, MODE: tl.constexpr, FIRST: tl.constexpr,
              LAST: tl.constexpr, HAVE_PREV: tl.constexpr, EMULATE: tl.constexpr):
    """Fold acc, the [BLOCK_M, width] tile of columns col0.., into the running state (loaded here unless
    HAVE_PREV: then prev_a / prev_b are it; unused when FIRST)."""
    cols = col0 + tl.arange(0, width)
    mask = row_ok[:, None] & (cols < N)[None, :]
    out_ptrs = _tile_ptrs(out_ptr, row0, local_rows, cols, stride_out)
    state_ptrs = _tile_ptrs(state_ptr, row0, local_rows, cols, stride_state)
    lo_cols, stride_lo = lo_offsets(cols, stride_out, stride_state, MODE)    # MODE 1: out's strides, 2: bytes
    lo_ptrs = _tile_ptrs(lo_ptr, row0, local_rows, lo_cols, stride_lo)
    if not FIRST and not HAVE_PREV:
        prev_a, prev_b = load_state(out_ptrs, state_ptrs, lo_ptrs, mask, cols, MODE)
    a, b = fold(acc, prev_a, prev_b, out_ptr.dtype.element_ty, MODE, FIRST, LAST, EMULATE)
    store_state(out_ptrs, state_ptrs, lo_ptrs, a, b, mask, MODE, LAST)


@triton.jit
def fold_tile(acc, prev_a, prev_b, out_ptr, state_ptr, lo_ptr, row0, local_rows, row_ok, col0, N, stride_state,
              stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, FIRST: tl.constexpr,
              LAST: tl.constexpr, HAVE_PREV: tl.constexpr, EMULATE: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr):
    """The epilogue of a [BLOCK_M, BLOCK_N] tile (both kernels): whole (EPILOGUE_SPLIT = 1), or its two column
    halves one after the other (2: wide tiles, whose state does not fit in registers beside the accumulator)."""
    if EPILOGUE_SPLIT == 1:
        _epilogue(acc, prev_a, prev_b, out_ptr, state_ptr, lo_ptr, row0, local_rows, row_ok, col0, N,
                  stride_state, stride_out, BLOCK_N, MODE, FIRST, LAST, HAVE_PREV, EMULATE)
    else:
        tl.static_assert(EPILOGUE_SPLIT == 2 and not HAVE_PREV, "EPILOGUE_SPLIT: 1, or 2 without a loaded state")
        half: tl.constexpr = BLOCK_N // 2
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))  # columns [0, half), rest
        _epilogue(acc0, prev_a, prev_b, out_ptr, state_ptr, lo_ptr, row0, local_rows, row_ok, col0, N,
                  stride_state, stride_out, half, MODE, FIRST, LAST, False, EMULATE)
        _epilogue(acc1, prev_a, prev_b, out_ptr, state_ptr, lo_ptr, row0, local_rows, row_ok, col0 + half, N,
                  stride_state, stride_out, half, MODE, FIRST, LAST, False, EMULATE)


@triton.jit
def matmul_accumulate_kernel_jit(
    a_ptr, b_ptr,                                      # A [M, K], B [K, N] (strides below)
    state_ptr, lo_ptr, out_ptr,                        # MODE 0: fp32 [M, N]; 1: int8 [M, N] (out's strides); 2: uint8
                                                       # [M, N / 2] (rows stride_state); out
    M, N, K, m_bucket, k_bucket,                       # (m_bucket, k_bucket: autotuning keys only)
    stride_am, stride_ak, stride_bk, stride_bn, stride_state, stride_out,
    MODE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PREFETCH: tl.constexpr, EPILOGUE_SPLIT: tl.constexpr,   # (every config names both: _config.configs)
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    local_rows = tl.arange(0, BLOCK_M)                                  # [BLOCK_M] rows row0 + i of A and out
    row_ok = row0 + local_rows < M
    cols = col0 + tl.arange(0, BLOCK_N)                                 # [BLOCK_N] columns of B and out
    col_ok = cols < N
    offs_k = tl.arange(0, BLOCK_K)
    # 64-bit row-block base, 32-bit offsets inside a tile; the K loop advances the pointers
    a_ptrs = a_ptr + row0.to(tl.int64) * stride_am + (local_rows[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + (offs_k[:, None] * stride_bk + cols[None, :] * stride_bn)

    # PREFETCH: the running state is loaded before the K loop so that its HBM traffic overlaps the tensor-core
    # work (loaded after the loop, every tile's epilogue waited on it: 1.5x slower per grad_hidden slab,
    # bench/NOTES.md). Wide tiles cannot hold it in registers beside the accumulator (they spill): they load it
    # after the loop, and EPILOGUE_SPLIT = 2 folds the two column halves one after the other.
    prev_a = 0.0  # (placeholders: unused unless PREFETCH and not FIRST)
    prev_b = 0.0
    if PREFETCH and not FIRST:
        mask = row_ok[:, None] & col_ok[None, :]
        lo_cols, stride_lo = lo_offsets(cols, stride_out, stride_state, MODE)
        prev_a, prev_b = load_state(_tile_ptrs(out_ptr, row0, local_rows, cols, stride_out),
                                     _tile_ptrs(state_ptr, row0, local_rows, cols, stride_state),
                                     _tile_ptrs(lo_ptr, row0, local_rows, lo_cols, stride_lo), mask, cols, MODE)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = _load_tile(a_ptrs, row_ok, k_ok, EVEN_M, EVEN_K)            # [BLOCK_M, BLOCK_K]
        b = _load_tile(b_ptrs, k_ok, col_ok, EVEN_K, EVEN_N)            # [BLOCK_K, BLOCK_N]
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    fold_tile(acc, prev_a, prev_b, out_ptr, state_ptr, lo_ptr, row0, local_rows, row_ok, col0, N, stride_state,
              stride_out, BLOCK_M, BLOCK_N, MODE, FIRST, LAST, PREFETCH, DOT_FP32, EPILOGUE_SPLIT)


def _autotuned(use: str, first: bool):
    # restore_value: autotuning replays the kernel, which must not add a launch twice. A FIRST launch reads no
    # state, so its replays change nothing and its tuner saves no copy of the [M, N] state (GBs for grad_weight);
    # the host runs the first later launch of a key on a few thousand rows alone, so their copies stay small.
    return triton.autotune(configs=configs(use), key=["N", "m_bucket", "k_bucket"],
                           restore_value=None if first else ["state_ptr", "lo_ptr", "out_ptr"])(
        matmul_accumulate_kernel_jit)


# {use: (tuner for FIRST launches, tuner for the others)}, use = "grad_hidden" | "grad_weight" (config tables)
matmul_accumulate_kernels = {use: (_autotuned(use, True), _autotuned(use, False)) for use in ("grad_hidden",
                                                                                                 "grad_weight")}
