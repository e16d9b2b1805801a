"""Linear + cross-entropy, loss forward+backward, side by side on one CUDA GPU.

    python bench/bench_lce.py              # methods x shapes: table on stdout; $OUT (or bench/out/) gets
                                           # bench.json, RESULTS_section.md and bench_lce.png
    python bench/bench_lce.py --sweep      # our kernels alone: tile configs, variants, slab sizes (bench/NOTES.md)

Methods (METHODS=comma list selects):
  floor         three cuBLAS matmuls of N*D*V (logits, grad_hidden, grad_weight): the time floor
  eager         F.cross_entropy(F.linear(h, w).float(), y)
  compile       torch.compile of the same function (Inductor defaults)
  liger         Liger FusedLinearCrossEntropyLoss (liger-kernel 0.8.5)
  cce           Apple cut-cross-entropy linear_cross_entropy (25.1.1)
  inductor_lce  torch.compile(fn, options=inductor_lce.options()): the graph pass emits our ops
  inductor_lce_inlined  the same, with lowerings.inline.InlineTritonOps after the pass in the joint slot
  lce_op        inductor_lce.linear_cross_entropy eagerly (the ops' CUDA kernels are ours)
  lce_op_g2     the same with Settings.row_groups=2 (wider slabs; one extra bf16 rounding of grad_weight)
  lce_traced    torch.compile of a function calling our triton_op directly (Inductor traces into it and
                emits the kernels itself)
Per method: median time (ms, triton.testing.do_bench), op memory (peak during one step minus what was
live before, MB = 2^20 bytes) and its excess over grad_hidden + grad_weight, and the relative error
||x - ref|| / ||ref|| of loss, grad_hidden, grad_weight against an fp32 reference (F.cross_entropy on
fp32 copies of the inputs).

Peers are not installed on the GPU machine: `pip download --no-deps` liger-kernel==0.8.5 and
cut-cross-entropy==25.1.1 into .whl/, carry .whl, and `pip install --no-index --no-deps --target /tmp/site
.whl/*.whl` there with PYTHONPATH=/tmp/site (see bench/NOTES.md). SHAPES='[[N,D,V],...]' picks shapes.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [[8192, 2304, 256000], [8192, 4096, 128256], [16384, 2048, 32000]]
METHODS = ["floor", "eager", "compile", "liger", "cce", "lce_op", "lce_op_g2", "inductor_lce", "inductor_lce_inlined",
           "lce_traced"]
MB = 2**20
DEV = "cuda"


def out_dir() -> str:
    d = os.environ.get("OUT") or os.path.join(ROOT, "bench", "out")
    os.makedirs(d, exist_ok=True)
    return d


def log(*a):
    print(*a, flush=True)


def make_inputs(N, D, V, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(N, D, device=DEV, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=DEV, generator=g) * D**-0.5).to(dtype).requires_grad_()
    y = torch.randint(0, V, (N,), device=DEV, generator=g)
    y[torch.rand(N, device=DEV, generator=g) < 0.1] = -100
    return h, w, y


def naive(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)


def reference(h, w, y):
    """fp32 loss and grads (TF32 off): the yardstick for every method's error."""
    hf = h.detach().float().requires_grad_()
    wf = w.detach().float().requires_grad_()
    loss = F.cross_entropy(hf @ wf.T, y, ignore_index=-100)
    loss.backward()
    out = (loss.detach(), hf.grad, wf.grad)
    del hf, wf
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench_ms(fn, warmup=25, rep=200):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def floor_ms(N, D, V):
    a = torch.randn(N, D, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(V, D, device=DEV, dtype=torch.bfloat16)
    g = torch.randn(N, V, device=DEV, dtype=torch.bfloat16)

    def three():
        torch.mm(a, b.T)
        torch.mm(g, b)
        torch.mm(g.T, a)

    ms = bench_ms(three)
    one = bench_ms(lambda: torch.mm(a, b.T))
    del a, b, g
    torch.cuda.empty_cache()
    return ms, one


def measure(name, fn, h, w, y, ref):
    """fwd+bwd of fn: errors (first call), op memory (second call), median time."""
    def step():
        h.grad = None
        w.grad = None
        out = fn(h, w, y)
        if isinstance(out, tuple):
            out = out[0]
        out.backward()
        return out

    r = dict(method=name)
    try:
        torch.cuda.synchronize()
        t0 = time.time()
        loss = step()
        torch.cuda.synchronize()
        r["first_call_s"] = round(time.time() - t0, 1)
        r.update(err_loss=rel(loss.detach(), ref[0]), err_gh=rel(h.grad, ref[1]), err_gw=rel(w.grad, ref[2]))
        h.grad = None
        w.grad = None
        del loss
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grads = (h.numel() * h.element_size() + w.numel() * w.element_size())
        r.update(op_mem_mb=round(peak / MB, 1), extra_mb=round((peak - grads) / MB, 1))
        r["ms"] = round(bench_ms(step), 2)
        for k in ("err_loss", "err_gh", "err_gw"):
            r[k] = float(f"{r[k]:.2e}")
    except Exception as e:  # a method failing must not stop the table
        r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc()
    h.grad = None
    w.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    return r


def method_fn(m):
    if m == "eager":
        return naive
    if m == "compile":
        return torch.compile(naive)
    if m == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        lf = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        return lambda h, w, y: lf(w, h, y)
    if m == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=-100)
    if m == "inductor_lce":
        import inductor_lce

        return torch.compile(naive, options=inductor_lce.options())
    if m == "inductor_lce_inlined":  # the pass, then lowerings.inline: Inductor emits our kernels itself
        import inductor_lce
        from inductor_lce.entry import ChainedPass
        from inductor_lce.lowerings.inline import InlineTritonOps

        opts = inductor_lce.options()
        opts["joint_custom_pre_pass"] = ChainedPass(opts["joint_custom_pre_pass"], InlineTritonOps())
        return torch.compile(naive, options=opts)
    if m in ("lce_op", "lce_op_g2"):  # (run_table sets Settings.row_groups for lce_op_g2)
        import inductor_lce

        return lambda h, w, y: inductor_lce.linear_cross_entropy(h, w, y)
    if m == "lce_traced":
        import inductor_lce.lowerings  # noqa: F401  (registers the triton ops)

        def traced(h, w, y):
            loss, _, _ = torch.ops.inductor_lce.lce_forward_triton(h, w, None, y, -100)
            return loss.sum() / (y != -100).sum()

        return torch.compile(traced, fullgraph=True)
    raise ValueError(m)


