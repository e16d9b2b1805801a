"""How users turn the pass on: ``options()``, ``install()`` / ``uninstall()``."""
from __future__ import annotations

from typing import Any, Optional

import torch._inductor.config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from .graph import LinearCrossEntropyPass

# The joint graph is where training memory is saved; the post-grad slot catches inference
# graphs that reach Inductor without a joint pass (and explains itself on training graphs).
SLOTS = ("joint_custom_pre_pass", "post_grad_custom_pre_pass")


def options(*, low_precision_logits: bool = False, lean: bool = False) -> dict:
    """``torch.compile(model, options=inductor_lce.options())``.

    ``lean=True`` always takes the recompute algorithm (four GEMMs, about 64 MB above the gradients);
    by default a site whose tokens all get the same incoming gradient (mean, sum, sum / num_items)
    takes the three-GEMM algorithm: a workspace of at most ~49% of one low-precision [N, V] logits tensor,
    1.04-1.18x plain ``torch.compile``'s time on the H100 (README, "Choosing the algorithm").

    ``low_precision_logits=True`` also rewrites a cross-entropy read straight off bf16/fp16
    logits (no ``.float()``, as nanoGPT writes it). The fused loss is computed in fp32 there:
    more accurate than eager's, which rounds the log-probs to bf16, so not bit-equal to it."""
    return {
        "joint_custom_pre_pass": LinearCrossEntropyPass(low_precision_logits=low_precision_logits, lean=lean),
        "post_grad_custom_pre_pass": LinearCrossEntropyPass(report_training_graphs=False,
                                                            low_precision_logits=low_precision_logits, lean=lean),
    }


class ChainedPass(CustomGraphPass):
    """Runs the user's pass(es) of a slot, then ours. Its uuid combines both; a user pass
    without a uuid (a plain callable) makes it None, which disables caching as Inductor
    would for that callable alone."""

    def __init__(self, *passes):
        self.passes = passes

    def __call__(self, graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Optional[Any]:
        ids = []
        for p in self.passes:
            uuid = getattr(p, "uuid", None)
            if uuid is None:
                return None
            ids.append(uuid())
            if ids[-1] is None:
                return None
        return tuple(ids)


_saved: Optional[dict] = None


def _chain(existing, ours):
    if existing is None:
        return ours
    if isinstance(existing, (list, tuple)):
        return ChainedPass(*existing, ours)
    return ChainedPass(existing, ours)


def install() -> None:
    """Enable the pass for every ``torch.compile`` in this process (Inductor backend),
    after any pass the user already put in those slots. Idempotent."""
    global _saved
    if _saved is not None:
        return
    _saved = {slot: getattr(inductor_config, slot) for slot in SLOTS}
    for slot, ours in options().items():
        setattr(inductor_config, slot, _chain(_saved[slot], ours))


def uninstall() -> None:
    """Restore the config slots exactly as ``install()`` found them."""
    global _saved
    if _saved is None:
        return
    for slot, value in _saved.items():
        setattr(inductor_config, slot, value)
    _saved = None


def is_installed() -> bool:
    return _saved is not None
