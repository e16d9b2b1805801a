"""Readable chunked PyTorch implementation of linear + cross-entropy.

This is the CPU implementation of the ``inductor_lce`` ops and the reference
every kernel is tested against.  For token ``n`` with hidden row ``h_n`` [D],
weight ``W`` [V, D], optional bias ``b`` [V] and target ``y_n``:

    z_n        = h_n @ W.T + b              # [V], rounded to h's dtype, then fp32 (like eager `.float()`)
    s_n        = c * tanh(z_n / c)          # fp32; only with a logit soft-cap c > 0 (Gemma 2), else s_n = z_n
    lse_n      = log(sum_v exp(s_nv))       # fp32
    loss_n     = lse_n - s_{n, y_n}         # 0 where y_n == ignore_index
    sum_n      = sum_v s_nv                 # label smoothing reads it: -sum_v log_softmax = V * lse_n - sum_n

Backward, given per-token incoming gradients ``g_n`` (for loss_n), ``g_lse_n``
(for lse_n, e.g. from a z-loss) and ``g_sum_n`` (for sum_n):

    grad_s_nv      = softmax(s_n)_v * (g_n + g_lse_n) - [v == y_n] * g_n + g_sum_n   # g_n := 0 where ignored
    grad_logits_nv = grad_s_nv * (1 - (s_nv / c)**2)  # with a soft-cap, else grad_s; rounded to h's dtype
    grad_hidden    = grad_logits @ W                  # [N, D]
    grad_weight    = grad_logits.T @ h                # [V, D], accumulated in fp32 over chunks
    grad_bias      = grad_logits.sum(0)               # [V]

Only ``chunk_size`` rows of logits exist at a time: peak extra memory is
O(chunk_size * V) plus, for low-precision weights, an fp32 accumulator of
grad_weight ([V, D]) so that chunking loses no precision against eager.

Two algorithms use these formulas:

* recompute (``lce_forward`` + ``lce_backward``, four GEMMs of N*D*V): the forward keeps only ``lse``;
  the backward recomputes the logits. Any per-token incoming gradients (reduction="none" with weights,
  z-loss, label smoothing).
* gradients in the forward (``lce_fused``, three GEMMs): when every scored token gets the same incoming
  gradient ``g_n = grad_scale`` (mean, sum, sum / num_items_in_batch), one pass over row chunks computes
  the loss and the gradients of ``sum_n grad_scale * loss_n``; the backward only multiplies them by the
  incoming gradient of the reduced loss.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

# Bytes of fp32 logits one chunk may hold (several temporaries of this size live at once).
CHUNK_BYTES = int(os.environ.get("INDUCTOR_LCE_CHUNK_BYTES", 32 * 2**20))


def chunk_rows(num_classes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows of logits per chunk so one fp32 chunk is about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(1, num_classes)))


def check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise the error eager cross-entropy raises on CPU for an out-of-range target."""
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"Target {value} is out of bounds.")


def _logits(hidden_chunk: Tensor, weight: Tensor, bias: Optional[Tensor], softcap: float) -> Tensor:
    # [C, V]: computed in the input dtype (as F.linear would), then upcast like `.float()`;
    # soft-capped in fp32 (eager Gemma 2 rounds each of its three steps to the input dtype).
    logits = torch.nn.functional.linear(hidden_chunk, weight, bias).float()
    return logits if not softcap else torch.tanh(logits / softcap) * softcap


