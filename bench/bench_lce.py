"""Linear + cross-entropy, loss forward+backward, side by side on one CUDA GPU.

    python bench/bench_lce.py              # methods x shapes: table on stdout; $OUT (or bench/out/) gets
                                           # bench.json, RESULTS_section.md and bench_lce.png
    python bench/bench_lce.py --sweep      # the three-GEMM loop's pieces alone, per grad_weight variant
    python bench/bench_lce.py --chunk-rows # cuBLAS's per-chunk matmuls at chunk sizes around the plan's

Methods (METHODS=comma list selects):
  floor         three cuBLAS matmuls of N*D*V (logits, grad_hidden, grad_weight): the time floor
  eager         F.cross_entropy(F.linear(h, w).float(), y)
  compile       torch.compile of the same function (Inductor defaults)
  liger         Liger FusedLinearCrossEntropyLoss (liger-kernel 0.8.5)
  cce           Apple cut-cross-entropy linear_cross_entropy (25.1.1)
  inductor_lce  torch.compile(fn, options=inductor_lce.options()): the graph pass emits our ops (the default,
                three-GEMM algorithm here: gradients in the forward, lce_fused)
  inductor_lce_lean  the same with options(lean=True): the recompute algorithm (lce_forward + lce_backward)
  inductor_lce_inlined  the pass, then lowering.inline.InlineTritonOps in the joint slot (lean ops only)
  lce_op        inductor_lce.linear_cross_entropy eagerly (mean: the three-GEMM algorithm)
  lce_op_g2     lean: the recompute ops eagerly with Settings.row_groups=2 (one extra bf16 rounding of grad_weight)
  NAME@k=v;k=v  any method with lowering.SETTINGS fields set while it runs (e.g.
                inductor_lce@fused_state=fp32;fused_workspace_bytes=3e9): sweeps of the plan
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
import logging
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [[8192, 2304, 256000], [8192, 4096, 128256], [16384, 2048, 32000]]
METHODS = ["floor", "eager", "compile", "liger", "cce", "inductor_lce", "inductor_lce_lean", "lce_op"]
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
    if m == "inductor_lce_lean":
        import inductor_lce

        return torch.compile(naive, options=inductor_lce.options(lean=True))
    if m == "inductor_lce_inlined":  # the pass, then lowering.inline: Inductor emits our kernels itself
        import inductor_lce
        from inductor_lce.entry import ChainedPass
        from inductor_lce.lowering.inline import InlineTritonOps

        opts = inductor_lce.options(lean=True)
        opts["joint_custom_pre_pass"] = ChainedPass(opts["joint_custom_pre_pass"], InlineTritonOps())
        return torch.compile(naive, options=opts)
    if m == "lce_op":
        import inductor_lce

        return lambda h, w, y: inductor_lce.linear_cross_entropy(h, w, y)
    if m == "lce_op_g2":  # (run_table sets Settings.row_groups for lce_op_g2)
        import inductor_lce

        def lean_op(h, w, y):  # reduction="none": per-token losses, the recompute ops
            return inductor_lce.linear_cross_entropy(h, w, y, reduction="none").sum() / (y != -100).sum()
        return lean_op
    if m == "lce_traced":
        import inductor_lce.lowering  # noqa: F401  (registers the triton ops)

        def traced(h, w, y):
            loss, _, _ = torch.ops.inductor_lce.lce_forward_triton(h, w, None, y, -100)
            return loss.sum() / (y != -100).sum()

        return torch.compile(traced, fullgraph=True)
    raise ValueError(m)


def versions():
    import triton

    return dict(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
                date=datetime.date.today().isoformat())


def _set_settings(spec):
    """``k=v;k=v`` -> set those lowering.SETTINGS fields (numbers parsed); returns the old values."""
    if not spec:
        return {}
    from inductor_lce.lowering import SETTINGS

    old = {}
    for item in spec.split(";"):
        key, value = item.split("=")
        current = getattr(SETTINGS, key)
        old[key] = current
        if isinstance(current, bool):
            parsed = value in ("1", "true", "True")
        elif isinstance(current, (int, float)):
            parsed = type(current)(float(value))
        elif current is None:  # the Optional byte counts (fused_workspace_bytes): "None" or a number, e.g. 3e9
            parsed = None if value == "None" else int(float(value))
        else:
            parsed = value
        setattr(SETTINGS, key, parsed)
    return old


def _restore_settings(old):
    if old:
        from inductor_lce.lowering import SETTINGS

        for key, value in old.items():
            setattr(SETTINGS, key, value)


def _set_row_groups(value):
    """Set Settings.row_groups (backward reads it when it runs, after the forward returns); returns the old."""
    if value is None:
        return None
    from inductor_lce.lowering import SETTINGS

    old, SETTINGS.row_groups = SETTINGS.row_groups, value
    return old


def events_on(p, device: str) -> list:
    """The profiler's events of one side: "CUDA" (kernels) or "CPU" (host ops)."""
    return [e for e in p.events() if getattr(e.device_type, "name", "") == device]


