"""The pass under torch.compile's modes (issue 10): plain Inductor and `backend="inductor_lce"` side by side in
mode=None, "reduce-overhead" (CUDA graphs) and "max-autotune", per shape: median time, op memory (as
bench_lce.py measures it) and whether Inductor ran the step as a CUDA graph (its skip counter and reasons).

    python bench/compile_modes.py                     # SHAPES / MODES env as in bench_lce.py; MODES=default,...
    DONATED_BUFFER=0 python bench/compile_modes.py    # torch._functorch.config.donated_buffer off (diagnosis)
    # one JSON line per (shape, mode, method) on stdout and in $OUT/compile_modes.jsonl, then a table

The "saving" column is the memory plain torch.compile takes above ours in the same mode: issue 10 asks that it
stays >= 0.95x the default mode's saving.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_lce as B  # noqa: E402  (the same inputs, reference and measurement)

MODES = ["default", "reduce-overhead", "max-autotune"]


class _SkipReasons(logging.Handler):
    """Inductor's "skipping cudagraphs due to ..." perf hints."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reasons: list = []

    def emit(self, record):
        msg = record.getMessage()
        if "cudagraph" in msg.lower():
            self.reasons.append(msg.splitlines()[0][:200])


def _compiled(method: str, mode: str):
    mode_arg = None if mode == "default" else mode
    if method == "compile":
        return torch.compile(B.naive, mode=mode_arg)
    return torch.compile(B.naive, backend="inductor_lce", mode=mode_arg)


def main():
    from torch._dynamo.utils import counters

    torch.backends.cuda.matmul.allow_tf32 = False
    if os.environ.get("DONATED_BUFFER") in ("0", "1"):  # AOTAutograd's reuse of saved buffers in the backward
        torch._functorch.config.donated_buffer = os.environ["DONATED_BUFFER"] == "1"
    shapes = json.loads(os.environ.get("SHAPES", json.dumps(B.SHAPES)))
    modes = os.environ.get("MODES", ",".join(MODES)).split(",")
    torch._logging.set_logs(perf_hints=True)
    hints = _SkipReasons()
    for name in ("torch._inductor", "torch._inductor.cudagraph_utils", "torch._inductor.compile_fx"):
        logging.getLogger(name).addHandler(hints)
    out = os.path.join(B.out_dir(), "compile_modes.jsonl")
    info = B.versions()
    B.log(json.dumps(info))
    rows = []
    for N, D, V in shapes:
        h, w, y = B.make_inputs(N, D, V)
        ref = B.reference(h, w, y)
        for mode in modes:
            for method in ("compile", "inductor_lce"):
                torch._dynamo.reset()
                counters.clear()
                hints.reasons.clear()
                r = B.measure(method, _compiled(method, mode), h, w, y, ref)
                r.update(N=N, D=D, V=V, mode=mode, rewrites=int(counters["inductor_lce"].get("rewrites", 0)),
                         cudagraph_skips=int(counters["inductor"].get("cudagraph_skips", 0)),
                         skip_reasons=sorted(set(hints.reasons))[:4])
                B.log(json.dumps(r))
                rows.append(r)
                with open(out, "a") as f:
                    f.write(json.dumps(r) + "\n")
        del h, w, y, ref
        gc.collect()
        torch.cuda.empty_cache()
    B.log("\n| N x D x V | mode | compile ms | lce ms | compile MB | lce MB | saving MB | lce CUDA-graph skips |")
    B.log("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] != "inductor_lce":
            continue
        c = next(x for x in rows if x["method"] == "compile" and x["mode"] == r["mode"] and x["N"] == r["N"]
                 and x["V"] == r["V"])
        saving = (c.get("extra_mb", 0) - r.get("extra_mb", 0)) if "extra_mb" in r and "extra_mb" in c else None
        B.log(f"| {r['N']}x{r['D']}x{r['V']} | {r['mode']} | {c.get('ms')} | {r.get('ms')} | {c.get('extra_mb')} | "
              f"{r.get('extra_mb')} | {saving} | {r['cudagraph_skips']} {'; '.join(r['skip_reasons'])} |")


if __name__ == "__main__":
    main()