def versions():
    import triton

    return dict(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
                date=datetime.date.today().isoformat())


def _set_row_groups(value):
    """Set Settings.row_groups (backward reads it when it runs, after the forward returns); returns the old."""
    if value is None:
        return None
    from inductor_lce.lowerings import SETTINGS

    old, SETTINGS.row_groups = SETTINGS.row_groups, value
    return old


def profile(shapes):
    """Kernel time breakdown of one fwd+bwd step of the eager op (after a warm-up step that autotunes)."""
    import inductor_lce
    from torch.profiler import ProfilerActivity, profile as prof

    for N, D, V in shapes:
        h, w, y = make_inputs(N, D, V)

        def step():
            h.grad = None
            w.grad = None
            inductor_lce.linear_cross_entropy(h, w, y).backward()

        step()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            step()
            torch.cuda.synchronize()
        rows = [(e.key, e.device_time_total / 1e3, e.count) for e in p.key_averages()]
        rows.sort(key=lambda r: -r[1])
        total = sum(r[1] for r in rows)
        log(f"\n== profile N={N} D={D} V={V}: kernels {total:.2f} ms")
        for k, t, c in rows[:9]:
            log(f"  {t:8.2f} ms  {c:5d}x  {k[:90]}")
        del h, w, y
        gc.collect()
        torch.cuda.empty_cache()


