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

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_FP32 = INTERPRET

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _cfg(bm, bn, bk, warps, stages, **extra):
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **extra)
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _from_env(name):
    """``INDUCTOR_LCE_<NAME>_CONFIG=bm,bn,bk,warps,stages``: pin one config (sweeps, debugging)."""
    spec = os.environ.get(f"INDUCTOR_LCE_{name.upper()}_CONFIG")
    if not spec:
        return None
    bm, bn, bk, w, s = (int(x) for x in spec.split(","))
    return [_cfg(bm, bn, bk, w, s)]


def configs(kernel: str) -> list:
    """Autotuning configs for one of 'lse_forward', 'grad_logits', 'grad_hidden'."""
    pinned = _from_env(kernel)
    if pinned:
        return pinned
    if INTERPRET:
        return [_cfg(16, 32, 16, 1, 1)]
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); BLOCK_M tiles tokens.
    table = {
        "lse_forward": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3)],
        "grad_logits": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3)],
        "grad_hidden": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3)],
    }[kernel]
    return [_cfg(*t) for t in table]


# Elementwise / row kernels (cuBLAS-logits variants): (BLOCK_M, BLOCK_N) and warps.
def row_configs() -> list:
    if INTERPRET:
        return [triton.Config(dict(BLOCK_M=8, BLOCK_N=32), num_warps=1)]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w)
            for bm, bn, w in ((16, 512, 4), (32, 256, 4), (8, 1024, 4), (64, 128, 8))]
