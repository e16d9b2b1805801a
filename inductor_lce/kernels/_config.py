"""Shared constants and autotuning configs for the Triton kernels in this package.

Read once at import:

* ``INTERPRET``: ``TRITON_INTERPRET=1`` runs kernels on CPU tensors through Triton's
  interpreter (CI). There, ``tl.dot`` on bf16 operands returns garbage in triton 3.6
  while fp32/fp16 dots are exact, so every kernel upcasts its tiles to fp32 before
  ``tl.dot`` when interpreting (``DOT_FP32``); the bf16 *loads*, the rounding of logits
  to bf16 and the bf16 stores still run as on the GPU. Interpreted runs use one small
  config per kernel, so the autotuner never benchmarks there.
* On the GPU each GEMM-shaped kernel autotunes over a handful of Hopper-friendly
  tiles (picked by the sweep in ``bench/bench_lce.py --sweep``, see bench/NOTES.md).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_FP32 = INTERPRET


def _fix_interpreter_scalars() -> None:
    """triton 3.6's interpreter turns a scalar into an index with ``int(ndarray of shape (1,))``, which
    numpy >= 2.4 rejects ("only 0-dimensional arrays can be converted"), so every ``range`` over a
    kernel argument fails. Re-patch ``__index__`` to read the single element. Feature-detected: a no-op
    where numpy still accepts it or the interpreter changed."""
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int64))
        return
    except TypeError:
        pass
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_inductor_lce_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._inductor_lce_fixed = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_scalars()

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr global: readable inside @triton.jit
LN2 = 0.6931471805599453


# matmul_accumulate's epilogue: the running state prefetched before the K loop, folded at once (_NARROW); the wide
# tiles load it after the loop and fold it in two column halves (_WIDE). Every config names both (torch 2.11's
# triton_kernel_wrap does not fill in constexpr defaults when Inductor traces an autotuned kernel).
_NARROW = dict(PREFETCH=True, EPILOGUE_SPLIT=1)
_WIDE = dict(PREFETCH=False, EPILOGUE_SPLIT=2)
_MATMUL_ACCUMULATE = ("grad_hidden", "grad_weight")
_SPLIT2 = dict(EPILOGUE_SPLIT=2)


def _cfg(bm, bn, bk, warps, stages, **extra):
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra)
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _wgmma(bm=128, bn=128, bk=64, stages=6, consumer_regs=232, maxnreg=168, coalesce=1):
    """matmul_accumulate_wgmma.py's config (COALESCE: the epilogue in a coalesced layout)."""
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, CONSUMER_REGS=consumer_regs,
                              COALESCE=bool(coalesce)), num_warps=4, maxnreg=maxnreg)


def _cooperative(bk=32, stages=4, state_bufs=2, maxnreg=168):
    """matmul_accumulate_cooperative.py's config: 128 x 256 CTA tiles (8 consumer warps + 2 loader warps)."""
    return triton.Config(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=bk, STAGES=stages, STATE_BUFS=state_bufs),
                         num_warps=8, maxnreg=maxnreg)


def _from_env(name):
    """``INDUCTOR_LCE_<NAME>_CONFIG=bm,bn,bk,warps,stages[,prefetch,epilogue_split]``: pin one config (sweeps,
    debugging; the last two are matmul_accumulate's PREFETCH and EPILOGUE_SPLIT; grad_weight_wgmma:
    bm,bn,bk,stages,consumer_regs,maxnreg,coalesce; grad_weight_cooperative: bk,stages,state_bufs,maxnreg)."""
    spec = os.environ.get(f"INDUCTOR_LCE_{name.upper()}_CONFIG")
    if not spec:
        return None
    values = [int(x) for x in spec.split(",")]
    if name == "grad_weight_wgmma":  # bm,bn,bk,stages,consumer_regs,maxnreg,coalesce
        return [_wgmma(*values)]
    if name == "grad_weight_cooperative":  # bk,stages,state_bufs,maxnreg
        return [_cooperative(*values)]
    if name == "grad_weight_tma":  # (its sixth value: EPILOGUE_SPLIT)
        return [_cfg(*values[:5], EPILOGUE_SPLIT=values[5] if len(values) > 5 else 1)]
    extra = dict(PREFETCH=bool(values[5]), EPILOGUE_SPLIT=values[6]) if len(values) > 5 else {}
    if name in _MATMUL_ACCUMULATE:
        extra = extra or _NARROW
    return [_cfg(*values[:5], **extra)]