def save_table(info, results):
    d = out_dir()
    json.dump(dict(info=info, results=results), open(os.path.join(d, "bench.json"), "w"), indent=1)
    open(os.path.join(d, "RESULTS_section.md"), "w").write(results_section(info, results))


def run_table(shapes, methods):
    from torch._dynamo.utils import counters

    info = versions()
    log(json.dumps(info))
    results = []
    for N, D, V in shapes:
        torch._dynamo.reset()
        h, w, y = make_inputs(N, D, V)
        ref = reference(h, w, y)
        fl, one = floor_ms(N, D, V)
        tflops = 6 * N * D * V / fl / 1e9
        log(f"\n== N={N} D={D} V={V}: floor (3 mm) {fl:.2f} ms ({tflops:.0f} TFLOP/s), one mm {one:.2f} ms, "
            f"grads {(N * D + V * D) * 2 / MB:.0f} MB, bf16 logits {N * V * 2 / MB:.0f} MB")
        results.append(dict(N=N, D=D, V=V, method="floor", ms=round(fl, 2), one_mm_ms=round(one, 2),
                            four_gemm_ms=round(fl * 4 / 3, 2)))
        for m in methods:
            if m == "floor":
                continue
            torch._dynamo.reset()
            counters.clear()
            try:
                fn = method_fn(m)
            except Exception as e:
                r = dict(method=m, error=f"{type(e).__name__}: {str(e)[:300]}")
            else:
                groups = _set_row_groups(2 if m == "lce_op_g2" else None)
                try:
                    r = measure(m, fn, h, w, y, ref)
                finally:
                    _set_row_groups(groups)
            if m.startswith("inductor_lce"):
                r["pass_counters"] = dict(counters["inductor_lce"])
            r.update(N=N, D=D, V=V)
            if "ms" in r:
                r["x_floor"] = round(r["ms"] / fl, 2)
            log(json.dumps(r))
            results.append(r)
            save_table(info, results)  # a run cut short still leaves its rows
        del h, w, y, ref
        gc.collect()
        torch.cuda.empty_cache()
    return info, results


def table_text(results):
    lines = ["| method | N | D | V | ms | x floor | op mem MB | over grads MB | err loss | err gh | err gw |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['N']} | {r['D']} | {r['V']} | error: {r['error'][:80]} |||||||")
            continue
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in (
            "method", "N", "D", "V", "ms", "x_floor", "op_mem_mb", "extra_mb", "err_loss", "err_gh", "err_gw")) + " |")
    return "\n".join(lines)


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["N"], r["D"], r["V"]) for r in results})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.2 * len(shapes), 4.2))
    axes = [axes] if len(shapes) == 1 else axes
    for ax, (N, D, V) in zip(axes, shapes):
        rows = [r for r in results if (r["N"], r["D"], r["V"]) == (N, D, V)]
        fl = next((r["ms"] for r in rows if r["method"] == "floor"), None)
        for r in rows:
            if "op_mem_mb" in r and "ms" in r:
                ax.scatter(r["ms"], r["op_mem_mb"], s=40)
                ax.annotate(r["method"], (r["ms"], r["op_mem_mb"]), fontsize=8, xytext=(4, 3),
                            textcoords="offset points")
        if fl:
            ax.set_xlim(left=min(0.9 * fl, ax.get_xlim()[0]))
            ax.axvline(fl, color="gray", ls="--", lw=1)
            ax.axvline(fl * 4 / 3, color="gray", ls=":", lw=1)
            ax.text(fl, ax.get_ylim()[1] if ax.has_data() else 1, " 3-GEMM floor", fontsize=7, va="top", color="gray")
        grads = (N * D + V * D) * 2 / MB
        ax.axhline(grads + 64, color="green", ls=":", lw=1)
        ax.text(ax.get_xlim()[0] if ax.has_data() else 0, grads + 64, " grads + 64 MB", fontsize=7, color="green")
        ax.set_yscale("log")
        ax.set_xlabel("fwd+bwd median ms")
        ax.set_ylabel("op memory MB (log)")
        ax.set_title(f"N={N} D={D} V={V}", fontsize=9)
    fig.suptitle(f"linear + cross-entropy, bf16, {torch.cuda.get_device_name()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def results_section(info, results):
    return (f"\n## {info['date']}: {info['device']}, torch {info['torch']}, triton {info['triton']}\n\n"
            "Loss forward+backward, bf16 inputs, 10% ignored targets, mean reduction. `ms`: median of "
            "triton.testing.do_bench; `op mem`: peak during one step minus memory live before it "
            "(includes grad_hidden + grad_weight); `over grads`: op mem minus those two; errors: "
            "||x - ref|| / ||ref|| against fp32.\n\n" + table_text(results) + "\n")


# --------------------------------------------------------------------------------------------- sweep

SWEEP_GEMM_CONFIGS = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
                      (128, 256, 64, 8, 4), (64, 256, 64, 4, 4)]
