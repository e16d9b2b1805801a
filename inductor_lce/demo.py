"""End-to-end demo: a small decoder-only LM trained with plain ``torch.compile`` and with
``torch.compile(model, options=inductor_lce.options())``, same seed and data.

    python -m inductor_lce.demo            # both variants, prints a table, exits 1 on a mismatch

The loss is written the naive Hugging Face way (``lm_head(x).float()``, shift, then
``F.cross_entropy``); the user's code is not changed, only the compile options. The demo
checks that the pass rewrote the graph, that both variants give the same loss at every
step (within a stated tolerance), and reports the peak memory of each:

* CUDA: ``torch.cuda.max_memory_allocated`` over the steps after the first (compiling);
* CPU: the peak resident set size of a separate process per variant, over the whole
  process (``ru_maxrss``) and over the steps after the first (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs``).

Each variant always runs in its own subprocess (``--variant plain|lce``), so neither
shares compile caches, counters or allocator state with the other.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = {"plain": "torch.compile", "lce": "inductor_lce"}

# Loss agreement between the variants, per step: |plain - lce| <= ATOL + RTOL * |plain|.
# Both compute the same math; they differ only in summation order (the pass computes
# the logits in row chunks) and that difference grows a little with each optimizer step.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-3, 1e-3)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MB = 1e6


# ----------------------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, 4 * d_model, bias=False)
        self.fc2 = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids, labels):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        # The loss exactly as Hugging Face causal LMs write it: nothing here knows about the pass.
        logits = self.lm_head(x).float()
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        return F.cross_entropy(
            shift_logits.view(-1, self.vocab_size), shift_labels.view(-1), ignore_index=-100
        )


def make_batches(args, device):
    """``steps`` batches of random tokens; the last eighth of every sequence is padding (-100)."""
    g = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, args.seq - args.seq // 8:] = -100
        batches.append((ids.to(device), labels.to(device)))
    return batches


# ----------------------------------------------------------------------------- memory
def _read_status_kb(field: str) -> int | None:
    """A Linux /proc/self/status field in kB (VmHWM: peak RSS since the last reset;
    VmRSS: current RSS), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- one variant
def run_variant(args) -> dict:
    """Train ``args.steps`` steps with one variant; runs inside the child process."""
    import inductor_lce
    from torch._dynamo.utils import counters

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.d_model, args.layers, args.heads).to(device=device, dtype=dtype)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    batches = make_batches(args, device)

    if args.variant == "lce":
        compiled = torch.compile(model, options=inductor_lce.options())
    else:
        compiled = torch.compile(model)

    cuda = device.type == "cuda"
    losses, times, start_mb = [], [], None  # start_mb: memory in use when steps 2+ begin
    for step, (ids, labels) in enumerate(batches):
        if step == 1:  # compiled by now: measure the steady-state steps on their own
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                start_mb = torch.cuda.memory_allocated(device) / MB
            elif _reset_hwm():
                start_mb = _read_status_kb("VmRSS") * 1024 / MB
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = compiled(ids, labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())  # .item() synchronizes
        times.append(time.perf_counter() - t0)
        print(f"  [{args.variant}] step {step + 1}: loss {losses[-1]:.6f} ({_fmt_s(times[-1])})",
              file=sys.stderr, flush=True)

    if cuda:  # compiling allocates no device memory: the steps are the whole story
        peak = {"peak_kind": "cuda", "process_peak_mb": None,
                "start_mb": start_mb,
                "steady_peak_mb": torch.cuda.max_memory_allocated(device) / MB}
    else:
        hwm_kb = _read_status_kb("VmHWM") if start_mb is not None else None
        peak = {"peak_kind": "rss", "start_mb": start_mb,
                "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
                "steady_peak_mb": None if hwm_kb is None else hwm_kb * 1024 / MB}

    return {
        "variant": args.variant,
        "losses": losses,
        "times": times,
        "rewrites": int(counters["inductor_lce"]["rewrites"]),
        "counters": {k: int(v) for k, v in counters["inductor_lce"].items()},
        **peak,
    }


