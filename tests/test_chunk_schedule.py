"""chunk_schedule.chunk_sizes: the fused op's chunk sizes from timed sizes (pure Python, no kernels)."""
import itertools

import pytest

from inductor_lce.lowering.chunk_schedule import candidate_sizes, chunk_sizes, round_up, whole_step


def _check(sizes, n_rows, n_chunks, max_rows, step):
    assert sum(sizes) == n_rows and len(sizes) == n_chunks, sizes
    assert all(0 < c <= max_rows for c in sizes), sizes
    assert sum(c % step != 0 for c in sizes) <= 1, sizes   # only the rest is off the step


def _brute_force(n_rows, n_chunks, max_rows, step, cost):
    whole = [c for c in range(step, max_rows + 1, step) if 4 * c >= max_rows]
    best = None
    for head in itertools.product(whole, repeat=n_chunks - 1):
        rest = n_rows - sum(head)
        if 0 < rest <= max_rows:
            t = sum(map(cost, head)) + cost(rest)
            best = t if best is None else min(best, t)
    return best


# made-up time per size: a wave-quantized matmul (full waves of 132 tiles of 128 rows x 32 columns) or plain rows
def _waves(c):
    return -(-(-(-c // 128) * 32) // 132) * 1.0 + c * 1e-4


@pytest.mark.parametrize("n_rows,n_chunks,max_rows,step", [(8192, 5, 1920, 64), (4096, 5, 960, 64),
                                                            (16384, 3, 6976, 192), (1000, 3, 384, 64),
                                                            (8191, 5, 1920, 64)])
@pytest.mark.parametrize("cost", [_waves, float], ids=["waves", "linear"])
def test_chunk_sizes_is_the_optimum(n_rows, n_chunks, max_rows, step, cost):
    even_rows = -(-(-(-n_rows // n_chunks)) // 128) * 128
    even = [min(even_rows, n_rows - r0) for r0 in range(0, n_rows, even_rows)]
    sizes = chunk_sizes(n_rows, n_chunks, max_rows, step, cost, even)
    if sizes != even:
        _check(sizes, n_rows, n_chunks, max_rows, step)
    best = min(_brute_force(n_rows, n_chunks, max_rows, step, cost), sum(map(cost, even)))
    assert sum(map(cost, sizes)) == pytest.approx(best, rel=1e-12) and sum(map(cost, sizes)) <= sum(map(cost, even))
    if cost is float:   # time in proportion to rows: nothing beats the even split, which is kept
        assert sizes == even


@pytest.mark.parametrize("n_rows", [8192, 8191, 8000])
def test_chunk_sizes_asks_only_timed_sizes(n_rows):
    """Every size chunk_sizes asks the cost of, rounded up to the unit (64 rows), is one candidate_sizes lists."""
    asked = set()

    def cost(c):
        asked.add(c)
        return _waves(round_up(c, 64))

    even = [1664] * 4 + [n_rows - 4 * 1664]
    chunk_sizes(n_rows, 5, 1920, 64, cost, even)
    timed = set(candidate_sizes(n_rows, 1920, 64, 64)) | {1664, round_up(even[-1], 64)}
    assert {round_up(c, 64) for c in asked} <= timed
    assert 1536 in chunk_sizes(8192, 5, 1920, 64, lambda c: 0.9 * c if c == 1536 else c, [1664] * 4 + [1536])


def test_timed_sizes_are_shared_across_token_counts():
    """A run whose token count changes every step: the grid of whole sizes nests (a power-of-two multiple of the
    unit, at most 96 of them below max_rows), and over 2000 token counts the sizes to time stay a few hundred."""
    for max_rows in range(64, 40000, 64):
        step = whole_step(max_rows, 64)
        assert step % 64 == 0 and (step // 64) & (step // 64 - 1) == 0 and max_rows // step <= 96
    union = set()
    for n_rows in range(6000, 8000):
        max_rows = (n_rows // 4 + 100) // 64 * 64          # (how the plan's bound grows with N)
        sizes = candidate_sizes(n_rows, max_rows, whole_step(max_rows, 64), 64)
        assert all(c % 64 == 0 and 0 < c <= max_rows for c in sizes)
        union.update(sizes)
    assert len(union) <= 2000 // 64 + 96, len(union)


def test_chunk_sizes_falls_back_when_nothing_fits():
    assert chunk_sizes(1000, 2, 400, 64, float, [500, 500]) == [500, 500]   # 2 x 400 < 1000