def lce_forward_reference(
    hidden: Tensor,            # [N, D]
    weight: Tensor,            # [V, D]
    bias: Optional[Tensor],    # [V] or None
    target: Tensor,            # [N] int
    ignore_index: int,
    softcap: float = 0.0,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token loss [N] (0 where ignored), log-sum-exp [N] and sum of the logits [N], all fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    check_targets(target, V, ignore_index)
    chunk = chunk_size or chunk_rows(V)
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    sum_logits = torch.empty(N, dtype=torch.float32, device=hidden.device)
    for start in range(0, N, chunk):
        rows = slice(start, min(start + chunk, N))
        logits = _logits(hidden[rows], weight, bias, softcap)               # [C, V]
        lse_c = torch.logsumexp(logits, dim=-1)                             # [C]
        y = target[rows]
        valid = y != ignore_index
        target_logit = logits.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
        loss[rows] = torch.where(valid, lse_c - target_logit, 0.0)
        lse[rows] = lse_c
        sum_logits[rows] = logits.sum(-1)
    return loss, lse, sum_logits


class _GradAccumulators:
    """grad_hidden [N, D] (rows written once), grad_weight [V, D] and grad_bias [V] summed over row chunks in fp32
    for 16-bit weights: the part of the backward both references share."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
        acc_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.weight, self.bias = weight, bias
        self.grad_hidden = torch.empty_like(hidden)
        self.grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        self.grad_bias = None if bias is None else torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device)

    def add_chunk(self, rows: slice, h: Tensor, logits: Tensor, grad_logits: Tensor, softcap: float) -> None:
        """grad_logits [C, V] fp32 = d loss / d scores of the chunk's rows (modified in place)."""
        if softcap:
            grad_logits *= 1 - (logits / softcap) ** 2                      # d(c tanh(z/c))/dz
        grad_logits_lp = grad_logits.to(h.dtype)                             # what eager feeds its mm
        acc_dtype = self.grad_weight.dtype
        self.grad_hidden[rows] = grad_logits_lp @ self.weight
        self.grad_weight.addmm_(grad_logits_lp.t().to(acc_dtype), h.to(acc_dtype))
        if self.grad_bias is not None:
            self.grad_bias += grad_logits_lp.to(acc_dtype).sum(0)

    def result(self) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        grad_bias = None if self.grad_bias is None else self.grad_bias.to(self.bias.dtype)
        return self.grad_hidden, self.grad_weight.to(self.weight.dtype), grad_bias


def lce_backward_reference(
    grad_loss: Tensor,           # [N] fp32
    grad_lse: Optional[Tensor],  # [N] fp32 or None
    grad_sum_logits: Optional[Tensor],  # [N] fp32 or None
    hidden: Tensor,              # [N, D]
    weight: Tensor,              # [V, D]
    bias: Optional[Tensor],      # [V] or None
    target: Tensor,              # [N] int
    lse: Tensor,                 # [N] fp32
    ignore_index: int,
    softcap: float = 0.0,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """grad_hidden [N, D], grad_weight [V, D], grad_bias [V] (None without bias)."""
    N, V = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or chunk_rows(V)
    grads = _GradAccumulators(hidden, weight, bias)
    for start in range(0, N, chunk):
        rows = slice(start, min(start + chunk, N))
        h = hidden[rows]
        y = target[rows]
        valid = y != ignore_index
        g = torch.where(valid, grad_loss[rows].float(), 0.0)               # [C]
        g_total = g if grad_lse is None else g + grad_lse[rows].float()
        logits = _logits(h, weight, bias, softcap)                          # [C, V]
        grad_logits = torch.exp(logits - lse[rows].unsqueeze(1)) * g_total.unsqueeze(1)
        grad_logits.scatter_add_(1, torch.where(valid, y, 0).unsqueeze(1), -g.unsqueeze(1))
        if grad_sum_logits is not None:
            grad_logits += grad_sum_logits[rows].float().unsqueeze(1)
        grads.add_chunk(rows, h, logits, grad_logits, softcap)
    return grads.result()


def lce_fused_reference(
    hidden: Tensor,            # [N, D]
    weight: Tensor,            # [V, D]
    bias: Optional[Tensor],    # [V] or None
    target: Tensor,            # [N] int
    grad_scale: Tensor,        # [] fp32: the incoming gradient of every scored token's loss
    ignore_index: int,
    softcap: float = 0.0,
    chunk_size: Optional[int] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Three GEMMs per row chunk: loss [N], lse [N] (fp32), and the gradients of
    ``sum_n grad_scale * loss_n`` (ignored tokens contribute nothing): grad_hidden [N, D],
    grad_weight [V, D] (fp32 accumulator over chunks for 16-bit weights), grad_bias [V] (None without bias).

    Equals ``lce_forward`` followed by ``lce_backward`` with ``grad_loss = grad_scale`` on every token,
    with the logits of a chunk computed once."""
    N, V = hidden.shape[0], weight.shape[0]
    check_targets(target, V, ignore_index)
    chunk = chunk_size or chunk_rows(V)
    scale = grad_scale.float().reshape(())
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grads = _GradAccumulators(hidden, weight, bias)
    for start in range(0, N, chunk):
        rows = slice(start, min(start + chunk, N))
        h = hidden[rows]
        y = target[rows]
        valid = y != ignore_index
        logits = _logits(h, weight, bias, softcap)                          # [C, V]
        lse_c = torch.logsumexp(logits, dim=-1)                             # [C]
        safe_y = torch.where(valid, y, 0).unsqueeze(1)
        loss[rows] = torch.where(valid, lse_c - logits.gather(1, safe_y).squeeze(1), 0.0)
        lse[rows] = lse_c
        g = torch.where(valid, scale, 0.0)                                  # [C]
        grad_logits = torch.exp(logits - lse_c.unsqueeze(1)) * g.unsqueeze(1)
        grad_logits.scatter_add_(1, safe_y, -g.unsqueeze(1))
        grads.add_chunk(rows, h, logits, grad_logits, softcap)
    return (loss, lse) + grads.result()
