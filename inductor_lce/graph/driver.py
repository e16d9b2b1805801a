"""The pass driver: ``LinearCrossEntropyPass``, the Inductor graph pass, and the counting of its decisions.

For each site of a graph: ``match.analyze`` and ``match.choose_algorithm`` (no mutation), then
``rewrite.rewrite`` on a snapshot-guarded graph; every decision is counted in ``counters["inductor_lce"]``
(and replayed from the compile caches) and kept in ``REPORT`` for ``explain``.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import warnings
from typing import Optional

from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph

from .. import ops  # noqa: F401  (registers torch.ops.inductor_lce)
from . import skips
from .match import Site, _fmt_shape, _op_name, analyze, choose_algorithm, describe, find_sites, humanize, source
from .patterns.common import NoMatch
from .rewrite import _erase_dead, _fake_mode, _restore, _snapshot, rewrite

log = logging.getLogger("inductor_lce")

# the package's root (inductor_lce/; this file is inductor_lce/graph/driver.py): uuid() hashes every .py under it
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_files() -> tuple:
    files = []
    for root, _, names in os.walk(_PACKAGE_DIR):
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    return tuple(sorted(files))


def graph_kind(graph: Graph) -> str:
    """'joint', 'forward' / 'backward' (a partitioned training graph) or 'inference',
    from AOTAutograd's placeholder names (primals_*, tangents_*)."""
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    primals = any(n.startswith("primals") for n in names)
    tangents = any(n.startswith("tangents") for n in names)
    if primals and tangents:
        return "joint"
    if primals:
        return "forward"
    if tangents:
        return "backward"
    return "inference"


# --------------------------------------------------------------------------- counting and the report
#
# Every decision on a site is an *entry*: a dict with decision ("rewritten" / "skipped"), reason, algorithm,
# detail, where / code (the user's line), shape (the logits') and graph (its kind). Counting an entry adds
# one to ``counters["inductor"]["inductor_lce {entry as JSON}"]`` and applies it: counters["inductor_lce"]
# (rewrites, algorithm_*, skip_*), REPORT (for explain) and, for a replayed one, the log.
#
# Why counters["inductor"]: while Inductor compiles an FX graph, it records what the compile added to
# counters["inductor"] in the compiled artifact (CompiledFxGraph.counter_deltas) and adds it again whenever the
# FX graph cache serves that graph, from disk or memory; the AOTAutograd cache loads its graphs through the same
# path (FxGraphCache.cache_hit_post_compile). So an entry counted during that compile, i.e. from the post-grad
# slot, comes back with every cache hit. The joint-graph slot runs earlier, in AOTAutograd: its entries wait in
# _PENDING until the post-grad instance that options() / install() / the backend put behind it counts them while
# Inductor compiles the forward (or inference) graph. Without such an instance they are counted at once (and not
# replayed on hits). When the FX graph cache serves that forward graph instead (AOTAutograd cache off or missed),
# the hit replays the entries of the first compile and the waiting ones are dropped; entries nobody counted for
# another reason (the graph compiled in a subprocess, a failed compile) are counted at the end (``_settle``).
# ``sync()`` applies the entries a cache hit replayed (what counters["inductor"] holds beyond what was applied);
# it runs at the end of every Dynamo compile (torch._dynamo.callback) and from explain(). torch._dynamo.reset()
# clears Dynamo's callbacks, so uuid(), which Inductor calls for its cache keys on every compile, hit or miss,
# registers it again. Nothing here changes a graph or a cache key. Checked with torch 2.11 and 2.13; where a torch
# lacks the callbacks, replayed entries are applied at the next compile or explain().

_KEY = "inductor_lce "
_JUDGED = "inductor_lce_judged"     # node.meta mark on a skipped site's log-softmax: judged once, counted once

# Every decision on a site, for ``inductor_lce.explain``: entries plus site, hint and cached (replayed by a cache hit).
REPORT: list = []
_PENDING: list = []                 # (compile id, FX graph cache hits then, entry): joint-slot decisions to count
_applied = {"counter": None, "seen": collections.Counter()}
_warned_post_grad_training = False