def log_gaps(p, top=8):
    """Where the GPU idles inside the profiled step: the largest gaps between consecutive kernels, with the
    kernels on either side (a gap the host's launches cause, or a sync)."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events_on(p, "CUDA"))
    if not kernels:
        return
    gaps, end, prev = [], kernels[0][1], kernels[0][2]
    for start, stop, name in kernels[1:]:
        if start > end:
            gaps.append(((start - end) / 1e3, prev, name, end, start))
        if stop > end:
            end, prev = stop, name
    span = (end - kernels[0][0]) / 1e3
    log(f"  GPU span {span:.2f} ms, idle between kernels {sum(g[0] for g in gaps):.2f} ms in {len(gaps)} gaps")
    host = events_on(p, "CPU")
    if host:   # before the first kernel: the GPU idles while the host enters the step
        t0 = min(e.time_range.start for e in host)
        lead = [(e.time_range.end - e.time_range.start, e.name) for e in host
                if e.time_range.start < kernels[0][0] and e.time_range.end - e.time_range.start >= 500]
        log(f"  first kernel {(kernels[0][0] - t0) / 1e3:.2f} ms after the step's first host op; host ops of >= 0.5 "
            "ms before it: " + ", ".join(f"{name[:40]} {dur / 1e3:.2f}" for dur, name in sorted(lead)[-6:]))
    for rank, (ms, before, after, g0, g1) in enumerate(sorted(gaps, reverse=True)[:top]):
        log(f"    gap {ms:6.3f} ms  after {before[:50]}  before {after[:50]}")
        if rank < 3:  # what the host did meanwhile: its ops of >= 20 us that started in the gap
            during = sorted((e.time_range.start, e.time_range.end - e.time_range.start, e.name) for e in host
                            if g0 <= e.time_range.start < g1 and e.time_range.end - e.time_range.start >= 20)
            for t, dur, name in during[:12]:
                log(f"        host +{(t - g0) / 1e3:6.3f} ms  {dur / 1e3:6.3f} ms  {name[:70]}")


def log_host_time(step, reps=5):
    """Host time of a step (returns before the GPU is done unless something syncs) against its whole time."""
    host, whole = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        whole.append(time.perf_counter() - t0)
    log(f"  host time per step {sorted(host)[reps // 2] * 1e3:.2f} ms of {sorted(whole)[reps // 2] * 1e3:.2f} ms "
        "(host close to whole: launch-bound or a sync)")


def host_profile(shapes, calls=30):
    """Where the host's time goes in the fused op (eager calls; cProfile, top functions by own time)."""
    import cProfile
    import pstats

    import inductor_lce.lowering  # noqa: F401  (registers the triton ops)

    for N, D, V in shapes:
        h, w, y = make_inputs(N, D, V)
        scale = torch.tensor(1.0 / N, device=DEV)
        op = torch.ops.inductor_lce.lce_fused_triton.default

        def call():
            op(h.detach(), w.detach(), None, y, scale, -100, 0.0)

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        host = (time.perf_counter() - t0) / calls
        torch.cuda.synchronize()
        whole = (time.perf_counter() - t0) / calls
        log(f"\n== host N={N} D={D} V={V}: host {host * 1e3:.2f} ms per call, whole {whole * 1e3:.2f} ms")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(calls):
            call()
        pr.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(pr, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(25)
        del h, w, y
        torch.cuda.empty_cache()


def profile(shapes):
    """Kernel time breakdown of one fwd+bwd step (after a warm-up step that autotunes) of each method in
    PROFILE_METHODS (default: inductor_lce, inductor_lce_lean), and the step's wall time under the profiler."""
    from torch.profiler import ProfilerActivity, profile as prof

    methods = os.environ.get("PROFILE_METHODS", "inductor_lce,inductor_lce_lean").split(",")
    for N, D, V in shapes:
        torch._dynamo.reset()  # (every method compiles `naive` again: stay under Dynamo's recompile limit)
        h, w, y = make_inputs(N, D, V)
        for m in methods:
            base_method, _, spec = m.partition("@")
            fn = method_fn(base_method)
            old = _set_settings(spec)

            def step():
                h.grad = None
                w.grad = None
                fn(h, w, y).backward()

            try:
                step()
                torch.cuda.synchronize()
                t0 = time.time()
                with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                    step()
                    torch.cuda.synchronize()
                wall = (time.time() - t0) * 1e3
            finally:
                _restore_settings(old)
            by_name: dict = {}
            for e in events_on(p, "CUDA"):   # kernels (the CPU side is for log_gaps)
                t, c = by_name.get(e.name, (0.0, 0))
                by_name[e.name] = (t + (e.time_range.end - e.time_range.start) / 1e3, c + 1)
            rows = sorted(((k, t, c) for k, (t, c) in by_name.items()), key=lambda r: -r[1])
            total = sum(r[1] for r in rows)
            log(f"\n== profile {m} N={N} D={D} V={V}: kernels {total:.2f} ms (wall under profiler {wall:.1f} ms)")
            for k, t, c in rows[:10]:
                log(f"  {t:8.2f} ms  {c:5d}x  {k[:90]}")
            log_gaps(p)
            log_host_time(step)
        del h, w, y
        gc.collect()
        torch.cuda.empty_cache()


def chunk_rows_sweep(shapes):
    """cuBLAS's rate on the fused op's two per-chunk matmuls (logits [c, V] = h_c @ W.T, grad_hidden [c, D] =
    grad_logits @ W) for chunk sizes c around the plan's: whether some chunk sizes fill the GPU's waves better."""
    import inductor_lce.lowering.lce_triton as I

    for N, D, V in shapes:
        plan = I.plan_fused(N, D, V, torch.bfloat16)
        h = torch.randn(N, D, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(V, D, device=DEV, dtype=torch.bfloat16) / D ** 0.5
        logits = torch.empty(N, I._chunk_stride(V, False), device=DEV, dtype=torch.bfloat16)[:, :V]  # (the op's)
        gh = torch.empty(N, D, device=DEV, dtype=torch.bfloat16)
        log(f"\n== chunk rows N={N} D={D} V={V}: plan {plan.chunk_rows} rows ({plan.state_mode})")
        step = 64 if plan.chunk_rows < 2048 else 128
        lo, hi = max(step, plan.chunk_rows // 2), min(N, plan.chunk_rows * 3 // 2)
        for c in range(lo // step * step, hi + 1, step):
            t_l = bench_ms(lambda: torch.mm(h[:c], w.t(), out=logits[:c]))
            t_g = bench_ms(lambda: torch.mm(logits[:c], w, out=gh[:c]))
            tf = 2 * c * D * V / 1e9
            log(f"  c={c:5d}  logits {t_l:.3f} ms {tf / t_l:4.0f} TF/s   grad_hidden {t_g:.3f} ms {tf / t_g:4.0f} TF/s"
                f"   per 1000 rows {1000 * (t_l + t_g) / c:.3f} ms")
        del h, w, logits, gh
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
            base_method, _, spec = m.partition("@")
            try:
                fn = method_fn(base_method)
            except Exception as e:
                r = dict(method=m, error=f"{type(e).__name__}: {str(e)[:300]}")
            else:
                groups = _set_row_groups(2 if m == "lce_op_g2" else None)
                old = _set_settings(spec)
                try:
                    r = measure(m, fn, h, w, y, ref)
                finally:
                    _set_row_groups(groups)
                    _restore_settings(old)
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


def compile_report():
    """Offline (no GPU): registers, spills, shared memory and wgmma count per kernel, variant and config."""
    from inductor_lce.kernels import grad_logits, lse_forward, matmul_accumulate
    from inductor_lce.lowering._compile_check import compile_sm90, ptxas_report

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
            builds.append((f"matmul_accumulate mode={mode} first={first} last={last}",
                           matmul_accumulate.matmul_accumulate_kernel_jit,
                           dict(MODE=mode, FIRST=first, LAST=last, EVEN_M=True, EVEN_N=True, EVEN_K=True, GROUP_M=8,
                                PREFETCH=True, EPILOGUE_SPLIT=1, **common), types))
        for name, fn, const, types in builds:
            try:
                rep = ptxas_report(compile_sm90(fn, dict(const, **blk), nw, ns, ptr_types=types))
            except Exception as e:
                rep = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            log(f"{str(cfg):<22} {name:<38} {rep}")


def sweep(shapes):
    """Kernel-level timings of the three-GEMM loop's pieces at each shape: one row chunk of the default plan,
    each variant of the grad_weight accumulation, x_chunks = time x chunk count (correctness:
    tests/test_kernels.py); and the recompute backward's pieces on one V-slab of its plan (lean_*: x_chunks = time
    x slabs). The whole ops' kernel breakdown: --profile."""
    import inductor_lce.lowering as L
    from inductor_lce.kernels._config import row_configs
    from inductor_lce.kernels.softmax_grad_rows import softmax_grad_rows_kernel_jit
    from inductor_lce.lowering import lce_triton as I

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
        rec(shape=[N, D, V], what="floor_3mm", ms=round(fl, 3), one_mm_ms=round(one, 3))
        plan = I.plan_fused(N, D, V, h.dtype)
        c = plan.chunk_rows or min(N, 1024)
        n_chunks = -(-N // c)
        tf = 2 * c * D * V / 1e12
        rec(shape=[N, D, V], what="plan", chunk_rows=plan.chunk_rows, state=plan.state_mode,
            workspace_mb=round(plan.workspace_bytes / MB), n_chunks=n_chunks)
        stride = I._chunk_stride(V, False)
        h_c, y_c = h[:c], y[:c]
        loss, lse = torch.empty(c, device=DEV), torch.empty(c, device=DEV)
        scale = torch.tensor(1.0 / N, device=DEV)
        buf = torch.empty(c, stride, device=DEV, dtype=h.dtype)[:, :V]   # (the op's chunk buffer)
        logits = torch.mm(h_c, w.t(), out=buf)
        gl_t = logits.t()
        gh = torch.empty(c, D, device=DEV, dtype=h.dtype)
        gw = torch.zeros(V, D, device=DEV, dtype=h.dtype)
        st32 = torch.zeros(V, D, device=DEV, dtype=torch.float32)
        lo = torch.zeros(V, D, device=DEV, dtype=torch.int8)
        padded = stride % I._chunk_grain() == 0

        def accumulate(mode, state, kernel, first=False):
            def run():
                saved, I.SETTINGS.fused_grad_weight_kernel = I.SETTINGS.fused_grad_weight_kernel, kernel
                try:
                    I._matmul_accumulate("grad_weight", gl_t, h_c, gw, state, mode=mode, first=first, last=False,
                                         m_key=I._bucket(V), k_key=I._bucket(c), a_padded=padded)
                finally:
                    I.SETTINGS.fused_grad_weight_kernel = saved
            run.result = lambda: state if mode == I.MODE_FP32 else gw   # where the sum ends up
            return run

        def accumulate_error(run):
            """max |out - fp32 product| / max |fp32 product| of one accumulation onto a zero state (the bf16
            rounding of the result: about 2^-9)"""
            for t in (gw, st32, lo):
                t.zero_()
            with L._plain_launches():
                run()
            ref = gl_t.float() @ h_c.float()
            return float((run.result().float() - ref).abs().max() / ref.abs().max())

        pieces = [("logits_mm_cublas", lambda: torch.mm(h_c, w.t(), out=buf)),
                  ("softmax_grad_rows", lambda: I._softmax_grad_rows(logits, y_c, loss, lse, scale, -100, 0.0, False)),
                  ("grad_hidden_mm_cublas", lambda: torch.mm(logits, w, out=gh)),
                  ("grad_weight_mm_cublas_bf16_overwrite", lambda: torch.mm(gl_t, h_c, out=gw)),
                  ("grad_weight_mm_triton_fp32", accumulate(I.MODE_FP32, st32, "pointer")),
                  ("grad_weight_mm_triton_compensated", accumulate(I.MODE_COMPENSATED, lo, "pointer")),
                  ("grad_weight_mm_triton_tma_fp32", accumulate(I.MODE_FP32, st32, "tma")),
                  ("grad_weight_mm_triton_tma_compensated", accumulate(I.MODE_COMPENSATED, lo, "tma")),
                  ("grad_weight_mm_gluon_wgmma_fp32", accumulate(I.MODE_FP32, st32, "wgmma")),
                  ("grad_weight_mm_gluon_wgmma_compensated", accumulate(I.MODE_COMPENSATED, lo, "wgmma")),
                  ("grad_weight_mm_gluon_cooperative_compensated", accumulate(I.MODE_COMPENSATED, lo, "cooperative")),
                  # the first chunk's launch (no state read): the kernels' GEMM + store alone
                  ("grad_weight_first_triton_tma_compensated", accumulate(I.MODE_COMPENSATED, lo, "tma", True)),
                  ("grad_weight_first_gluon_cooperative_compensated",
                   accumulate(I.MODE_COMPENSATED, lo, "cooperative", True))]

        def softmax_with(cfg):
            """softmax_grad_rows.py with one config on the whole chunk (the autotuner times its configs on the first
            2 x SMs rows only)."""
            programs = -(-c // cfg.kwargs["BLOCK_M"])
            return lambda: softmax_grad_rows_kernel_jit[(programs,)](
                logits, y_c, loss, lse, scale, c, V, logits.stride(0), -100, 0.0, HAS_SOFTCAP=False,
                EMULATE_ROUNDING=False, **cfg.kwargs, num_warps=cfg.num_warps)

        pieces += [("softmax_grad_rows_" + "_".join(f"{v}" for v in (*cfg.kwargs.values(), cfg.num_warps)),
                    softmax_with(cfg)) for cfg in row_configs("softmax_grad_rows")]
        if I._cublas_fp32_accumulate_works(DEV):
            pieces.append(("grad_weight_mm_cublas_fp32_addmm",
                           lambda: torch.ops.aten.addmm.dtype_out(st32, gl_t, h_c, torch.float32, out=st32)))
        # the recompute backward's pieces, one V-slab of its plan (lean_*; x_chunks = time x slabs)
        lean = I.plan_backward(N, D, V, h.dtype)
        slab_logits = torch.nn.functional.linear(h, w[:lean.slab])                 # [N, slab]
        gh_all = torch.zeros(N, D, device=DEV, dtype=h.dtype)
        gh_lo = torch.zeros(N, D, device=DEV, dtype=torch.int8)
        n_slabs = -(-V // lean.slab)
        rec(shape=[N, D, V], what="lean_plan", slab=lean.slab, slabs=n_slabs, mode=lean.mode)

        def grad_hidden_slab(kernel, first=False):
            def run():
                saved, I.SETTINGS.grad_hidden_kernel = I.SETTINGS.grad_hidden_kernel, kernel
                try:
                    I._matmul_accumulate("grad_hidden", slab_logits, w[:lean.slab], gh_all, gh_lo,
                                         mode=I.MODE_COMPENSATED, first=first, last=False, m_key=I._bucket(N),
                                         k_key=I._bucket(lean.slab))
                finally:
                    I.SETTINGS.grad_hidden_kernel = saved
            return run

        lean_pieces = [("lean_logits_mm_cublas", lambda: torch.nn.functional.linear(h, w[:lean.slab])),
                       ("lean_grad_weight_mm_cublas", lambda: torch.mm(slab_logits.t(), h, out=gw[:lean.slab])),
                       ("lean_grad_hidden_mm_cublas_bf16_overwrite", lambda: torch.mm(slab_logits, w[:lean.slab],
                                                                                      out=gh_all)),
                       ("lean_grad_hidden_mm_triton_compensated", grad_hidden_slab("pointer")),
                       ("lean_grad_hidden_mm_triton_tma_compensated", grad_hidden_slab("tma")),
                       ("lean_grad_hidden_first_triton_tma_compensated", grad_hidden_slab("tma", True))]
        only = [w for w in os.environ.get("SWEEP_ONLY", "").split(",") if w]
        tf_slab = 2 * N * D * lean.slab / 1e12
        for what, fn in pieces + lean_pieces:
            if only and not any(w in what for w in only):
                continue
            with L._plain_launches():   # as the op launches them (no wrap_triton dispatch per launch)
                t = try_time(fn)
            per_launch_tf, launches = (tf_slab, n_slabs) if what.startswith("lean_") else (tf, n_chunks)
            rec(shape=[N, D, V], what=what, ms=t, x_chunks=_x(t, launches),
                tflops=round(per_launch_tf / t * 1e3) if isinstance(t, float) and "_mm_" in what else None,
                error=accumulate_error(fn) if hasattr(fn, "result") and isinstance(t, float) else None,
                config=_tuned_config(what))
        del logits, buf, gl_t, gh, gw, st32, lo, h, w, y, slab_logits, gh_all, gh_lo
        gc.collect()
        torch.cuda.empty_cache()
        json.dump(rows, open(os.path.join(out_dir(), "sweep.json"), "w"), indent=1)
    summarize_sweep(rows)


def _tuned_config(what):
    """The autotuned config a row kernel of the sweep settled on (the last key tuned), else None."""
    if what != "softmax_grad_rows":
        return None
    from inductor_lce.kernels.softmax_grad_rows import softmax_grad_rows_kernel

    cache = getattr(softmax_grad_rows_kernel, "cache", {})
    return str(list(cache.values())[-1]) if cache else None


def summarize_sweep(rows):
    """Compact view: one line per (shape, piece)."""
    for r in rows:
        log(f"{r['shape']} {r['what']:<38} " + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("shape", "what")))


def _x(t, n):
    return round(t * n, 2) if isinstance(t, float) else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--compile-report", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--host", action="store_true")
    ap.add_argument("--chunk-rows", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("inductor_lce").setLevel(logging.INFO)   # (the per-shape grad_weight kernel choice)
    if args.compile_report:
        compile_report()
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = json.loads(os.environ.get("SHAPES", json.dumps(SHAPES)))
    if args.profile:
        profile(shapes)
        return
    if args.host:
        host_profile(shapes)
        return
    if args.chunk_rows:
        chunk_rows_sweep(shapes)
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
