"""Host side of the Triton lowering: the slab loops, the workspace plan and the two ops' implementations.

Forward (one launch):   lse_forward kernel over [N, V] in V-splits -> (max2, sumexp, sum) partials [SPLITS, N]
                        and target_logit [N]; torch combines them into lse [N], loss [N] and sum_logits [N].
                        With softcap c > 0 every kernel scores s = c * tanh(z / c) instead of the logits z
                        (HAS_SOFTCAP constexpr: the c = 0 kernels are the plain ones).
Backward (per V-slab of ``slab`` classes, in order):
    grad_logits       = F.linear(hidden, weight[slab]) by cuBLAS, turned into grad_logits in place by the
                        grad_logits_inplace kernel (or, Settings.grad_logits="fused", the grad_logits kernel
                        recomputing the logits by tl.dot); the soft-cap chain rule and the grad_sum_logits
                        term are applied there (HAS_SOFTCAP / HAS_GRAD_SUM)                # [N, slab] dtype
    grad_weight[slab] = grad_logits.T @ hidden          # cuBLAS, one matmul over all N, into the output: exact
    grad_hidden      += grad_logits @ weight[slab]      # grad_hidden kernel: fp32 or compensated bf16 state
That is 4 GEMMs of N*D*V (forward logits, backward logits, grad_weight, grad_hidden) against the 3 of a
logits-storing implementation: the lse needs a whole row of V before any grad_logits exists.

Workspace (bytes beyond the outputs), ``Settings.workspace_bytes`` (default 60 MiB):
    grad_hidden state (N*D*4 fp32 or N*D*1 int8 compensation) + slab * N * itemsize (+ slab * D * itemsize
    when traced: Inductor turns the ``out=`` grad_weight matmul into mm + copy through a temporary)

Both functions run on real tensors (eager, via the ops' backend) and on fake tensors (tracing); under
tracing, ``wrap_triton`` turns each launch into a node Inductor compiles and launches itself.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

import triton

from ._config import DOT_FP32, INTERPRET, LN2
from .grad_hidden import grad_hidden_kernel
from .grad_logits import grad_logits_kernel
from .grad_logits_inplace import grad_logits_inplace_kernel
from .lse_forward import lse_forward_kernel
from .lse_update import lse_update_kernel

__all__ = ["Settings", "SETTINGS", "lce_forward_impl", "lce_backward_impl", "plan_backward", "forward_splits"]


def _env_mb(name: str, default: float) -> int:
    return int(float(os.environ.get(name, default)) * 2**20)


@dataclass
class Settings:
    """Knobs read when an op runs (eager) or is traced (compile). Environment variables set the defaults."""

    # bytes beyond the outputs for the backward's grad_hidden state + one grad_logits slab
    workspace_bytes: int = _env_mb("INDUCTOR_LCE_WORKSPACE_MB", 60)
    forward: str = os.environ.get("INDUCTOR_LCE_FORWARD", "fused")              # fused | cublas
    grad_logits: str = os.environ.get("INDUCTOR_LCE_GRAD_LOGITS", "cublas")     # cublas | fused
    grad_hidden_state: str = os.environ.get("INDUCTOR_LCE_GRAD_HIDDEN_STATE", "auto")  # auto | fp32 | compensated
    # >1 splits the tokens into row groups: wider slabs (less grad_hidden state traffic) for one extra
    # bf16 accumulation of grad_weight per group (measured +15-25% grad_weight error: off by default)
    row_groups: int = int(os.environ.get("INDUCTOR_LCE_ROW_GROUPS", "1"))
    check_targets: bool = os.environ.get("INDUCTOR_LCE_CHECK_TARGETS", "1") == "1"


SETTINGS = Settings()

MODE_FP32, MODE_COMPENSATED = 0, 1
_GROUP_M = 8
# Column granularity of forward V-splits and of backward slabs (partial tiles are masked)
_GRAIN = 32 if INTERPRET else 256
_SLAB_GRAIN = 32 if INTERPRET else 128


def _hint(x) -> int:
    """A size as a Python int for planning, without adding a guard on a symbolic size."""
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    hint = getattr(node, "hint", None)
    if isinstance(hint, int):
        return hint
    try:
        return int(node.shape_env.size_hint(node.expr))
    except Exception:
        return int(x)  # specializes: correct, only less general


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _bucket(n: int) -> int:
    """Autotuning key for the token count: the next power of two."""
    return 1 << max(0, int(_hint(n)) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms(device: str) -> int:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return 4


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def _max_block_k(kernel) -> int:
    return max(int(c.kwargs.get("BLOCK_K", 1)) for c in kernel.configs)


def _max_block_n(kernel) -> int:
    return max(int(c.kwargs.get("BLOCK_N", 1)) for c in kernel.configs)


def _check_targets(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Device-side check (no sync) that every scored target is a class id, like eager cross-entropy."""
    ok = (target == ignore_index) | ((target >= 0) & (target < num_classes))
    torch._assert_async(ok.all(), "inductor_lce: target out of bounds (not in [0, V) and not ignore_index)")


