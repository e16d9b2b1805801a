"""The fused op's chunk sizes: as many chunks as the workspace needs, sized where cuBLAS runs fastest.

Per chunk of c token rows the three-GEMM op runs two cuBLAS matmuls whose rate depends on c, and one
grad_weight accumulation that reads and writes the [V, D] state once whatever c is:

    logits [c, V] = h[rows] @ W.T                 # K = D
    grad_hidden[rows] [c, D] = grad_logits @ W    # K = V

So the chunk count is fixed (the fewest whose largest chunk fits the workspace: every extra chunk is one more
pass over the state) and only the sizes are free. cuBLAS's tiles and waves make its time per row jump with c:
at 8192 x 4096 x 128256 the two matmuls take 3.38 ms per 1000 rows at c = 1664 (the even split into 5 chunks)
and 3.04 at c = 1536 (bench/NOTES.md 8.18). ``chunk_sizes`` picks, from measured times per size, the k sizes of at
most ``max_rows`` rows that sum to N with the least total time; ``time_chunk_matmuls`` measures them on the GPU.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


def candidate_sizes(n_rows: int, max_rows: int, step: int) -> list[int]:
    """Sizes ``chunk_sizes`` may ask the cost of: multiples of ``step`` in [max_rows / 4, max_rows], and the
    possible last chunks n_rows - m * step in (0, max_rows]."""
    whole = range(max(step, max_rows // 4 // step * step), max_rows + 1, step)
    last = (n_rows - m * step for m in range(max(0, (n_rows - max_rows) // step), n_rows // step + 1))
    return sorted(set(whole) | {r for r in last if 0 < r <= max_rows})


def chunk_sizes(n_rows: int, n_chunks: int, max_rows: int, step: int, cost: Callable[[int], float],
                fallback: Iterable[int]) -> list[int]:
    """``n_chunks`` sizes summing to ``n_rows``, each <= ``max_rows``, the first n_chunks - 1 multiples of ``step``
    of at least max_rows / 4 and the last the rest, with the least sum of ``cost(size)`` (dynamic programming over
    the rows covered), largest first; ``fallback`` (the even split) when it is no worse or nothing fits."""
    fallback = list(fallback)
    whole = [c for c in candidate_sizes(n_rows, max_rows, step) if c % step == 0 and 4 * c >= max_rows]
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}       # rows covered -> (cost, sizes)
    for _ in range(n_chunks - 1):
        grown: dict[int, tuple[float, list[int]]] = {}
        for covered, (t, sizes) in best.items():
            for c in whole:
                rows = covered + c
                if rows < n_rows and (rows not in grown or t + cost(c) < grown[rows][0]):
                    grown[rows] = (t + cost(c), sizes + [c])
        best = grown
    options = [(t + cost(n_rows - covered), sizes + [n_rows - covered]) for covered, (t, sizes) in best.items()
               if 0 < n_rows - covered <= max_rows]
    fallback_cost = sum(cost(c) for c in fallback)
    if not options or min(options)[0] >= fallback_cost:
        return fallback
    return sorted(min(options)[1], reverse=True)


def time_chunk_matmuls(hidden: Tensor, weight: Tensor, logits: Tensor, grad_hidden: Tensor, sizes: Iterable[int],
                       reps: int = 2) -> dict[int, float]:
    """GPU milliseconds of one chunk's two matmuls (logits, then grad_hidden) for each size: the least of ``reps``
    timed runs after one warm-up, by CUDA events, one host sync in all. ``logits`` [>= max size, V] (a view of the
    chunk buffer) and ``grad_hidden`` are overwritten: call before the chunk loop writes them."""
    runs = []
    for c in sizes:
        out, gh = logits[:c], grad_hidden[:c]
        events = []
        for rep in range(reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(hidden[:c], weight.t(), out=out)
            torch.mm(out, weight, out=gh)
            end.record()
            if rep:   # (the first run is the warm-up)
                events.append((start, end))
        runs.append((c, events))
    torch.cuda.synchronize()
    return {c: min(s.elapsed_time(e) for s, e in events) for c, events in runs}