def configs(kernel: str) -> list:
    """Autotuning configs for one of 'lse_forward', 'grad_logits', 'grad_hidden', 'grad_weight' (the last two:
    the matmul_accumulate kernel as the recompute backward's grad_hidden and as the fused op's grad_weight),
    'grad_weight_tma' (matmul_accumulate_tma.py)."""
    pinned = _from_env(kernel)
    if pinned:
        return pinned
    if kernel == "grad_weight_wgmma":
        # matmul_accumulate_wgmma.py (GPU only; timed against matmul_accumulate_tma.py per shape, the first
        # config is what "wgmma" forces): 128 x 128 tiles per consumer warpgroup (its fp32 accumulator is 128
        # registers per thread), a ring of STAGES 32 KB slots (192 KB at 6) + 16 KB for the coalescing round trip,
        # maxnreg 168 at launch for 4 + 4 + 1 (rounded to 4) warps, which setmaxnreg turns into 248 / 232 / 24.
        # 6 or 4 stages, whichever is faster per shape (NOTES 8.10); 7 does not fit
        return [_wgmma(), _wgmma(stages=4)]
    if kernel == "grad_weight_cooperative":
        # matmul_accumulate_cooperative.py: ring of STAGES x (BLOCK_K x 128 + BLOCK_K x 256) 16-bit slots beside
        # STATE_BUFS x 48 KB of state buffers (227 KB in all): 4-5 x 32 beside two halves, 3 x 64 beside one.
        # 5 x 32 was the fastest of them at the three large shapes of the session-5 sweep (NOTES 8.12)
        return [_cooperative(32, 5, 2), _cooperative(32, 4, 2), _cooperative(64, 3, 1)]
    if INTERPRET:  # BLOCK_N 64 > the interpreted slab/split grain (32): partial tiles inside slabs get tested
        # (grad_weight: the wide-tile variant, so both epilogues of matmul_accumulate run)
        extra = {"grad_weight": _WIDE, "grad_hidden": _NARROW, "grad_weight_tma": dict(EPILOGUE_SPLIT=2)}.get(kernel, {})
        return [_cfg(16, 64, 16, 1, 1, **extra)]
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, extra constexprs]); BLOCK_M tiles tokens (grad_weight:
    # classes).
    table = {
        # best in the run-2 sweep: 128x256x64 (3 stages at shapes 1 and 3, 4 stages at shape 2)
        "lse_forward": [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)],
        # (only with Settings.grad_logits="fused"; cuBLAS + the in-place kernel was faster, NOTES.md)
        "grad_logits": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3)],
        # 128x256 / 256x128 tiles spill with the state prefetched beside the accumulator (bench --compile-report)
        "grad_hidden": [(128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 128, 64, 8, 3)],
        # the fused op's grad_weight: M = V (up to 256k), N = D (2-4k), K = chunk rows (1-6k), A = the grad_logits
        # chunk transposed (M-major). 0 spills in both modes (offline sm_90 build, tests/test_kernels.py): the wide
        # tiles as _WIDE (no prefetch, split epilogue), the 128x128 ones prefetching the state
        # (128x128x64 with 3 stages and 128x256 with 2: two programs per SM, one's epilogue beside the other's loop)
        "grad_weight": [(128, 256, 64, 8, 3, _WIDE), (128, 256, 64, 8, 4, _WIDE), (256, 128, 64, 8, 3, _WIDE),
                        (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 128, 64, 8, 3),
                        (128, 256, 64, 8, 2, _WIDE)],
        # matmul_accumulate_tma.py (persistent, TMA operands): the state is read after the K loop, the wide
        # tiles fold it in two column halves (0 spills, <= 213 KB of shared memory: offline sm_90 build,
        # tests/test_kernels.py; 4 stages only in MODE 1: matmul_accumulate_tma.fitting_configs). 4 stages were
        # the fastest at all four shapes of the session-4 sweep (NOTES 8.10); 256 x 128 and 128 x 128 were slower
        # everywhere, and timed on the first rows only the autotuner picked them now and then
        "grad_weight_tma": [(128, 256, 64, 8, 4, _SPLIT2), (128, 256, 64, 8, 3, _SPLIT2)],
    }[kernel]
    default = _NARROW if kernel in _MATMUL_ACCUMULATE else {}
    return [_cfg(*t[:5], **(t[5] if len(t) > 5 else default)) for t in table]


# Elementwise / row kernels (cuBLAS-logits variants): (BLOCK_M, BLOCK_N) and warps.
def row_configs(kernel: str = "slab") -> list:
    """'slab': lse_update / grad_logits_inplace over [N, slab] slabs; 'softmax_grad_rows': whole rows of V (two
    passes per row, so few rows and wide blocks per program)."""
    if INTERPRET:  # BLOCK_N 32 < the interpreted V: full blocks and a masked tail both run
        return [triton.Config(dict(BLOCK_M=2 if kernel == "softmax_grad_rows" else 8,
                                   BLOCK_N=32 if kernel == "softmax_grad_rows" else 64), num_warps=1)]
    table = {
        "slab": ((16, 512, 4), (32, 256, 4), (8, 1024, 4), (64, 128, 8)),
        # 0 spills, 16-byte accesses on the full blocks (offline sm_90 build); (2, 4096, 8) spilled with soft-cap
        # (several rows per program: more loads in flight per program where rows are short, e.g. V = 32000)
        "softmax_grad_rows": ((1, 2048, 4), (1, 4096, 8), (1, 8192, 8), (4, 2048, 8), (2, 1024, 4), (4, 1024, 8),
                              (8, 512, 8)),
    }[kernel]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w) for bm, bn, w in table]