def forward_splits(n_tokens: int, num_classes: int, num_sms: int) -> tuple[int, int]:
    """(classes per split, number of splits) for the forward grid, minimising waves * work per program.

    Programs = cdiv(N, 128) row blocks x splits; each program walks v_per_split classes. The cost model
    counts waves of programs times (v_per_split + a fixed 128-class overhead per program)."""
    row_blocks = _cdiv(max(n_tokens, 1), 128)
    best = None
    for per_split in range(_GRAIN, _cdiv(num_classes, _GRAIN) * _GRAIN + 1, _GRAIN):
        splits = _cdiv(num_classes, per_split)
        cost = _cdiv(row_blocks * splits, num_sms) * (per_split + 128)
        if best is None or cost < best[0]:
            best = (cost, per_split, splits)
    return best[1], best[2]


@dataclass(frozen=True)
class BackwardPlan:
    mode: int              # MODE_FP32 or MODE_COMPENSATED
    state_in_output: bool  # fp32 inputs: the fp32 state is grad_hidden itself
    slab: int              # classes per V-slab
    rows: int              # tokens per row group (N unless row_groups > 1)
    workspace_bytes: int   # state + one slab (+ the traced grad_weight temporary)


def plan_backward(n_tokens: int, dim: int, num_classes: int, dtype: torch.dtype,
                  workspace: Optional[int] = None, state: Optional[str] = None,
                  row_groups: Optional[int] = None, traced: bool = False) -> BackwardPlan:
    """Slab width and grad_hidden state so that state + one [rows, slab] grad_logits buffer fit the workspace.

    Traced (Inductor): the ``out=`` grad_weight matmul becomes mm + copy, so each class of the slab also
    costs a [dim] temporary row."""
    workspace = SETTINGS.workspace_bytes if workspace is None else workspace
    state = SETTINGS.grad_hidden_state if state is None else state
    groups = max(1, SETTINGS.row_groups if row_groups is None else row_groups)
    rows = _cdiv(max(n_tokens, 1), groups)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_class = (rows + (dim if traced else 0)) * itemsize
    if dtype == torch.float32:
        mode, in_output, state_bytes = MODE_FP32, True, 0
    elif state == "fp32" or (state == "auto" and rows * dim * 4 <= workspace // 2):
        mode, in_output, state_bytes = MODE_FP32, False, rows * dim * 4
    else:
        mode, in_output, state_bytes = MODE_COMPENSATED, False, rows * dim
    slab = (max(0, workspace - state_bytes) // per_class) // _SLAB_GRAIN * _SLAB_GRAIN
    slab = min(max(_SLAB_GRAIN, slab), _cdiv(num_classes, _SLAB_GRAIN) * _SLAB_GRAIN)
    return BackwardPlan(mode, in_output, slab, rows, state_bytes + slab * per_class)


def _is_traced(t: Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover
        return False
    return is_fake(t)


# ----------------------------------------------------------------------------------------------- forward

def _check_softcap(softcap: float) -> float:
    from ..ops import check_softcap

    softcap = float(softcap)
    check_softcap(softcap)
    return softcap


def lce_forward_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                     ignore_index: int, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, lse, sum_logits), each [N] fp32 (``inductor_lce::lce_forward``'s semantics)."""
    softcap = _check_softcap(softcap)
    n_tokens, dim = hidden.shape
    num_classes = weight.shape[0]
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    bias = None if bias is None else bias.contiguous()
    if SETTINGS.check_targets:
        _check_targets(target, num_classes, ignore_index)
    if _hint(n_tokens) == 0:
        empty = hidden.new_empty((n_tokens,), dtype=torch.float32)
        return empty, empty.clone(), empty.clone()
    if SETTINGS.forward == "cublas":
        lse, target_logit, sum_logits = _forward_cublas(hidden, weight, bias, target, softcap)
    else:
        lse, target_logit, sum_logits = _forward_fused(hidden, weight, bias, target, softcap)
    loss = torch.where(target != ignore_index, lse - target_logit, 0.0)
    return loss, lse, sum_logits


def _forward_fused(hidden, weight, bias, target, softcap):
    n_tokens, dim = hidden.shape
    num_classes = weight.shape[0]
    per_split, splits = forward_splits(_hint(n_tokens), num_classes, _num_sms(str(hidden.device)))
    max2 = hidden.new_empty((splits, n_tokens), dtype=torch.float32)          # [SPLITS, N]
    sumexp = hidden.new_empty((splits, n_tokens), dtype=torch.float32)        # [SPLITS, N]
    partial_sum = hidden.new_empty((splits, n_tokens), dtype=torch.float32)   # [SPLITS, N]
    target_logit = hidden.new_zeros((n_tokens,), dtype=torch.float32)         # [N]

    def grid(meta):
        return (triton.cdiv(n_tokens, meta["BLOCK_M"]), splits)

    wrap_triton(lse_forward_kernel)[grid](
        hidden, weight, bias, target, max2, sumexp, partial_sum, target_logit,
        n_tokens, num_classes, dim, per_split, _bucket(n_tokens), hidden.stride(0), weight.stride(0), softcap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, EVEN_K=dim % _max_block_k(lse_forward_kernel) == 0,
        DOT_FP32=DOT_FP32, DOT_PRECISION=_dot_precision(hidden.dtype),
    )
    top = max2.amax(0)                                                        # [N]
    lse = (top + torch.log2((sumexp * torch.exp2(max2 - top)).sum(0))) * LN2
    return lse, target_logit, partial_sum.sum(0)


def _forward_cublas(hidden, weight, bias, target, softcap):
    """Variant: cuBLAS logits slabs (F.linear) folded into a running lse by the lse_update kernel."""
    n_tokens, dim = hidden.shape
    num_classes = weight.shape[0]
    itemsize = hidden.element_size()
    slab = max(_GRAIN, SETTINGS.workspace_bytes // max(1, _hint(n_tokens) * itemsize) // _GRAIN * _GRAIN)
    max2 = hidden.new_empty((n_tokens,), dtype=torch.float32)
    sumexp = hidden.new_empty((n_tokens,), dtype=torch.float32)
    sum_logits = hidden.new_empty((n_tokens,), dtype=torch.float32)
    target_logit = hidden.new_empty((n_tokens,), dtype=torch.float32)
    for v0 in range(0, num_classes, slab):
        v1 = min(v0 + slab, num_classes)
        logits = torch.nn.functional.linear(hidden, weight[v0:v1], None if bias is None else bias[v0:v1])

        def grid(meta):
            return (triton.cdiv(n_tokens, meta["BLOCK_M"]),)

        wrap_triton(lse_update_kernel)[grid](
            logits, target, max2, sumexp, sum_logits, target_logit, n_tokens, v1 - v0, v0, logits.stride(0),
            softcap, FIRST=v0 == 0, HAS_SOFTCAP=softcap > 0,
        )
        del logits  # before the next slab is allocated: one slab alive at a time
    return (max2 + torch.log2(sumexp)) * LN2, target_logit, sum_logits


# ---------------------------------------------------------------------------------------------- backward

def lce_backward_impl(grad_loss: Tensor, grad_lse: Optional[Tensor], grad_sum_logits: Optional[Tensor],
                      hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor,
                      ignore_index: int, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden [N, D], grad_weight [V, D], grad_bias [V] or [0]) (``inductor_lce::lce_backward``'s semantics)."""
    softcap = _check_softcap(softcap)
    n_tokens, dim = hidden.shape
    num_classes = weight.shape[0]
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    lse = lse.float().contiguous()
    grad_loss = grad_loss.float().contiguous()
    grad_lse = None if grad_lse is None else grad_lse.float().contiguous()
    grad_sum_logits = None if grad_sum_logits is None else grad_sum_logits.float().contiguous()
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)      # [N, D]
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)      # [V, D]
    # [V] fp32 sums of grad_logits (a 0-element stand-in without bias: the kernels restore it when tuning)
    grad_bias_acc = hidden.new_zeros((num_classes if bias is not None else 0,), dtype=torch.float32)
    if _hint(n_tokens) == 0:
        grad_weight.zero_()
        return grad_hidden, grad_weight, grad_bias_acc.to(weight.dtype if bias is None else bias.dtype)

    groups = 1 if isinstance(n_tokens, torch.SymInt) else max(1, SETTINGS.row_groups)
    plan = plan_backward(_hint(n_tokens), dim, num_classes, hidden.dtype, row_groups=groups,
                         traced=_is_traced(hidden))
    starts = list(range(0, num_classes, plan.slab))
    row_starts = list(range(0, n_tokens, plan.rows)) if groups > 1 else [0]
    mode = plan.mode
    if len(starts) == 1:  # one slab: grad_hidden is written once, no running state
        mode, state = MODE_FP32, None
    elif mode == MODE_FP32:
        state = None if plan.state_in_output else hidden.new_empty((plan.rows, dim), dtype=torch.float32)
    else:
        state = hidden.new_empty((plan.rows, dim), dtype=torch.int8)   # [rows, D] compensation of grad_hidden
    for r0 in row_starts:
        r1 = min(r0 + plan.rows, n_tokens) if groups > 1 else n_tokens
        rows = slice(r0, r1)
        n_rows = r1 - r0 if groups > 1 else n_tokens
        h_g = hidden[rows] if groups > 1 else hidden
        gh_g = grad_hidden[rows] if groups > 1 else grad_hidden
        state_g = gh_g if state is None else (state[: r1 - r0] if groups > 1 else state)
        args_g = [t if t is None or groups == 1 else t[rows]
                  for t in (target, lse, grad_loss, grad_lse, grad_sum_logits)]
        for i, v0 in enumerate(starts):
            v1 = min(v0 + plan.slab, num_classes)
            grad_logits = _grad_logits_slab(h_g, weight, bias, *args_g, grad_bias_acc, v0, v1, n_rows, ignore_index,
                                            softcap)
            # grad_weight[slab]: one matmul over the tokens, written straight into the output (exact when
            # there is one row group; otherwise each further group adds one bf16 rounding)
            if r0 == 0:
                torch.mm(grad_logits.t(), h_g, out=grad_weight[v0:v1])
            else:
                grad_weight[v0:v1].addmm_(grad_logits.t(), h_g)

            def grid_h(meta):
                return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_N"]),)

            wrap_triton(grad_hidden_kernel)[grid_h](
                grad_logits, weight[v0:v1], state_g, state_g, gh_g,
                n_rows, dim, v1 - v0, _bucket(n_rows), grad_logits.stride(0), weight.stride(0), dim, dim,
                MODE=mode, FIRST=i == 0, LAST=i == len(starts) - 1,
                EVEN_K=(v1 - v0) % _max_block_k(grad_hidden_kernel) == 0,
                EVEN_D=dim % _max_block_n(grad_hidden_kernel) == 0,
                DOT_FP32=DOT_FP32, DOT_PRECISION=_dot_precision(hidden.dtype), GROUP_M=_GROUP_M,
            )
            del grad_logits  # before the next slab is allocated: one slab alive at a time
    grad_bias = weight.new_empty((0,)) if bias is None else grad_bias_acc.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def _grad_logits_slab(hidden, weight, bias, target, lse, grad_loss, grad_lse, grad_sum_logits, grad_bias_acc,
                      v0, v1, n_tokens, ignore_index, softcap):
    """[n_tokens, v1 - v0] grad_logits (d loss / d logits, after the soft-cap's chain rule) of classes [v0, v1)
    in the input dtype, and their grad_bias sums."""
    flags = dict(HAS_BIAS=bias is not None, HAS_GRAD_LSE=grad_lse is not None,
                 HAS_GRAD_SUM=grad_sum_logits is not None, HAS_SOFTCAP=softcap > 0)
    dim = hidden.shape[1]
    width = v1 - v0
    if SETTINGS.grad_logits == "cublas":
        # logits by cuBLAS (F.linear: input-dtype output, like the reference), turned into grad_logits in place
        grad_logits = torch.nn.functional.linear(hidden, weight[v0:v1], None if bias is None else bias[v0:v1])

        def grid_e(meta):
            return (triton.cdiv(n_tokens, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_N"]))

        wrap_triton(grad_logits_inplace_kernel)[grid_e](
            grad_logits, target, lse, grad_loss, grad_lse, grad_sum_logits, grad_bias_acc,
            n_tokens, width, v0, grad_logits.stride(0), ignore_index, softcap,
            **flags, EMULATE_ROUNDING=DOT_FP32,
        )
        return grad_logits
    grad_logits = hidden.new_empty((n_tokens, width))

    def grid_l(meta):
        return (triton.cdiv(n_tokens, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)

    wrap_triton(grad_logits_kernel)[grid_l](
        hidden, weight, bias, target, lse, grad_loss, grad_lse, grad_sum_logits, grad_logits, grad_bias_acc,
        n_tokens, dim, v0, width, _bucket(n_tokens), hidden.stride(0), weight.stride(0),
        grad_logits.stride(0), ignore_index, softcap, **flags,
        EVEN_K=dim % _max_block_k(grad_logits_kernel) == 0, DOT_FP32=DOT_FP32,
        DOT_PRECISION=_dot_precision(hidden.dtype), GROUP_M=_GROUP_M,
    )
    return grad_logits
