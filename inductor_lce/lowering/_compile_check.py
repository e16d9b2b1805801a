"""Offline build of the kernels for Hopper (sm_90) on any machine with Triton's NVIDIA backend: no GPU needed.

Used by tests/test_kernels.py (front-end errors, wgmma present) and ``bench/bench_lce.py --compile-report``
(registers, spills, shared memory per config). Integer arguments and pointers get the divisibility-by-16
hints a real launch at the benchmark shapes gets; optional pointers the host passes as None are None here.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_PTR_TYPES = {"target_ptr": "*i64", "max2_ptr": "*fp32", "sumexp_ptr": "*fp32", "target_logit_ptr": "*fp32",
              "lse_ptr": "*fp32", "grad_loss_ptr": "*fp32", "grad_lse_ptr": "*fp32", "grad_bias_ptr": "*fp32",
              "sum_ptr": "*fp32", "grad_sum_ptr": "*fp32", "loss_ptr": "*fp32", "grad_scale_ptr": "*fp32"}
_SCALAR_TYPES = {"softcap": "fp32"}  # other scalars are i32


def compile_sm90(fn, constexprs: dict, num_warps: int, num_stages: int, ptr_types: dict | None = None,
                 dtype: str = "bf16", scalar_types: dict | None = None, maxnreg: int | None = None):
    """Compile a @triton.jit or @gluon.jit function for sm_90; returns the CompiledKernel. ``scalar_types``
    overrides the types of scalar arguments (e.g. ``{"softcap": "fp64"}``: what Inductor passes for a Python
    float); ``maxnreg``: the launch's register limit (warp-specialized Gluon kernels)."""
    types = dict(_PTR_TYPES, **(ptr_types or {}))
    scalars = dict(_SCALAR_TYPES, **(scalar_types or {}))
    # constexpr parameters left out take their defaults, as a launch would
    constexprs = dict({p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs)
    sig = {}
    for a in fn.arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = types.get(a, "*" + dtype)
        elif a.endswith("_desc"):   # TMA descriptors: the caller names the type, e.g. "tensordesc<bf16[64,128]>"
            # (Gluon's: "tensordesc<bf16[64,128],NVMMASharedLayout(...)>")
            sig[a] = types[a]
        else:
            sig[a] = scalars.get(a, "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a] not in ("constexpr", "fp32", "fp64") and a != "ignore_index" and not a.endswith("_desc")}
    source = ASTSource
    try:
        from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

        if isinstance(fn, GluonJITFunction):
            source = GluonASTSource
    except ImportError:   # (triton without Gluon)
        pass
    src = source(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(kernel) -> dict:
    """registers / spill bytes / shared memory of a compiled kernel (ptxas -v on its PTX)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        err = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True,
                             text=True).stderr
    regs = re.findall(r"Used (\d+) registers", err)
    spills = re.findall(r"(\d+) bytes spill stores", err)
    return dict(registers=int(regs[0]) if regs else None, spill_bytes=int(spills[0]) if spills else None,
                shared=kernel.metadata.shared, wgmma=kernel.asm["ptx"].count("wgmma.mma_async"))