def _compile_id() -> Optional[str]:
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # no compile context (the pass called by hand), or an older API
        return None
    return None if cid is None else str(cid)


def _entry(site: Site, kind: str, decision: str, reason: str, detail: str = "", algorithm: str = "") -> dict:
    where, code = source(site.log_softmax.output)
    return dict(decision=decision, reason=reason, algorithm=algorithm, detail=detail, where=where, code=code,
                shape=_fmt_shape(site.log_softmax.input), graph=kind)


def _count(entry: dict) -> None:
    """Count ``entry`` now; inside Inductor's compile of a graph this also records it for cache hits."""
    sync()
    key = _KEY + json.dumps(entry, sort_keys=True)
    counters["inductor"][key] += 1
    _applied["seen"][key] += 1
    _apply(entry, cached=False)


def _apply(entry: dict, cached: bool) -> None:
    lce = counters["inductor_lce"]
    if entry["decision"] == "rewritten":
        lce["rewrites"] += 1
        lce[f"algorithm_{entry['algorithm']}"] += 1
    else:
        lce[f"skip_{entry['reason']}"] += 1
    REPORT.append(dict(entry, site=entry["where"] or f"logits {entry['shape']}", cached=cached,
                       hint=skips.hint(entry["reason"]) if entry["decision"] == "skipped" else ""))
    if cached:
        log.info("inductor_lce: from the compile cache: cross-entropy at %s %s (%s%s)", entry["where"] or "?",
                 entry["decision"], entry["reason"], f": {entry['detail']}" if entry["detail"] else "")


def sync() -> None:
    """Apply the entries that compile-cache hits replayed into counters["inductor"] since the last call."""
    # counters.clear() replaces counters["inductor_lce"] (and empties counters["inductor"]): start over then.
    # (counters["inductor"] itself is no such sign: Inductor swaps it for a copy of itself at times.)
    lce = counters["inductor_lce"]
    if _applied["counter"] is not lce:
        _applied["counter"], _applied["seen"] = lce, collections.Counter()
    seen = _applied["seen"]
    for key, n in list(counters["inductor"].items()):
        if not (isinstance(key, str) and key.startswith(_KEY)):
            continue
        if n < seen[key]:  # counters["inductor"] alone was cleared
            seen[key] = n
        if n > seen[key]:
            entry = json.loads(key[len(_KEY):])
            for _ in range(n - seen[key]):
                _apply(entry, cached=True)
            seen[key] = n


def _fx_cache_hits() -> int:
    return counters["inductor"]["fxgraph_cache_hit"]


def _flush_pending() -> None:
    """In the post-grad slot (Inductor is compiling this graph): count what the joint slot decided in this
    compile; older entries are settled."""
    cid = _compile_id()
    pending, _PENDING[:] = list(_PENDING), []
    for item in pending:
        if item[0] == cid:
            _count(item[2])
        else:
            _settle([item])


def _settle(pending: list) -> None:
    """Joint-slot decisions no post-grad slot counted: when the FX graph cache served a graph since, it
    replayed them (sync() applies them); otherwise (the graph compiled elsewhere, or the compile failed)
    count them now."""
    for _, hits, entry in pending:
        if _fx_cache_hits() == hits:
            _count(entry)


def _on_compile_end(*args) -> None:
    try:
        sync()
        pending, _PENDING[:] = list(_PENDING), []
        _settle(pending)
    except Exception as e:  # counting must never break a compile
        log.warning("inductor_lce: counting the compile's cross-entropy sites failed: %r", e, exc_info=True)


_callback_registered_once = False


