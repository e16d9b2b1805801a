"""End to end, data parallel on 2 GPUs: bench/e2e_llama.py's Llama-style model compiled with plain
torch.compile and with inductor_lce.options(), under DDP and under FSDP2 (``fully_shard`` per block and on
the root, ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``).

One configuration per process group (run by torchrun; rank 0 gathers every rank's numbers with
``all_gather_object`` and prints one ``RESULT {json}`` line):

    torchrun --standalone --nproc_per_node=2 bench/e2e_distributed.py --strategy ddp --variant lce

All four configurations (ddp/fsdp2 x plain/lce), each in its own torchrun (no compile cache, counters or
allocator state shared between them), then a Markdown table; ``--write`` appends it to bench/RESULTS.md:

    python bench/e2e_distributed.py --all [--write] [--log-dir DIR] [--jsonl FILE]
    python bench/e2e_distributed.py --all --device cpu --tiny --steps 4      # CPU, gloo, fp32, minutes

Per configuration: ``--steps`` steps on one fixed batch per rank (deterministic random tokens, per rank;
labels = the tokens with about 10% set to -100, the model shifts them), the first ``--warmup`` steps
(compile, optimizer state) untimed; tokens/s (global) over the timed steps (torch.cuda.synchronize), peak
memory per rank = torch.cuda.max_memory_allocated over the timed steps (reset after the warm-up; on the
CPU: the process's peak RSS over them), ``counters["inductor_lce"]`` per rank, every rank's loss at every
step (warm-up included).

``--layout flat`` (default) is e2e_llama.Llama as it is: the loop over the blocks in the same forward as
the head and the loss. Under FSDP2 Dynamo breaks the graph inside that loop (FSDP2's hooks are
``torch._dynamo.disable``d) and skips the whole frame, so the head and the loss run eagerly and the pass
never sees them (counters stay empty; README, "Data-parallel training"). ``--layout body`` builds the same
parameters (same init) with the embedding, the blocks and the final norm in a submodule (Hugging Face's
layout), where the head and the loss are compiled together after the body.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # e2e_llama (torchrun puts the script's folder first anyway)
if ROOT not in sys.path:
    sys.path.append(ROOT)  # inductor_lce from this checkout, unless installed

from e2e_llama import Llama  # noqa: E402

from inductor_lce.demo import _read_status_kb, _reset_hwm  # noqa: E402  (CPU peak RSS: the demo's helpers)

# The GPU hosts need NVLink multicast off (NCCL's NVLS and symmetric memory's multicast).
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
             # a cache hit would skip the pass and its counters
             "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
TINY = dict(vocab=1000, dim=64, layers=2, heads=4, hidden=256)
IGNORED = 0.1  # fraction of labels set to -100


class Body(nn.Module):
    def __init__(self, embed, blocks, norm):
        super().__init__()
        self.embed, self.blocks, self.norm = embed, blocks, norm

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


class BodyLlama(nn.Module):
    """e2e_llama.Llama's modules (built by it: same parameters, same init), the body in a submodule."""

    def __init__(self, **cfg):
        super().__init__()
        llama = Llama(**cfg)
        self.model = Body(llama.embed, llama.blocks, llama.norm)
        self.lm_head = llama.lm_head

    def forward(self, tokens, labels):  # the loss exactly as e2e_llama.Llama.forward writes it
        logits = self.lm_head(self.model(tokens)).float()
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))


def blocks_of(model):
    return model.model.blocks if isinstance(model, BodyLlama) else model.blocks


# ----------------------------------------------------------------------------- one configuration (each rank)
def run_rank(a):
    import inductor_lce
    from torch._dynamo.utils import counters

    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = a.device == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", timeout=timedelta(minutes=15), device_id=dev)
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        torch._inductor.config.compile_threads = 1
        dist.init_process_group("gloo", timeout=timedelta(minutes=15))
    try:
        res = _train(a, rank, world, dev, counters, inductor_lce)
        dist.barrier()  # no rank tears down while another still talks
        return res
    finally:
        dist.destroy_process_group()