SWEEP_GH_CONFIGS = [(128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]


def compile_report():
    """Offline (no GPU): registers, spills, shared memory and wgmma count per kernel, variant and config."""
    from inductor_lce.lowerings import grad_hidden, grad_logits, lse_forward
    from inductor_lce.lowerings._compile_check import compile_sm90, ptxas_report

    common = dict(DOT_FP32=False, DOT_PRECISION="tf32")
    for cfg in SWEEP_GEMM_CONFIGS:
        bm, bn, bk, nw, ns = cfg
        blk = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        builds = [("lse_forward", lse_forward.lse_forward_kernel_jit,
                   dict(bias_ptr=None, HAS_BIAS=False, HAS_SOFTCAP=False, EVEN_K=True, **common), {}),
                  ("grad_logits", grad_logits.grad_logits_kernel_jit,
                   dict(bias_ptr=None, grad_lse_ptr=None, grad_sum_ptr=None, HAS_BIAS=False, HAS_GRAD_LSE=False,
                        HAS_GRAD_SUM=False, HAS_SOFTCAP=False, EVEN_K=True, GROUP_M=8, **common), {})]
        for mode, first, last in ((1, False, False), (1, False, True), (0, False, False), (0, True, True)):
            types = {"state_ptr": "*i8", "lo_ptr": "*i8"} if mode == 1 else {"state_ptr": "*fp32", "lo_ptr": "*fp32"}
            builds.append((f"grad_hidden mode={mode} first={first} last={last}", grad_hidden.grad_hidden_kernel_jit,
                           dict(MODE=mode, FIRST=first, LAST=last, EVEN_K=True, EVEN_D=True, GROUP_M=8, **common), types))
        for name, fn, const, types in builds:
            try:
                rep = ptxas_report(compile_sm90(fn, dict(const, **blk), nw, ns, ptr_types=types))
            except Exception as e:
                rep = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            log(f"{str(cfg):<22} {name:<38} {rep}")


def sweep(shapes):
    """Kernel-level timings of our variants at each shape (correctness is in tests/test_kernels.py)."""
    import triton

    import inductor_lce.lowerings as L
    from inductor_lce.lowerings import lce_triton as I
    from inductor_lce.lowerings.grad_hidden import grad_hidden_kernel_jit
    from inductor_lce.lowerings.grad_logits import grad_logits_kernel_jit
    from inductor_lce.lowerings.grad_logits_inplace import grad_logits_inplace_kernel
    from inductor_lce.lowerings.lse_forward import lse_forward_kernel_jit

    info = versions()
    log(json.dumps(info))
    rows = []

    def rec(**kw):
        rows.append(kw)
        log(json.dumps(kw))

    def try_time(fn):
        try:
            fn()
            torch.cuda.synchronize()
            return round(bench_ms(fn, warmup=10, rep=60), 4)
        except Exception as e:
            return f"{type(e).__name__}: {str(e)[:160]}"

    for N, D, V in shapes:
        h, w, y = make_inputs(N, D, V)
        h, w = h.detach(), w.detach()
        fl, one = floor_ms(N, D, V)
        gemm_tflop = 2 * N * D * V / 1e12
        rec(shape=[N, D, V], what="floor_3mm", ms=round(fl, 3), one_mm_ms=round(one, 3))
        valid = y != -100
        grad_loss = torch.where(valid, 1.0 / valid.sum(), 0.0).float()

        # forward: fused kernel per config (default splits), and the cuBLAS + lse_update variant
        per_split, splits = I.forward_splits(N, V, I._num_sms(str(h.device)))
        for cfg in SWEEP_GEMM_CONFIGS:
            bm, bn, bk, nw, ns = cfg
            m2 = torch.empty(splits, N, device=DEV)
            se = torch.empty(splits, N, device=DEV)
            sm = torch.empty(splits, N, device=DEV)
            tl_ = torch.zeros(N, device=DEV)

            def fwd():
                lse_forward_kernel_jit[(triton.cdiv(N, bm), splits)](
                    h, w, None, y, m2, se, sm, tl_, N, V, D, per_split, 0, h.stride(0), w.stride(0), 0.0,
                    HAS_BIAS=False, HAS_SOFTCAP=False, EVEN_K=D % bk == 0, DOT_FP32=False, DOT_PRECISION="tf32",
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)

            t = try_time(fwd)
            rec(shape=[N, D, V], what="fwd_fused", cfg=cfg, splits=splits, ms=t,
                tflops=round(gemm_tflop / t * 1e3, 0) if isinstance(t, float) else None)
        for n_splits in (4 * -(-132 // -(-N // 128)), 16 * -(-132 // -(-N // 128))):
            bm, bn, bk, nw, ns = SWEEP_GEMM_CONFIGS[0]
            ps = -(-(-(-V // n_splits)) // 256) * 256
            sp = -(-V // ps)
            m2 = torch.empty(sp, N, device=DEV)
            se = torch.empty(sp, N, device=DEV)
            sm = torch.empty(sp, N, device=DEV)

            def fwd_s():
                lse_forward_kernel_jit[(triton.cdiv(N, bm), sp)](
                    h, w, None, y, m2, se, sm, tl_, N, V, D, ps, 0, h.stride(0), w.stride(0), 0.0,
                    HAS_BIAS=False, HAS_SOFTCAP=False, EVEN_K=D % bk == 0, DOT_FP32=False, DOT_PRECISION="tf32",
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)

            t = try_time(fwd_s)
            rec(shape=[N, D, V], what="fwd_fused_splits", cfg=SWEEP_GEMM_CONFIGS[0], splits=sp, ms=t)
        for ws in (56, 200):
            I.SETTINGS.workspace_bytes, I.SETTINGS.forward = ws * MB, "cublas"
            t = try_time(lambda: I._forward_cublas(h, w, None, y, 0.0))
            rec(shape=[N, D, V], what="fwd_cublas_lse_update", workspace_mb=ws, ms=t)
        I.SETTINGS.workspace_bytes, I.SETTINGS.forward = 56 * MB, "fused"
        lse = L.lce_forward_impl(h, w, None, y, -100)[1]

        # backward components for one V-slab at the default plan's width and at a 4x wider slab
        plan = I.plan_backward(N, D, V, h.dtype, workspace=56 * MB)
        for slab in (plan.slab, 4 * plan.slab):
            slab = min(slab, V)
            v0 = 0
            ws = w[v0:v0 + slab]
            gl = torch.empty(N, slab, device=DEV, dtype=h.dtype)
            tf = 2 * N * D * slab / 1e12
            n_slabs = -(-V // slab)
            rec(shape=[N, D, V], what="plan", slab=slab, n_slabs=n_slabs, mode=plan.mode)
            t = try_time(lambda: torch.mm(h, ws.T, out=gl))
            rec(shape=[N, D, V], what="slab_logits_cublas", slab=slab, ms=t, x_slabs=_x(t, n_slabs))
            empty_b = torch.empty(0, device=DEV)
            for cfg in SWEEP_GEMM_CONFIGS:
                bm, bn, bk, nw, ns = cfg

                def glk():
                    grad_logits_kernel_jit[(triton.cdiv(N, bm) * triton.cdiv(slab, bn),)](
                        h, w, None, y, lse, grad_loss, None, None, gl, empty_b, N, D, v0, slab, 0, h.stride(0),
                        w.stride(0), gl.stride(0), -100, 0.0, HAS_BIAS=False, HAS_GRAD_LSE=False, HAS_GRAD_SUM=False,
                        HAS_SOFTCAP=False, EVEN_K=D % bk == 0,
                        DOT_FP32=False, DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                        num_warps=nw, num_stages=ns)

                t = try_time(glk)
                rec(shape=[N, D, V], what="slab_grad_logits_fused", slab=slab, cfg=cfg, ms=t,
                    tflops=round(tf / t * 1e3) if isinstance(t, float) else None, x_slabs=_x(t, n_slabs))

            def gl_inplace():
                torch.mm(h, ws.T, out=gl)
                grad_logits_inplace_kernel[lambda m: (triton.cdiv(N, m["BLOCK_M"]), triton.cdiv(slab, m["BLOCK_N"]))](
                    gl, y, lse, grad_loss, None, None, empty_b, N, slab, v0, gl.stride(0), -100, 0.0,
                    HAS_BIAS=False, HAS_GRAD_LSE=False, HAS_GRAD_SUM=False, HAS_SOFTCAP=False,
                    EMULATE_ROUNDING=False)

            t = try_time(gl_inplace)
            rec(shape=[N, D, V], what="slab_grad_logits_cublas_inplace", slab=slab, ms=t, x_slabs=_x(t, n_slabs))
            gl.normal_().mul_(1e-3)
            gw = torch.empty(slab, D, device=DEV, dtype=h.dtype)
            t = try_time(lambda: torch.mm(gl.T, h, out=gw))
            rec(shape=[N, D, V], what="slab_grad_weight_cublas", slab=slab, ms=t,
                tflops=round(tf / t * 1e3) if isinstance(t, float) else None, x_slabs=_x(t, n_slabs))
            gh_ref = torch.empty(N, D, device=DEV, dtype=h.dtype)
            t = try_time(lambda: torch.mm(gl, ws, out=gh_ref))
            rec(shape=[N, D, V], what="slab_grad_hidden_cublas_plain", slab=slab, ms=t,
                tflops=round(tf / t * 1e3) if isinstance(t, float) else None, x_slabs=_x(t, n_slabs))
            t = try_time(lambda: gh_ref.addmm_(gl, ws))
            rec(shape=[N, D, V], what="slab_grad_hidden_cublas_addmm_bf16", slab=slab, ms=t, x_slabs=_x(t, n_slabs))
            out = torch.zeros(N, D, device=DEV, dtype=h.dtype)
            lo = torch.zeros(N, D, device=DEV, dtype=torch.int8)
            st = torch.zeros(N, D, device=DEV, dtype=torch.float32)
            for cfg in SWEEP_GH_CONFIGS:
                bm, bn, bk, nw, ns = cfg
                for label, mode, first, last, state in (("write_once", 0, True, True, out),
                                                        ("compensated", 1, False, False, lo),
                                                        ("fp32_state", 0, False, False, st)):
                    def ghk():
                        grad_hidden_kernel_jit[(triton.cdiv(N, bm) * triton.cdiv(D, bn),)](
                            gl, ws, state, state if mode == 0 else lo, out, N, D, slab, 0, gl.stride(0),
                            w.stride(0), D, D, MODE=mode, FIRST=first, LAST=last,
                            EVEN_K=slab % bk == 0, EVEN_D=D % bn == 0, DOT_FP32=False, DOT_PRECISION="tf32",
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=nw, num_stages=ns)

                    t = try_time(ghk)
                    rec(shape=[N, D, V], what=f"slab_grad_hidden_{label}", slab=slab, cfg=cfg, ms=t,
                        tflops=round(tf / t * 1e3) if isinstance(t, float) else None, x_slabs=_x(t, n_slabs))
            del gl, gw, gh_ref, out, lo, st
            torch.cuda.empty_cache()

        # whole op, fwd+bwd, eager path, several settings
        ref = reference(h, w, y)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        import inductor_lce

        for label, settings in (("default_56MB", {}),
                                ("ws_120MB", dict(workspace_bytes=120 * MB)),
                                ("ws_400MB", dict(workspace_bytes=400 * MB)),
                                ("fp32_state_ws_200MB", dict(workspace_bytes=200 * MB, grad_hidden_state="fp32")),
                                ("cublas_fwd", dict(forward="cublas")),
                                ("cublas_grad_logits", dict(grad_logits="cublas"))):
            saved = {k: getattr(I.SETTINGS, k) for k in settings}
            for k, v in settings.items():
                setattr(I.SETTINGS, k, v)
            r = measure("lce_op_" + label, lambda a, b, c: inductor_lce.linear_cross_entropy(a, b, c), hh, ww, y, ref)
            for k, v in saved.items():
                setattr(I.SETTINGS, k, v)
            r.update(shape=[N, D, V], what="op_fwd_bwd", x_floor=round(r["ms"] / fl, 2) if "ms" in r else None)
            rec(**r)
        del h, w, y, hh, ww, ref, lse
        gc.collect()
        torch.cuda.empty_cache()
        json.dump(rows, open(os.path.join(out_dir(), "sweep.json"), "w"), indent=1)
    summarize_sweep(rows)


def summarize_sweep(rows):
    """Compact view: best config per (shape, kernel, slab) and the whole-op rows."""
    best = {}
    for r in rows:
        t = r.get("ms")
        if not isinstance(t, float) or "cfg" not in r:
            continue
        k = (tuple(r["shape"]), r["what"], r.get("slab"))
        if k not in best or t < best[k]["ms"]:
            best[k] = r
    for r in rows:
        if "cfg" in r:
            if best.get((tuple(r["shape"]), r["what"], r.get("slab"))) is r:
                log(f"{r['shape']} {r['what']:<34} slab={r.get('slab')} best {r['cfg']} {r['ms']} ms "
                    f"{r.get('tflops')} TF x_slabs={r.get('x_slabs')}")
        elif r.get("what") == "op_fwd_bwd":
            log(f"{r['shape']} {r['method']:<28} {r.get('ms')} ms x{r.get('x_floor')} mem {r.get('op_mem_mb')} "
                f"(+{r.get('extra_mb')}) err {r.get('err_loss')} {r.get('err_gh')} {r.get('err_gw')} {r.get('error', '')}")
        else:
            log(f"{r['shape']} {r['what']:<34} " + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("shape", "what")))


def _x(t, n):
    return round(t * n, 2) if isinstance(t, float) else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--compile-report", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.compile_report:
        compile_report()
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = json.loads(os.environ.get("SHAPES", json.dumps(SHAPES)))
    if args.profile:
        profile(shapes)
        return
    if args.sweep:
        sweep(shapes)
        return
    methods = os.environ.get("METHODS", ",".join(METHODS)).split(",")
    info, results = run_table(shapes, methods)
    d = out_dir()
    save_table(info, results)
    section = results_section(info, results)
    try:
        chart(results, os.path.join(d, "bench_lce.png"))
    except Exception as e:
        log("chart failed:", e)
    log(section)


if __name__ == "__main__":
    main()