def _ensure_end_callback() -> None:
    """Register _on_compile_end with Dynamo's end-of-compile callbacks (again after torch._dynamo.reset())."""
    global _callback_registered_once
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return
    register = getattr(callback_handler, "register_end_callback", None)
    if register is None:
        return
    registered = getattr(callback_handler, "end_callbacks", None)
    if registered is None:  # cannot see the list: register once
        if not _callback_registered_once:
            register(_on_compile_end)
            _callback_registered_once = True
        return
    if _on_compile_end not in registered:
        register(_on_compile_end)


def _holds(slot_value, predicate) -> bool:
    """Whether a config slot's value (a pass, a list of passes, a ChainedPass) holds a pass matching ``predicate``."""
    if slot_value is None:
        return False
    if isinstance(slot_value, (list, tuple)):
        return any(_holds(p, predicate) for p in slot_value)
    if predicate(slot_value):
        return True
    inner = getattr(slot_value, "passes", None)
    return isinstance(inner, (list, tuple)) and _holds(inner, predicate)


def _post_grad_counts() -> bool:
    """Whether an instance of the pass is in the post-grad slot (it counts what the joint slot decided)."""
    import torch._inductor.config as inductor_config

    return _holds(getattr(inductor_config, "post_grad_custom_pre_pass", None),
                  lambda p: isinstance(p, LinearCrossEntropyPass))


# --------------------------------------------------------------------------- the pass

