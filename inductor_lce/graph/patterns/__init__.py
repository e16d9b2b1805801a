"""What the pass matches, one file per family.

* ``logits.py``       — the path from the lm-head matmul to the fp32 logits (views, ``.float()``,
                         the causal-shift slice) and its mirror image in the backward.
* ``log_softmax.py``  — log-softmax over the classes, decomposed or not, forward and backward.
* ``nll.py``          — negative log-likelihood with ``ignore_index`` (the per-token loss before
                         reduction) and its backward (``-onehot(target) * grad``).

Each matcher is a plain function that takes an FX node and returns a small record of the
nodes it matched, or raises ``NoMatch`` with a reason; it never mutates the graph.
"""
from .common import NoMatch

__all__ = ["NoMatch"]
