"""The Inductor graph pass: find linear -> float() -> cross-entropy and rewrite it.

  driver.py   ``LinearCrossEntropyPass``: runs the steps below per site, counts every decision
  match.py    find the sites, check each one (via ``patterns/``), choose its algorithm; never mutates
  rewrite.py  emit the ``inductor_lce::`` ops in place of an accepted site (snapshot / restore around it)
  skips.py    the skip reasons and their hints (README, "Current limits")
  patterns/   the matchers, one file per family

Nothing here imports a kernel or the lowering: the op to emit per device is ``inductor_lce.ops.ops_for``.

One structural matcher serves every slot.  It starts at each log-softmax over the
classes (a cross-entropy *site*), then checks, without touching the graph:

  logits    the path up to the lm-head matmul, soft-cap included  (patterns/logits.py, softcap.py)
  nll       the per-token loss, masked by ignore_index     (patterns/nll.py)
  extras    a class sum of the log-probs (label smoothing)  (patterns/label_smoothing.py)
            and logsumexps of the logits (z-loss)           (patterns/logsumexp.py)
  backward  when the graph is a joint graph: the log-softmax and nll backward and
            the gradient matmuls of hidden / weight / bias  (patterns/log_softmax.py, ...)
  users     no node of the region (logits, log-probs, their gradients) is read by
            anything outside it

and only then rewrites, with one of two algorithms chosen per site (``choose_algorithm``):

  three_gemm  every scored token gets the same incoming gradient (mean, sum, sum / num_items:
              patterns/uniform_grad.py) and no z-loss / label smoothing reads the lse: ``lce_fused``
              computes the loss and the gradients in the forward (scaled by the forward factor of
              that gradient); the backward multiplies them by the loss's incoming gradient.
  recompute   otherwise, or with ``lean=True``: the per-token loss, the class sum and the logsumexps
              become ``lce_forward``'s outputs (loss, sum_logits - V * lse, lse) and the gradient
              matmuls ``lce_backward``'s outputs (four GEMMs, ~64 MB of workspace).

Either way everything [N, V] dies.
The user's reduction (mean / sum / none, whatever scaling of the incoming
gradient) is left exactly as the graph computes it.  A site that fails a check is
left alone and counted in ``counters["inductor_lce"]["skip_<reason>"]``.
"""
from .driver import LinearCrossEntropyPass

__all__ = ["LinearCrossEntropyPass"]
