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
Times are kept per size (multiples of a unit, 64 rows), independent of N, so that a run whose token count changes
from step to step times each size once.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


def round_up(rows: int, unit: int) -> int:
    return -(-rows // unit) * unit


def whole_step(max_rows: int, unit: int, most: int = 96) -> int:
    """The grid of whole chunk sizes: ``unit`` times a power of two, so that at most ~``most`` sizes lie in
    [max_rows / 4, max_rows] and the grids of different token counts nest (their times are shared)."""
    step = unit
    while max_rows // step > most:
        step *= 2
    return step


def candidate_sizes(n_rows: int, max_rows: int, step: int, unit: int) -> list[int]:
    """The sizes whose times ``chunk_sizes`` needs (every one a multiple of ``unit``): whole chunks, multiples of
    ``step`` in [max_rows / 4, max_rows], and the possible last chunks n_rows - m * step in (0, max_rows], each timed
    at its size rounded up to ``unit`` (max_rows is a multiple of it)."""
    last = (n_rows - m * step for m in range(max(0, (n_rows - max_rows) // step), n_rows // step + 1))
    return sorted(set(_whole(max_rows, step)) | {round_up(r, unit) for r in last if 0 < r <= max_rows})


def _whole(max_rows: int, step: int) -> range:
    """The sizes of the chunks before the last: multiples of ``step`` in [max_rows / 4, max_rows]."""
    return range(max(step, max_rows // 4 // step * step), max_rows + 1, step)


def chunk_sizes(n_rows: int, n_chunks: int, max_rows: int, step: int, cost: Callable[[int], float],
                fallback: Iterable[int]) -> list[int]:
    """``n_chunks`` sizes summing to ``n_rows``, each <= ``max_rows``, the first n_chunks - 1 multiples of ``step``
    of at least max_rows / 4 and the last the rest, with the least sum of ``cost(size)`` (dynamic programming over
    the rows covered), largest first; ``fallback`` (the even split) when it is no worse or nothing fits."""
    fallback = list(fallback)
    whole = _whole(max_rows, step)
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}       # rows covered -> (cost, sizes)
    for _ in range(n_chunks - 1):
        grown: dict[int, tuple[float, list[int]]] = {}
        for covered, (t, sizes) in best.items():
            for c in whole:
                rows, t_c = covered + c, t + cost(c)
                if rows < n_rows and (rows not in grown or t_c < grown[rows][0]):
                    grown[rows] = (t_c, sizes + [c])
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
