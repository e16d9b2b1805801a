"""Why the pass leaves a cross-entropy alone: the one table of skip reasons.

Each reason the pass can count as ``counters["inductor_lce"]["skip_<reason>"]`` has a row here:
when it happens (in terms of the user's code) and what to do about it. The pass logs the hint with
the skip, ``inductor_lce.explain`` prints it, and README.md's "Current limits" table is
``markdown_table()`` (tests/test_skips.py checks all three, and that every reason raised in the
package is in this table or in ``NOT_SKIPS``).
"""
from __future__ import annotations

from typing import NamedTuple


class Reason(NamedTuple):
    when: str   # what in the user's code leads to it
    hint: str   # what to do about it


_INTERNAL_FORM = Reason(
    "the loss or its backward is not in the form the matcher knows (e.g. a custom autograd.Function, a hook "
    "on the logits or their gradient, or a torch version that decomposes the loss differently)",
    "please report it with the output of `python -m inductor_lce.explain`; the site compiles as without the pass")

_BUG = Reason(
    "a bug in the pass: it is logged with a traceback and the graph is restored",
    "please report it with the logged traceback; the site compiles as without the pass")

SKIPS: dict = {
    "logits_returned": Reason(
        "the logits (or the log-probs) leave the compiled region: returned, or stored (e.g. `torch.compile(model)` "
        "on an HF model, whose output holds `logits`)",
        "compile a train step that returns only the loss"),
    "logits_other_users": Reason(
        "something besides the loss reads the logits (an auxiliary loss, a metric), or a `logsumexp` reads logits "
        "that are not the scored ones (before the soft-cap, or in bf16)",
        "compute the other use outside the compiled region or from `hidden`; a z-loss on the same fp32 logits "
        "the loss reads is fused"),
    "log_softmax_other_users": Reason(
        "something besides the NLL reads the log-probs (an entropy bonus, a KL term)",
        "only the NLL and one class sum (label smoothing) may read them: compute the other term separately"),
    "label_smoothing": Reason(
        "the log-probs are reduced over the classes in another form than `F.cross_entropy`'s one sum "
        "(e.g. a hand-written `-logp.mean(-1)`)",
        "use `F.cross_entropy(..., label_smoothing=eps)`, which is fused"),
    "class_weights": Reason(
        "per-class weights: `weight=` on the loss",
        "not fused: the site compiles as without the pass"),
    "not_fp32": Reason(
        "the loss reads bf16/fp16 logits (nanoGPT style, no `.float()`)",
        "add `.float()` before the loss, or opt in with `options(low_precision_logits=True)`"),
    "logits_path_op": Reason(
        "an op other than view / float / shift-slice / one soft-cap between the lm-head matmul and the loss "
        "(e.g. a temperature division)",
        "fold a scale into `hidden` (`F.linear(h / T, W)` is `F.linear(h, W) / T` without a bias); other ops "
        "are not fused"),
    "logits_input": Reason(
        "the logits are an input of the compiled graph: a graph break between the lm-head and the loss (e.g. a "
        "`logger.warning(...)` on the way; `explain` shows Dynamo's reason and line), or the loss compiled on its own",
        "remove the graph break (README, \"Graph breaks between the head and the loss\") or compile the lm-head "
        "together with the loss"),
    "no_matmul": Reason(
        "the logits are not computed by a matmul in this graph (e.g. a constant of the graph)",
        "nothing to fuse: the site compiles as without the pass"),
    "matmul_form": Reason(
        "the lm-head is not a plain `F.linear(h, W[, b])` (an addmm with scaling or a broadcast bias, a weight "
        "that is not a [V, D] matrix)",
        "use `F.linear` / `nn.Linear` for the head"),
    "no_nll": Reason(
        "a log-softmax over the classes that no NLL reads (sampling, a KL term): not a cross-entropy",
        "nothing to do"),
    "nll_form": Reason(
        "the loss after the log-softmax is not the masked NLL that `F.cross_entropy` / `F.nll_loss` trace to "
        "(e.g. a hand-written `gather` without the `ignore_index` mask)",
        "use `F.cross_entropy` or `F.nll_loss`"),
    "nll_backward_form": _INTERNAL_FORM,
    "log_softmax_backward_form": _INTERNAL_FORM,
    "logits_grad_form": _INTERNAL_FORM,
    "logits_grad_other_users": Reason(
        "the gradient of the logits is read outside the loss's backward (a hook, or logits that need a grad of "
        "their own)",
        "remove the hook, or compute that gradient outside the compiled region"),
    "dynamic_size_use": Reason(
        "dynamic shapes: a size read off the logits is needed elsewhere and no surviving tensor has it",
        "mark fewer dims dynamic"),
    "post_grad_training": Reason(
        "`LinearCrossEntropyPass` only in the post-grad slot of a training compile: the forward already saves "
        "the logits for the backward",
        "use `options()` / `install()` (the joint-graph slot)"),
    "matcher_error": _BUG,
    "rewrite_error": _BUG,
}

# Reasons the matchers raise that never become a skip: for the test that every raised reason is known.
NOT_SKIPS: dict = {
    "not_log_softmax": "the node is not a log-softmax: not a cross-entropy site (find_sites)",
    "log_softmax_layout": "a log-softmax over another dim than the classes: not a cross-entropy site (find_sites)",
    "per_token_grad": "tokens get different incoming gradients: the site takes the recompute algorithm "
                      "(choose_algorithm), it is still rewritten",
}


def hint(reason: str) -> str:
    row = SKIPS.get(reason)
    return row.hint if row is not None else "no hint for this reason: please report it"


def markdown_table() -> str:
    """README.md's "Current limits" table. Reasons with the same row are merged."""
    rows: list = []
    for reason, row in SKIPS.items():
        for merged in rows:
            if merged[1] == row:
                merged[0].append(reason)
                break
        else:
            rows.append(([reason], row))
    lines = ["| reason | when | what to do |", "| --- | --- | --- |"]
    for reasons, row in rows:
        lines.append(f"| {' / '.join(f'`{r}`' for r in reasons)} | {row.when} | {row.hint} |")
    return "\n".join(lines)