# ----------------------------------------------------------------------------- parent
def _child_cmd(args, variant: str, out_path: str) -> list[str]:
    cmd = [sys.executable, "-m", "inductor_lce.demo", "--variant", variant, "--out", out_path]
    for name in ("device", "dtype", "steps", "batch", "seq", "vocab", "d_model", "layers", "heads", "lr"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return cmd


def _fmt_mb(x) -> str:
    return "n/a" if x is None else f"{x:,.0f} MB"


def _fmt_s(t: float) -> str:
    return f"{t:.2f} s" if t >= 0.1 else f"{t * 1e3:.1f} ms"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--steps", type=int, default=3, help="training steps (>= 2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (steps 2+ are measured apart from compiling)")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"

    if args.variant:  # child: one variant, result as JSON
        result = run_variant(args)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0

    dtype = DTYPES[args.dtype]
    n_tokens = args.batch * args.seq
    logits_mb = n_tokens * args.vocab * 4 / MB
    print(f"inductor_lce demo: {args.layers}-layer LM, d_model {args.d_model}, vocab {args.vocab}, "
          f"batch {args.batch} x seq {args.seq} = {n_tokens} tokens, {args.dtype}, {args.device}, "
          f"SGD, {args.steps} steps; torch {torch.__version__}")
    low = "" if dtype == torch.float32 else f", {logits_mb / 2:,.1f} MB in {args.dtype}"
    print(f"logits [{n_tokens}, {args.vocab}] that a plain compile materializes: "
          f"{logits_mb:,.1f} MB per fp32 copy{low}\n", flush=True)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            out = os.path.join(tmp, f"{variant}.json")
            # A fresh Inductor cache per variant: a warm cache would skip compiling (and so
            # the pass and its counter), and the first-step time would not show compiling.
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, f"cache-{variant}"))
            print(f"running {VARIANTS[variant]} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(_child_cmd(args, variant, out), env=env)
            if proc.returncode != 0:
                print(f"FAIL: the {VARIANTS[variant]} variant exited with {proc.returncode}")
                return 1
            with open(out) as f:
                results[variant] = json.load(f)
    plain, lce = results["plain"], results["lce"]

    atol, rtol = TOLERANCE[dtype]
    rows = [("step", "loss torch.compile", "loss inductor_lce", "|diff|")]
    mismatches = []
    for i, (a, b) in enumerate(zip(plain["losses"], lce["losses"]), 1):
        diff = abs(a - b)
        if not diff <= atol + rtol * abs(a):
            mismatches.append(i)
        rows.append((str(i), f"{a:.6f}", f"{b:.6f}", f"{diff:.1e}"))
    _print_table(rows)
    print()

    both = lambda fmt, key: (fmt(plain[key]), fmt(lce[key]))  # noqa: E731
    mean_later = lambda t: _fmt_s(sum(t[1:]) / len(t[1:]))  # noqa: E731
    mem = "GPU allocated" if plain["peak_kind"] == "cuda" else "RSS"
    rows = [("", VARIANTS["plain"], VARIANTS["lce"]),
            ('rewrites (counters["inductor_lce"])', *both(str, "rewrites"))]
    if plain["peak_kind"] == "rss":
        rows.append(("peak RSS of the process (ru_maxrss)", *both(_fmt_mb, "process_peak_mb")))
    rows += [(f"{mem} when step 2 starts", *both(_fmt_mb, "start_mb")),
             (f"peak {mem} during steps 2+", *both(_fmt_mb, "steady_peak_mb")),
             ("first step (compile + run)", *both(lambda t: _fmt_s(t[0]), "times")),
             ("time per step, steps 2+", *both(mean_later, "times"))]
    _print_table(rows)

    a, b = plain["steady_peak_mb"], lce["steady_peak_mb"]
    if a is None or b is None:  # no /proc/self/clear_refs: fall back to the whole-process peak
        a, b = plain["process_peak_mb"], lce["process_peak_mb"]
    if a is not None and b is not None:
        print(f"\npeak memory saved: {a - b:,.0f} MB = {(a - b) / logits_mb:.1f} x the "
              f"{logits_mb:,.0f} MB of one fp32 logits copy")

    failures = []
    if len(plain["losses"]) != len(lce["losses"]):
        failures.append("the variants ran a different number of steps")
    if mismatches:
        failures.append(f"losses disagree at step(s) {mismatches} "
                        f"(tolerance |diff| <= {atol:g} + {rtol:g} * |loss|)")
    if lce["rewrites"] < 1:
        failures.append("inductor_lce.options() rewrote nothing (counters['inductor_lce']['rewrites'] == 0)")
    if plain["rewrites"] != 0:
        failures.append("plain torch.compile was rewritten too: the comparison means nothing")
    for failure in failures:
        print(f"FAIL: {failure}")
    if failures:
        return 1
    print(f"OK: {lce['rewrites']} rewrite(s); losses agree at every step "
          f"(|diff| <= {atol:g} + {rtol:g} * |loss|)")
    return 0


def _print_table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())


if __name__ == "__main__":
    sys.exit(main())
