"""Counts and the explain report when the compiled code comes from Inductor's caches.

A cache hit skips the pass; what it decided comes back through the counter deltas Inductor stores with
each compiled FX graph (see graph/driver.py, "counting and the report"). These tests turn the caches back
on (conftest turns them off) in a fresh cache directory."""
import contextlib
import json
import os
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

import inductor_lce
from inductor_lce.graph import driver, skips

EXPECTED = {"rewrites": 1, "algorithm_three_gemm": 1, "skip_class_weights": 1}


def two_sites(h, w, y):
    good = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
    weighted = F.cross_entropy(F.linear(h * 2, w).float().flatten(0, 1), y.flatten(),
                               weight=torch.linspace(0.5, 1.5, 33))
    return good + weighted


def _inputs(grad=True):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, 8, generator=g, requires_grad=grad), torch.randn(33, 8, generator=g, requires_grad=grad),
            torch.randint(0, 33, (2, 5), generator=g))


@contextlib.contextmanager
def caches(aot=True):
    with fresh_cache(), torch._inductor.config.patch({"fx_graph_cache": True}), \
            torch._functorch.config.patch({"enable_autograd_cache": aot}):
        yield


def _compile_twice(fn, inputs, backward=True, **options):
    """Compile ``fn`` twice in this process (Dynamo reset in between), counters cleared before each;
    returns [(counters["inductor_lce"], report entries, AOTAutograd cache hits)] per compile."""
    results = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        start = len(driver.REPORT)
        out = torch.compile(fn, options=inductor_lce.options(**options))(*inputs)
        if backward:
            out.backward()
        torch.testing.assert_close(out, fn(*inputs))
        results.append((dict(counters["inductor_lce"]), driver.REPORT[start:],
                        counters["aot_autograd"]["autograd_cache_hit"]))
    return results


def _without_cached(report):
    return [{k: v for k, v in r.items() if k != "cached"} for r in report]


def test_second_compile_in_process_counts_and_reports():
    with caches():
        (cold, cold_report, cold_hits), (warm, warm_report, warm_hits) = _compile_twice(two_sites, _inputs())
    assert (cold_hits, warm_hits) == (0, 1), "the second compile must come from the AOTAutograd cache"
    assert cold == warm == EXPECTED, (cold, warm)
    assert len(cold_report) == 2 and not any(r["cached"] for r in cold_report)
    assert all(r["cached"] for r in warm_report)
    assert _without_cached(warm_report) == _without_cached(cold_report)


def test_second_compile_lean_and_inference_graphs():
    """The recompute pair (lean=True) and an inference graph, whose sites both slots see: counted once."""
    with caches():
        lean = _compile_twice(two_sites, _inputs(), lean=True)
        with torch.no_grad():
            inference = _compile_twice(two_sites, _inputs(grad=False), backward=False)
    for counts, _, _ in lean:
        assert counts == {"rewrites": 1, "algorithm_recompute": 1, "skip_class_weights": 1}, counts
    for counts, report, _ in inference:
        assert counts == {"rewrites": 1, "algorithm_recompute": 1, "skip_class_weights": 1}, counts
        assert [r["graph"] for r in report] == ["inference", "inference"], report
    assert [hits for _, _, hits in lean + inference] == [0, 1, 0, 1]


def test_fx_graph_cache_hit_without_aot_cache_counts_once():
    """AOTAutograd cache off: the joint pass runs again, the forward graph comes from the FX graph cache
    (which replays the entries): each site is counted once, not twice."""
    with caches(aot=False):
        results = _compile_twice(two_sites, _inputs())
        assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    for counts, report, _ in results:
        assert counts == EXPECTED, counts
        assert len(report) == 2


def test_explain_on_a_warm_cache(capsys):
    h, w, y = _inputs()
    with caches():
        cold = inductor_lce.explain(two_sites, h, w, y)
        torch._dynamo.reset()
        # explain runs no backward, so no AOTAutograd cache entry was saved: the FX graph cache serves the forward
        warm_fx = inductor_lce.explain(two_sites, h, w, y)
        assert counters["inductor"]["fxgraph_cache_hit"] >= 1
        torch._dynamo.reset()
        torch.compile(two_sites, options=inductor_lce.options())(h, w, y).backward()  # a training step saves one
        torch._dynamo.reset()
        hits = counters["aot_autograd"]["autograd_cache_hit"]
        warm_aot = inductor_lce.explain(two_sites, h, w, y)
        assert counters["aot_autograd"]["autograd_cache_hit"] == hits + 1
    assert len(cold) == 2 and not any(r["cached"] for r in cold)
    for warm in (warm_fx, warm_aot):
        assert _without_cached(warm) == _without_cached(cold) and all(r["cached"] for r in warm)
    out = capsys.readouterr().out
    assert out.count("1 rewritten, 1 skipped (2 from the compile cache)") == 2, out
    assert out.count(skips.SKIPS["class_weights"].hint) == 3


def test_joint_slot_alone_counts_when_it_runs():
    """A pass only in joint_custom_pre_pass (no post-grad instance to record its decisions): counted at once."""
    compiled = torch.compile(two_sites, options={"joint_custom_pre_pass": inductor_lce.LinearCrossEntropyPass()})
    compiled(*_inputs()).backward()
    assert dict(counters["inductor_lce"]) == EXPECTED


def test_decisions_the_post_grad_slot_did_not_count_are_counted_at_the_end(monkeypatch):
    """As if the forward graph compiled where the waiting decisions cannot be seen (no cache hit either):
    the end of the compile counts them, once."""
    monkeypatch.setattr(driver, "_flush_pending", lambda: None)
    torch.compile(two_sites, options=inductor_lce.options())(*_inputs()).backward()
    assert dict(counters["inductor_lce"]) == EXPECTED
    assert not driver._PENDING


SCRIPT = textwrap.dedent("""
    import json, torch, torch.nn.functional as F
    import inductor_lce
    from torch._dynamo.utils import counters

    def two_sites(h, w, y):
        good = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
        weighted = F.cross_entropy(F.linear(h * 2, w).float().flatten(0, 1), y.flatten(),
                                   weight=torch.linspace(0.5, 1.5, 33))
        return good + weighted

    h = torch.randn(2, 5, 8, requires_grad=True); w = torch.randn(33, 8, requires_grad=True)
    y = torch.randint(0, 33, (2, 5))
    torch.compile(two_sites, options=inductor_lce.options())(h, w, y).backward()
    print("COUNTS", json.dumps(dict(counters["inductor_lce"])))
    print("AOT_HITS", counters["aot_autograd"]["autograd_cache_hit"])
""")


def test_second_process_same_cache_dir(tmp_path):
    """The second run of a script (same TORCHINDUCTOR_CACHE_DIR) counts and explains like the first."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    runs = []
    for cmd in ([str(script)], ["-m", "inductor_lce.explain", str(script)]):
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600, env=env,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stdout.splitlines()
        counts = json.loads(next(l for l in lines if l.startswith("COUNTS "))[len("COUNTS "):])
        hits = int(next(l for l in lines if l.startswith("AOT_HITS "))[len("AOT_HITS "):])
        runs.append((counts, hits, proc.stdout))
    (cold, cold_hits, _), (warm, warm_hits, out) = runs
    assert (cold_hits, warm_hits) == (0, 1), "the second process must hit the AOTAutograd cache"
    assert cold == warm == EXPECTED, (cold, warm)
    assert "2 cross-entropy sites: 1 rewritten, 1 skipped (2 from the compile cache)" in out, out
    assert "train.py:8 in two_sites" in out and skips.SKIPS["class_weights"].hint in out, out