class LinearCrossEntropyPass(CustomGraphPass):
    """Rewrite ``cross_entropy(linear(h, W).float(), labels)`` into the fused ops.

    Put it in ``joint_custom_pre_pass`` for training (that is where the [N, V] logits can
    still be kept out of what the forward saves) and in ``post_grad_custom_pre_pass`` for
    inference graphs; ``inductor_lce.options()`` does both.
    """

    def __init__(self, *, report_training_graphs: bool = True, low_precision_logits: bool = False,
                 lean: bool = False):
        # options() puts a second instance in the post-grad slot behind the joint one; that
        # one stays quiet on training graphs, whose sites the joint pass already judged.
        self.report_training_graphs = report_training_graphs
        # also rewrite a loss on bf16/fp16 logits (no .float(), nanoGPT): the fused loss is then
        # computed in fp32 and more accurate than eager's, so not bit-equal to it (opt-in)
        self.low_precision_logits = low_precision_logits
        # never take the three-GEMM algorithm: ~64 MB of workspace instead of up to ~49% of one
        # low-precision [N, V] logits tensor, for ~1.3-1.7x the default's time (README: choosing the algorithm)
        self.lean = lean

    def _slot(self, kind: str) -> Optional[str]:
        """'joint' or 'post_grad': which config slot this call comes from; None when unknown (called by
        hand, or the same instance in both slots on an inference graph)."""
        if kind == "joint":
            return "joint"
        if kind in ("forward", "backward"):
            return "post_grad"
        import torch._inductor.config as inductor_config

        in_joint = _holds(getattr(inductor_config, "joint_custom_pre_pass", None), lambda p: p is self)
        in_post = _holds(getattr(inductor_config, "post_grad_custom_pre_pass", None), lambda p: p is self)
        if in_joint != in_post:
            return "joint" if in_joint else "post_grad"
        return None

    def __call__(self, graph: Graph) -> None:
        _ensure_end_callback()
        kind = graph_kind(graph)
        slot = self._slot(kind)
        if slot == "post_grad" and kind != "backward":
            _flush_pending()
        elif slot == "joint":
            pending, _PENDING[:] = list(_PENDING), []
            _settle(pending)  # from an earlier compile (no Dynamo end-of-compile callback settled it)
        # a site the joint slot skipped is seen again by the post-grad slot (inference graphs): judged once
        sites = [s for s in find_sites(graph) if not s.log_softmax.output.meta.get(_JUDGED)]
        if not sites:
            return
        if kind == "backward":
            return  # what looks like a site here is the forward's recomputation; counted there
        defer = slot == "joint" and _post_grad_counts()
        if kind == "forward":
            # Post-grad slot on a training graph: the forward already saves the logits.
            if not self.report_training_graphs:
                return
            for site in sites:
                self._skip(site, kind, defer, "post_grad_training", "the forward already saves the logits for backward")
            return
        fake_mode = _fake_mode(graph)
        for site in sites:
            try:
                choose_algorithm(analyze(site, self.low_precision_logits), self.lean)
            except NoMatch as e:
                self._skip(site, kind, defer, e.reason, self._detail(site, e))
                continue
            except Exception as e:  # a bug in a matcher must never break compilation
                log.warning("inductor_lce: matcher failed on the cross-entropy %s: %r", site.name, e, exc_info=True)
                self._skip(site, kind, defer, "matcher_error", repr(e))
                continue
            snapshot = _snapshot(graph)
            try:
                rewrite(graph, site, fake_mode)
                _erase_dead(graph, site)
            except NoMatch as e:
                detail = self._detail(site, e)
                _restore(graph, snapshot)
                self._skip(site, kind, defer, e.reason, detail, mark=False)
                return  # nodes of later sites belong to the discarded graph
            except Exception as e:
                _restore(graph, snapshot)
                log.warning("inductor_lce: rewrite failed on the cross-entropy %s, graph left as it was: %r",
                            site.name, e, exc_info=True)
                self._skip(site, kind, defer, "rewrite_error", repr(e), mark=False)
                # nodes of later sites belong to the discarded graph: stop here
                return
            how = ("forward+backward" if site.backward else "forward") + f", {site.algorithm}"
            self._decide(_entry(site, kind, "rewritten", how, site.why, site.algorithm), defer)
            log.info("inductor_lce: rewrote the cross-entropy %s (%s: %s)", site.name, how, site.why)

    @staticmethod
    def _detail(site: Site, e: NoMatch) -> str:
        """The matcher's message in the user's terms (shapes and source lines instead of node names)."""
        if e.reason == "logits_path_op" and e.node is not None:  # the op the matcher's walk stopped at
            return f"{_op_name(e.node)} between the lm-head matmul and the loss ({describe(e.node, site)})"
        return humanize(e.detail, site.log_softmax.output.graph, site)

    @staticmethod
    def _decide(entry: dict, defer: bool) -> None:
        if defer:
            _PENDING.append((_compile_id(), _fx_cache_hits(), entry))
        else:
            _count(entry)

    def _skip(self, site: Site, kind: str, defer: bool, reason: str, detail: str = "", mark: bool = True) -> None:
        global _warned_post_grad_training
        if mark:
            site.log_softmax.output.meta[_JUDGED] = True
        self._decide(_entry(site, kind, "skipped", reason, detail), defer)
        log.info("inductor_lce: the cross-entropy %s not rewritten: %s%s; %s", site.name, reason,
                 f" ({detail})" if detail else "", skips.hint(reason))
        if reason == "post_grad_training" and not _warned_post_grad_training:
            _warned_post_grad_training = True
            warnings.warn(
                "inductor_lce: the post-grad pass saw a training graph whose forward already saves the "
                "[N, V] logits for backward; rewriting it there saves nothing. Compile with "
                "torch.compile(model, options=inductor_lce.options()) (the joint-graph slot) to save "
                "training memory.",
                stacklevel=2,
            )

    def uuid(self) -> str:
        # The cache key is the real one (the package's sources and the flags). Inductor calls this on every
        # compile, cache hit or not, so it also (re)registers the end-of-compile sync of replayed counts
        # (and applies what earlier hits replayed, for a torch without Dynamo's callbacks).
        try:
            _ensure_end_callback()
            sync()  # not _on_compile_end: the joint slot's decisions still wait for the forward graph's compile
        except Exception as e:  # counting must never break a compile
            log.warning("inductor_lce: counting cross-entropy sites from the compile cache failed: %r", e,
                        exc_info=True)
        flags = f"{int(self.report_training_graphs)}{int(self.low_precision_logits)}{int(self.lean)}"
        return f"{get_hash_for_files(_source_files()).hex()}-{flags}"
