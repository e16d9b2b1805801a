"""The softmax / cross-entropy steps every logits kernel shares, as ``@triton.jit`` helpers (tiles [M, N], rows [M]):

    scores(z, softcap, HAS_SOFTCAP)            -> (s, t)   s = c * tanh(z / c), t = tanh(z / c)   (c = softcap, fp32)
                                                           without HAS_SOFTCAP: (z, z), t unused
    online_lse(max2, sumexp, s2)               -> (max2, sumexp)  fold a tile of scores in log2 units
                                                           (s2 = s * log2(e), -inf where masked) into the running
                                                           row max and the sum of exp2(s2 - max2), rescaled
    row_grad_weights(target_ptr, lse_ptr, grad_loss_ptr, grad_lse_ptr, rows, ignore_index, HAS_GRAD_LSE)
                                               -> (target, lse, g, g_total)  g = grad_loss masked on ignored rows,
                                                           g_total = g + grad_lse
    softmax_grad(s, lse, g_total, g, is_target) -> exp(s - lse) * g_total - [is_target] * g          (grad_s)
    grad_logits_out(grad_s, t, dtype, HAS_SOFTCAP, EMULATE)
                                               -> dtype(grad_s * (1 - t^2))   (the soft-cap's chain rule; rounded
                                                           to nearest even, also under the interpreter)

``softcap`` must already be fp32: each kernel converts it once at its top (Inductor passes a Python float
argument as an fp64 scalar, and fp32 * fp64 promotes the whole tile to fp64).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._config import LOG2E
from ._rounding import round_to
from ._tanh import tanh_f32


@triton.jit
def scores(z, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        t = tanh_f32(z * (1.0 / softcap))                 # tanh(z / c) = s / c
        s = softcap * t
    else:
        t = z
        s = z
    return s, t


@triton.jit
def online_lse(max2, sumexp, s2):
    new_max2 = tl.maximum(max2, tl.max(s2, axis=1))
    sumexp = sumexp * tl.exp2(max2 - new_max2) + tl.sum(tl.exp2(s2 - new_max2[:, None]), axis=1)
    return new_max2, sumexp


@triton.jit
def row_grad_weights(target_ptr, lse_ptr, grad_loss_ptr, grad_lse_ptr, rows, ignore_index,
                     HAS_GRAD_LSE: tl.constexpr):
    target = tl.load(target_ptr + rows)
    lse = tl.load(lse_ptr + rows)
    g = tl.where(target != ignore_index, tl.load(grad_loss_ptr + rows), 0.0)
    g_total = g
    if HAS_GRAD_LSE:
        g_total += tl.load(grad_lse_ptr + rows)
    return target, lse, g, g_total


@triton.jit
def softmax_grad(s, lse, g_total, g, is_target):
    prob = tl.exp2(s * LOG2E - (lse * LOG2E)[:, None])
    return prob * g_total[:, None] - tl.where(is_target, g[:, None], 0.0)


@triton.jit
def grad_logits_out(grad_s, t, dtype: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EMULATE: tl.constexpr):
    if HAS_SOFTCAP:
        grad_s = grad_s * (1.0 - t * t)                   # d(c tanh(z / c)) / dz
    return round_to(grad_s, dtype, EMULATE)