def _train(a, rank, world, dev, counters, inductor_lce):
    cuda = dev.type == "cuda"
    cfg = TINY if a.tiny else {}
    vocab = cfg.get("vocab", 128256)
    torch.manual_seed(0)
    with dev:  # same init on every rank (same seed, same device type)
        model = (BodyLlama if a.layout == "body" else Llama)(**cfg)
    params = sum(p.numel() for p in model.parameters())
    if a.strategy == "ddp":
        if cuda:
            model = model.to(torch.bfloat16)  # as e2e_llama: bf16 parameters, gradients all-reduced in bf16
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if cuda else None,
                                                    bucket_cap_mb=a.bucket_cap_mb)
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # fp32 sharded parameters; bf16 compute, fp32 gradient reduction (CPU: fp32 throughout)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else torch.float32, reduce_dtype=torch.float32)
        for block in blocks_of(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, fused=cuda)
    options = {"plain": {}, "lce": inductor_lce.options(), "lce_lean": inductor_lce.options(lean=True)}[a.variant]
    compiled = torch.compile(model, options=options)

    g = torch.Generator().manual_seed(1000 + rank)  # a different batch on each rank, fixed over the steps
    tokens = torch.randint(0, vocab, (a.batch, a.seq), generator=g)
    labels = tokens.clone()
    labels[torch.rand(a.batch, a.seq, generator=g) < IGNORED] = -100
    tokens, labels = tokens.to(dev), labels.to(dev)

    def step():
        loss = compiled(tokens, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    warmup = min(a.warmup, a.steps - 1)
    t0 = time.perf_counter()
    losses = [step() for _ in range(warmup)]
    if cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    dist.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    hwm_reset = not cuda and _reset_hwm()
    t0 = time.perf_counter()
    for _ in range(a.steps - warmup):
        losses.append(step())
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / (a.steps - warmup)
    if cuda:
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    elif hwm_reset:
        peak_gb = _read_status_kb("VmHWM") / 2**20
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    mine = dict(rank=rank, peak_gb=peak_gb, step_s=step_s, warmup_s=warmup_s,
                losses=torch.stack(losses).float().cpu().tolist(),
                rewrites=int(counters["inductor_lce"]["rewrites"]),
                counters={k: int(v) for k, v in counters["inductor_lce"].items()},
                graphs=int(counters["stats"]["unique_graphs"]), graph_breaks=sum(counters["graph_break"].values()),
                device=torch.cuda.get_device_name(dev) if cuda else "cpu")
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank != 0:
        return None
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    max_step_s = max(r["step_s"] for r in ranks)
    return dict(strategy=a.strategy, variant=a.variant, layout=a.layout, world=world, device=ranks[0]["device"],
                backend=dist.get_backend(), params=params, vocab=vocab, batch=a.batch, seq=a.seq, steps=a.steps,
                warmup=warmup, lr=a.lr, tiny=a.tiny, torch=torch.__version__, triton=triton_version,
                tokens_per_s=world * a.batch * a.seq / max_step_s, step_ms=max_step_s * 1e3, ranks=ranks)


# ----------------------------------------------------------------------------- parent: all configurations
def child_args(a):
    out = ["--device", a.device, "--layout", a.layout, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--batch", str(a.batch), "--seq", str(a.seq), "--lr", str(a.lr), "--bucket-cap-mb", str(a.bucket_cap_mb)]
    return out + (["--tiny"] if a.tiny else [])


def run_config(a, strategy, variant):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           os.path.abspath(__file__), "--strategy", strategy, "--variant", variant, *child_args(a)]
    env = dict(os.environ, **CHILD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    if a.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // a.nproc))
    print(f"# {strategy} {variant} ({a.layout}): {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)
        with open(os.path.join(a.log_dir, f"e2e_distributed_{strategy}_{variant}_{a.layout}.log"), "w") as f:
            f.write(" ".join(cmd) + "\n" + p.stdout + "\n--- stderr\n" + p.stderr)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        print(p.stdout[-3000:], p.stderr[-8000:], file=sys.stderr)
        raise SystemExit(f"{strategy} {variant} failed (rc {p.returncode})")
    if p.returncode:  # every rank trained and rank 0 reported: a crash in the teardown after it
        print(f"# warning: {strategy} {variant}: torchrun exited {p.returncode} after the result was printed:\n"
              + p.stderr[-2000:], file=sys.stderr)
    res = json.loads(line[0][len("RESULT "):])
    res["wall_s"], res["rc"] = wall, p.returncode
    print(f"#   {wall:.0f} s, {res['tokens_per_s']:.0f} tokens/s, rewrites "
          f"{[r['rewrites'] for r in res['ranks']]}", file=sys.stderr, flush=True)
    return res


def _mean_loss(res, i):
    return sum(r["losses"][i] for r in res["ranks"]) / len(res["ranks"])


def note(res):
    """Why an lce configuration rewrote nothing on some rank: its skip counters, or that none was counted."""
    if res["variant"] == "plain" or all(r["rewrites"] >= 1 for r in res["ranks"]):
        return ""
    why = {}  # reason -> ranks
    for r in res["ranks"]:
        if r["rewrites"] >= 1:
            continue
        skips = {k: v for k, v in r["counters"].items() if k.startswith("skip")}
        reason = (", ".join(f"counters['inductor_lce']['{k}'] = {v}" for k, v in skips.items()) if skips else
                  "counters['inductor_lce'] empty: no cross-entropy reached Inductor")
        why.setdefault(reason, []).append(str(r["rank"]))
    out = "; ".join(f"no rewrite on rank {', '.join(ranks)}: {reason}" for reason, ranks in why.items())
    if res["strategy"] == "fsdp2" and res["layout"] == "flat" and "empty" in out:
        out += (" (expected for this layout: FSDP2's disabled hooks break the graph inside the loop over the blocks, "
                "so Dynamo skips the frame holding the head and the loss; see --layout body)")
    return out


def table(results, tol):
    """Markdown table; max |loss diff| is against the plain run of the same strategy and layout, per rank and
    step. Also returns the list of problems (lce without rewrites, plain with some, diff over tol)."""
    plain = {(r["strategy"], r["layout"]): r for r in results if r["variant"] == "plain"}
    steps = results[0]["steps"]
    at = sorted({1, max(1, steps // 2), steps})
    hdr = ("| strategy | layout | variant | peak GB per rank | tokens/s (global) | step ms | warm-up s | "
           "rewrites per rank | " + " | ".join(f"loss step {s}" for s in at) + " | max abs loss diff vs plain | notes |\n"
           + "|---" * (10 + len(at)) + "|\n")
    rows, problems = [], []
    for r in results:
        ref = plain.get((r["strategy"], r["layout"]))
        diff = None
        if ref is not None and r is not ref:
            diff = max(abs(x - y) for mine, theirs in zip(r["ranks"], ref["ranks"])
                       for x, y in zip(mine["losses"], theirs["losses"]))
        rewrites = [x["rewrites"] for x in r["ranks"]]
        name = f"{r['strategy']} {r['variant']} ({r['layout']})"
        if r["variant"] == "plain" and any(rewrites):
            problems.append(f"{name}: rewrites {rewrites} without the pass")
        if r["variant"] != "plain" and not all(x >= 1 for x in rewrites):
            problems.append(f"{name}: rewrites {rewrites}: {note(r)}")
        if diff is not None and diff > tol:
            problems.append(f"{name}: loss differs from plain by {diff:.3g} > {tol:g}")
        rows.append(f"| {r['strategy']} | {r['layout']} | {r['variant']} | "
                    + " / ".join(f"{x['peak_gb']:.2f}" for x in r["ranks"])
                    + f" | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | {max(x['warmup_s'] for x in r['ranks']):.0f} | "
                    + f"{' / '.join(map(str, rewrites))} | "
                    + " | ".join(f"{_mean_loss(r, s - 1):.4f}" for s in at)
                    + f" | {'' if diff is None else f'{diff:.2e}'} | {note(r)} |\n")
    return hdr + "".join(rows), problems


def section(results, tol):
    r0 = results[0]
    cpu = r0["device"] == "cpu"
    size = ("tiny model (vocab {vocab}, dim {dim}, {layers} layers)".format(**TINY) if r0["tiny"]
            else "e2e_llama's Llama (vocabulary 128256, dim 2048, 8 layers)")
    body, problems = table(results, tol)
    precision = ("fp32 (FSDP2: fully_shard per block and root, MixedPrecisionPolicy fp32)" if cpu else
                 "DDP: bf16 parameters (as e2e_llama); FSDP2: fully_shard per block and root, "
                 "MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)")
    text = (f"\n## {datetime.date.today()} end to end, data parallel ({r0['world']} ranks, {r0['backend']}): "
            f"{r0['device']}, torch {r0['torch']}, triton {r0['triton']}\n\n"
            f"`bench/e2e_distributed.py`: {size}, {r0['params'] / 1e6:,.1f}M parameters, batch {r0['batch']} x "
            f"sequence {r0['seq']} per rank ({IGNORED:.0%} of the labels ignored), AdamW lr {r0['lr']:g}; "
            f"{precision}. {r0['steps']} steps, the first "
            f"{r0['warmup']} untimed (compile); peak = "
            f"{'process peak RSS' if cpu else 'torch.cuda.max_memory_allocated'} over the timed steps, per rank; "
            f"tokens/s over all ranks (slowest rank's step time); warm-up s: the slowest rank's untimed steps; losses are the mean of the ranks' losses; "
            f"max abs loss diff over every rank and step against plain compile of the same strategy and layout. "
            f"Layout `flat`: e2e_llama.Llama as is (blocks looped over next to the loss); `body`: the same "
            f"parameters with the body in a submodule.\n\n" + body)
    if problems:
        text += "\n" + "".join(f"* {p}\n" for p in problems)
    return text, problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="run every strategy x variant, each in its own torchrun")
    ap.add_argument("--strategy", choices=["ddp", "fsdp2"])
    ap.add_argument("--variant", choices=["plain", "lce", "lce_lean"])
    ap.add_argument("--strategies", default="ddp,fsdp2")
    ap.add_argument("--variants", default="plain,lce")
    ap.add_argument("--layout", choices=["flat", "body"], default="flat")
    ap.add_argument("--layouts", default=None, help="with --all: e.g. flat,body (default: --layout)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help=f"{TINY}, seq 64, batch 2")
    ap.add_argument("--steps", type=int, default=20, help="steps in all, warm-up included")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help="per rank (default 1, tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="default 4096, tiny 64")
    ap.add_argument("--lr", type=float, default=None, help="AdamW (default 1e-5 as e2e_llama, tiny 1e-3)")
    ap.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--tol", type=float, default=None, help="max abs loss diff allowed (default: cpu 1e-4, cuda 2e-2)")
    ap.add_argument("--check", action="store_true", help="exit 1 on a problem listed under the table")
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    ap.add_argument("--log-dir", default=None, help="each configuration's full output")
    ap.add_argument("--jsonl", default=None, help="append each configuration's result to this file")
    ap.add_argument("--table-from", default=None, help="no runs: the table of the results in this jsonl file "
                                                       "(the last of each configuration)")
    a = ap.parse_args()
    a.batch = a.batch or (2 if a.tiny else 1)
    a.seq = a.seq or (64 if a.tiny else 4096)
    a.lr = a.lr if a.lr is not None else (1e-3 if a.tiny else 1e-5)
    tol = a.tol if a.tol is not None else (1e-4 if a.device == "cpu" else 2e-2)

    if a.strategy and a.variant and not a.all:  # inside torchrun
        res = run_rank(a)
        if res is not None:
            print("RESULT " + json.dumps(res), flush=True)
        return 0
    if a.table_from:
        last = {}
        with open(a.table_from) as f:
            for ln in f:
                if ln.strip():
                    r = json.loads(ln)
                    last[(r["strategy"], r["layout"], r["variant"])] = r
        results = list(last.values())
    elif a.all:
        t0 = time.time()
        results = []
        for layout in (a.layouts or a.layout).split(","):
            a.layout = layout
            for s in a.strategies.split(","):
                for v in a.variants.split(","):
                    results.append(run_config(a, s, v))
                    if a.jsonl:
                        with open(a.jsonl, "a") as f:
                            f.write(json.dumps(results[-1]) + "\n")
        print(f"# all configurations: {time.time() - t0:.0f} s", file=sys.stderr)
    else:
        ap.error("give --all, --table-from FILE, or --strategy and --variant (under torchrun)")
    text, problems = section(results, tol)
    print(text)
    if a.write:
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write(text)
    return 1 if (a.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
