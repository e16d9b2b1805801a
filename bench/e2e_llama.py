"""End to end: one compiled training step of a ~1B-parameter Llama-style model (plain PyTorch,
vocabulary 128256, sequence 4096, bf16), with plain torch.compile, with inductor_lce.options() (``lce``: the
default, three-GEMM algorithm) and with inductor_lce.options(lean=True) (``lce_lean``: recompute).

Each variant runs in its own process (``--variant plain|lce|lce_lean``); the parent prints peak memory
(torch.cuda.max_memory_allocated over the timed steps) and tokens/s, and appends a section to
bench/RESULTS.md when --write is given.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, T, 3, self.heads, D // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(B, T, D))
        g, u = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class Llama(nn.Module):
    def __init__(self, vocab=128256, dim=2048, layers=8, heads=16, hidden=8192):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, labels):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.norm(x)).float()
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))


def run_variant(variant, batch, seq, steps):
    import inductor_lce
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Llama().cuda().to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    opts = {"plain": {}, "lce": inductor_lce.options(), "lce_lean": inductor_lce.options(lean=True)}[variant]
    compiled = torch.compile(model, options=opts)
    tokens = torch.randint(0, 128256, (batch, seq), device="cuda")
    labels = tokens.clone()

    def step():
        loss = compiled(tokens, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    losses = [step().item() for _ in range(2)]  # compile + optimizer state
    compile_s = time.time() - t0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(steps):
        losses.append(step().item())
    torch.cuda.synchronize()
    dt = (time.time() - t0) / steps
    return dict(variant=variant, params=params, peak_gb=torch.cuda.max_memory_allocated() / 2**30,
                tokens_per_s=batch * seq / dt, step_ms=dt * 1e3, losses=losses, first_two_steps_s=compile_s,
                rewrites=counters["inductor_lce"]["rewrites"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=["plain", "lce", "lce_lean"])
    ap.add_argument("--variants", default="plain,lce,lce_lean")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    if a.variant:
        print("RESULT " + json.dumps(run_variant(a.variant, a.batch, a.seq, a.steps)), flush=True)
        return
    results = []
    for v in a.variants.split(","):
        env = dict(os.environ, TORCHINDUCTOR_AUTOGRAD_CACHE="0", TORCHINDUCTOR_FX_GRAPH_CACHE="0")
        p = subprocess.run([sys.executable, __file__, "--variant", v, "--batch", str(a.batch), "--seq", str(a.seq),
                            "--steps", str(a.steps)], capture_output=True, text=True, env=env)
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode or not line:
            print(p.stdout[-3000:], p.stderr[-5000:])
            raise SystemExit(f"variant {v} failed")
        results.append(json.loads(line[0][7:]))
    base = results[0]["tokens_per_s"]
    hdr = ("| variant | params | peak GB | tokens/s | x first | step ms | rewrites | losses (first 5 timed steps) |\n"
           "|---|---|---|---|---|---|---|---|\n")
    rows = "".join(f"| {r['variant']} | {r['params']/1e9:.2f}B | {r['peak_gb']:.2f} | {r['tokens_per_s']:.0f} | "
                   f"{r['tokens_per_s'] / base:.3f} | {r['step_ms']:.1f} | {r['rewrites']} | "
                   f"{', '.join(f'{x:.4f}' for x in r['losses'][2:7])} |\n" for r in results)
    section = (f"\n## {datetime.date.today()} end to end: {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n"
               f"`bench/e2e_llama.py`: Llama-style model, vocabulary 128256, batch {a.batch} x sequence {a.seq}, bf16, "
               f"AdamW (fused); one compiled training step, peak = max_memory_allocated over {a.steps} steps after two warm-up steps.\n\n"
               + hdr + rows)
    print(section)
    if a.write:
        open(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "a").write(section)


if __name__ == "__main__":
    main()
