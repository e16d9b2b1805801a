"""``tanh_f32(x)``: fp32 tanh from ``tl.exp2`` and a polynomial, the same code on the GPU and in the interpreter.

libdevice's ``__nv_tanhf`` is an extern call, which triton 3.6's interpreter refuses ("extern_elementwise
not supported in interpreter mode"), so the logit soft-cap (s = c * tanh(z / c)) uses this instead:

    |x| <  0.55:  tanh(x) = x + x^3 * P(x^2)     # P: degree-4 least-squares fit of (tanh(x) - x) / x^3 on
                                                 #    [0, 0.55], relative error 1.1e-9 in exact arithmetic
    |x| >= 0.55:  tanh(x) = sign(x) * (1 - 2 / (exp2(2 * log2(e) * min(|x|, 10)) + 1))
                                                 # fp32 tanh(x) == 1 for |x| >= 9.02: the clamp keeps exp2 finite

Measured in fp32 against float64 tanh over |x| in [1e-30, 1e4] and [0, 12] (interpreter = numpy fp32 ops,
``tests/test_kernels.py::test_interpreted_tanh_accuracy``): at most 1.6 ulps, relative error < 1.9e-7
(torch.tanh on the CPU: 0.51 ulps); odd, exactly +-1 where saturated, tanh(0) = 0. On sm_90 ``exp2`` is
``ex2.approx.ftz.f32`` and the division ``div.full.f32`` (2 ulps each): the |x| >= 0.55 branch may lose a
few more ulps there, far below the bf16 rounding of the logits the soft-cap is applied to.
Cost: ~12 fp32 ops and one ex2 per element, only in kernels compiled with HAS_SOFTCAP.
"""
from __future__ import annotations

import triton
import triton.language as tl

TWO_LOG2E = tl.constexpr(2.8853900817779268)  # 2 * log2(e)


@triton.jit
def tanh_f32(x):
    ax = tl.abs(x)
    x2 = x * x
    p = -0.006264324299991131
    p = p * x2 + 0.02106410823762417
    p = p * x2 - 0.053850289434194565
    p = p * x2 + 0.13332565128803253
    p = p * x2 - 0.33333316445350647
    small = x + x * x2 * p
    big = 1.0 - 2.0 / (tl.exp2(tl.minimum(ax, 10.0) * TWO_LOG2E) + 1.0)
    big = tl.where(x < 0.0, -big, big)
    return tl.where(ax < 0.55, small, big)
