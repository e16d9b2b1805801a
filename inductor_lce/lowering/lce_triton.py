"""Host side of the Triton lowering: the slab / chunk loops, the workspace plans and the three ops' implementations.

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

Fused op (``lce_fused``, three GEMMs; every scored token has the same incoming gradient ``grad_scale``), per
chunk of ``chunk_rows`` tokens (whole rows of V), in order:
    logits            = F.linear(hidden[rows], weight, bias) by cuBLAS                        # [c, V] dtype
    loss, lse[rows]   and grad_logits in place: the softmax_grad_rows kernel (two passes per row)
    grad_hidden[rows] = grad_logits @ weight            # cuBLAS, K = V, into the output: exact
    grad_weight      += grad_logits.T @ hidden[rows]    # exact over chunks: see plan_fused
    grad_bias        += grad_logits.sum(0)              # fp32 (with bias)
Workspace, ``Settings.fused_workspace_bytes`` (default max(64 MiB, f * N * V * itemsize), f =
``Settings.fused_workspace_fraction`` = 0.49: under half of the one low-precision [N, V] logits tensor plain
torch.compile keeps): one chunk of logits + the grad_weight state
(none, fp32 [V, D] or int8 [V, D]); when even the smallest state and chunk do not fit, the op runs the recompute
algorithm instead (lce_forward + lce_backward with grad_loss = grad_scale: same results, four GEMMs, lean memory).

All functions run on real tensors (eager, via the ops' backend) and on fake tensors (tracing); under
tracing, ``wrap_triton`` turns each launch into a node Inductor compiles and launches itself.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.library import wrap_triton

import triton

try:  # host-side TMA descriptors (matmul_accumulate_tma.py)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel everywhere
    TensorDescriptor = None

from ..kernels._config import DOT_FP32, INTERPRET, LN2
from ..kernels._gluon import descriptor as gluon_descriptor
from ..kernels.grad_logits import grad_logits_kernel
from ..kernels.grad_logits_inplace import grad_logits_inplace_kernel
from ..kernels.lse_forward import lse_forward_kernel
from ..kernels.lse_update import lse_update_kernel
from ..kernels.matmul_accumulate import matmul_accumulate_kernels
from ..kernels.matmul_accumulate_tma import matmul_accumulate_tma_kernels
from ..kernels.matmul_accumulate_cooperative import cooperative_configs, cooperative_kernel
from ..kernels.matmul_accumulate_wgmma import wgmma_configs, wgmma_kernel
from ..kernels.softmax_grad_rows import softmax_grad_rows_kernel
from .chunk_schedule import candidate_sizes, chunk_sizes, round_up, time_chunk_matmuls, whole_step

__all__ = ["Settings", "SETTINGS", "lce_forward_impl", "lce_backward_impl", "lce_fused_impl", "plan_backward",
           "plan_fused", "FusedPlan", "forward_splits"]


def _env_mb(name: str, default: Optional[float]) -> Optional[int]:
    value = os.environ.get(name, default)
    return None if value is None else int(float(value) * 2**20)


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
    # fused op: bytes beyond the outputs for one logits chunk + the grad_weight state (see plan_fused);
    # None: max(64 MiB, fused_workspace_fraction * N * V * itemsize) per call
    fused_workspace_bytes: Optional[int] = _env_mb("INDUCTOR_LCE_FUSED_WORKSPACE_MB", None)
    # that default's fraction of one [N, V] logits tensor (plain torch.compile keeps about one): < 0.5 keeps the
    # op under half of plain compile's memory; larger, fewer chunks (fewer passes over the grad_weight state)
    fused_workspace_fraction: float = float(os.environ.get("INDUCTOR_LCE_FUSED_WORKSPACE_FRACTION", "0.49"))
    # auto | fp32 | compensated (int8) | compensated4 (4 bits; bf16, even D; else as compensated; opt-in, "auto"
    # never takes it: bench/NOTES.md 8.20): plan_fused
    fused_state: str = os.environ.get("INDUCTOR_LCE_FUSED_STATE", "auto")
    # fp32 grad_weight accumulation (fp32 state, fp32 weights) on CUDA: cuBLAS (aten::addmm.dtype_out, where this
    # torch has it and it works) or the Triton matmul_accumulate kernel
    fused_fp32_gemm: str = os.environ.get("INDUCTOR_LCE_FUSED_FP32_GEMM", "cublas")   # cublas | triton
    # the fused op's grad_weight accumulation kernel: "auto" (on sm_90 with Gluon: matmul_accumulate_tma.py and
    # each matmul_accumulate_cooperative.py (compensated state) and matmul_accumulate_wgmma.py config timed on the
    # first accumulating launch per shape, the fastest kept; elsewhere as "tma") | "tma" (matmul_accumulate_tma.py
    # where TMA applies, else "pointer") | "pointer" (matmul_accumulate.py) | "cooperative" / "wgmma" (that Gluon
    # kernel's first config, sm_90, where TMA applies (cooperative: compensated state only); else as "tma").
    # bench/NOTES.md 8.8, 8.10, 8.12
    fused_grad_weight_kernel: str = os.environ.get("INDUCTOR_LCE_FUSED_GRAD_WEIGHT_KERNEL", "auto")
    # recompute backward: the leading V-slabs keep their grad_logits in the rows of grad_weight that later slabs
    # write (wider slabs, fewer passes over the grad_hidden state; backward_slabs). bench/NOTES.md 8.17
    slabs_in_grad_weight: bool = os.environ.get("INDUCTOR_LCE_SLABS_IN_GRAD_WEIGHT", "1") == "1"
    # the recompute backward's grad_hidden accumulation per V-slab: "tma" (matmul_accumulate_tma.py where TMA
    # applies, else "pointer") | "pointer" (matmul_accumulate.py). bench/NOTES.md 8.16
    grad_hidden_kernel: str = os.environ.get("INDUCTOR_LCE_GRAD_HIDDEN_KERNEL", "tma")
    # fused op, eager on CUDA without a bias: the chunk sizes where cuBLAS is fastest at the plan's chunk count,
    # from sizes timed once per D and V (chunk_schedule.py; bench/NOTES.md 8.18); off: an even split
    fused_chunk_tuning: bool = os.environ.get("INDUCTOR_LCE_FUSED_CHUNK_TUNING", "1") == "1"


SETTINGS = Settings()
log = logging.getLogger("inductor_lce")

MODE_FP32, MODE_COMPENSATED, MODE_COMPENSATED4 = 0, 1, 2     # matmul_accumulate.py's MODE
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


def _max_block(kernel, name: str) -> int:
    """The largest BLOCK_M / BLOCK_N / BLOCK_K over an autotuned kernel's configs: sizes that are a multiple of it
    can be read without masks whichever config wins."""
    return max(int(c.kwargs.get(name, 1)) for c in kernel.configs)


@functools.lru_cache(maxsize=None)
def _capability(device: str) -> tuple:
    return tuple(torch.cuda.get_device_capability(torch.device(device)))


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


def backward_slabs(n_tokens: int, dim: int, num_classes: int, slab: int, in_grad_weight: bool) -> list:
    """The recompute backward's V-slabs, in class order: (v0, v1, scratch) with scratch True where the slab's
    [N, v1 - v0] grad_logits live in grad_weight's rows past v1 (not written yet: a slab writes grad_weight[v0:v1]
    only), else in the workspace's [N, slab] buffer. While those rows can hold it (N * width <= (V - v0 - width)
    * D, i.e. width <= (V - v0) * D / (N + D)) a slab is that wide (a multiple of the grain) if that beats
    ``slab``: at 8192 x 4096 x 128256, 11 slabs instead of 72."""
    slabs, v0 = [], 0
    while v0 < num_classes:
        width = (num_classes - v0) * dim // (n_tokens + dim) // _SLAB_GRAIN * _SLAB_GRAIN if in_grad_weight else 0
        scratch = width > slab
        width = width if scratch else slab
        slabs.append((v0, min(v0 + width, num_classes), scratch))
        v0 += width
    return slabs


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
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
        EVEN_K=dim % _max_block(lse_forward_kernel, "BLOCK_K") == 0,
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
    traced = _is_traced(hidden)
    plan = plan_backward(_hint(n_tokens), dim, num_classes, hidden.dtype, row_groups=groups, traced=traced)
    # (scratch in grad_weight: one row group, eager, no bias (F.linear's bias epilogue has no out= form))
    slabs = backward_slabs(_hint(n_tokens), dim, num_classes, plan.slab, SETTINGS.slabs_in_grad_weight and
                           groups == 1 and not traced and bias is None)
    row_starts = list(range(0, n_tokens, plan.rows)) if groups > 1 else [0]
    mode = plan.mode
    if len(slabs) == 1:  # one slab: grad_hidden is written once, no running state
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
        for i, (v0, v1, scratch) in enumerate(slabs):
            out = grad_weight.view(-1)[v1 * dim: v1 * dim + n_rows * (v1 - v0)].view(n_rows, v1 - v0) \
                if scratch else None
            grad_logits = _grad_logits_slab(h_g, weight, bias, *args_g, grad_bias_acc, v0, v1, n_rows, ignore_index,
                                            softcap, out=out)
            # grad_weight[slab]: one matmul over the tokens, written straight into the output (exact when
            # there is one row group; otherwise each further group adds one bf16 rounding)
            if r0 == 0:
                torch.mm(grad_logits.t(), h_g, out=grad_weight[v0:v1])
            else:
                grad_weight[v0:v1].addmm_(grad_logits.t(), h_g)

            # grad_hidden += grad_logits @ weight[slab], through the fp32 or compensated state
            _matmul_accumulate("grad_hidden", grad_logits, weight[v0:v1], gh_g, state_g, mode=mode, first=i == 0,
                               last=i == len(slabs) - 1, m_key=_bucket(n_rows), k_key=_bucket(plan.slab),
                               traced=traced)
            del grad_logits  # before the next slab is allocated: one slab alive at a time
    grad_bias = weight.new_empty((0,)) if bias is None else grad_bias_acc.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


# Keys (kernel, its autotuning key and argument dtypes) some launch has run with already: Triton has tuned them.
_TUNED: set = set()


def _tuning_split(key: tuple, rows: int, head: int, traced: bool) -> list:
    """Row spans to launch a kernel over. Autotuning a kernel that overwrites its inputs saves and restores them
    around every trial, so the first launch of a ``key`` (eager) runs on its first ``head`` rows alone: those are
    all that get copied. Later launches (tuned) and traced ones (Inductor tunes them itself): one span."""
    if traced or key in _TUNED:
        return [(0, rows)]
    _TUNED.add(key)
    head = max(1, min(head, rows))
    return [(0, head)] + ([(head, rows)] if head < rows else [])


def _matmul_accumulate(use: str, a: Tensor, b: Tensor, out: Tensor, state: Tensor, *, mode: int, first: bool,
                       last: bool, m_key: int, k_key: int, a_padded: bool = False, traced: bool = False) -> None:
    """out (+)= a @ b through the running ``state`` (matmul_accumulate.py): a [M, K], b [K, N], any strides;
    state: fp32 [M, N] (MODE_FP32; may be out itself), int8 [M, N] with out's strides (MODE_COMPENSATED) or uint8
    [M, N / 2], two 4-bit values a byte (MODE_COMPENSATED4, bf16 out).
    ``use`` ("grad_hidden" / "grad_weight") picks the kernel setting (_KERNELS) and the pointer kernel's config
    table (both uses share the TMA kernel's); m_key / k_key are the autotuning keys, the same for every launch of
    a loop.
    ``a_padded``: a's storage holds rows up to a multiple of the largest BLOCK_M (unmasked loads).
    A FIRST launch reads no state: its tuner saves nothing (replays write the same values). The others do: the
    first of them per key runs on its first rows alone (about two waves of the largest tile), see _tuning_split."""
    tma = _tma_applies(use, a, b, traced)
    gluon = tma and use == "grad_weight" and _grad_weight_kernel(a, b, state, out, mode=mode, first=first,
                                                                 last=last, m_key=m_key, k_key=k_key)
    if gluon:
        _launch_gluon(a, b, state, out, mode=mode, first=first, last=last, cfg=gluon)
        return
    first_kernel, later_kernel = matmul_accumulate_tma_kernels if tma else matmul_accumulate_kernels[use]
    kernel = first_kernel if first else later_kernel
    M, K = a.shape
    N = b.shape[1]
    spans = [(0, M)]
    if not first:
        grain = _max_block(kernel, "BLOCK_M")
        tile = max(int(c.kwargs["BLOCK_M"]) * int(c.kwargs["BLOCK_N"]) for c in kernel.configs)
        head = _cdiv(2 * _num_sms(str(a.device)) * tile, max(1, N))   # two waves of the largest tile
        head = M // 2 if INTERPRET else head   # (interpreted: small problems, still run the split launch)
        head = max(grain, _cdiv(head, grain) * grain)
        key = ("matmul_accumulate", use, tma, N, m_key, k_key, a.dtype, b.dtype, state.dtype, out.dtype)
        spans = _tuning_split(key, M, head, traced)
    for m0, m1 in spans:
        a_s, out_s, state_s = (t if len(spans) == 1 else t[m0:m1] for t in (a, out, state))
        if tma:
            _launch_tma(kernel, a_s, b, state_s, out_s, mode=mode, first=first, last=last, m_key=m_key, k_key=k_key)
            continue

        def grid(meta, rows=m1 - m0):
            return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        wrap_triton(kernel)[grid](
            a_s, b, state_s, state_s, out_s, m1 - m0, N, K, m_key, k_key, a.stride(0), a.stride(1), b.stride(0),
            b.stride(1), state.stride(0), out.stride(0), MODE=mode, FIRST=first, LAST=last,
            EVEN_M=a_padded or (m1 - m0) % _max_block(kernel, "BLOCK_M") == 0,
            EVEN_N=N % _max_block(kernel, "BLOCK_N") == 0,
            EVEN_K=K % _max_block(kernel, "BLOCK_K") == 0, DOT_FP32=DOT_FP32, DOT_PRECISION=_dot_precision(b.dtype),
            GROUP_M=_GROUP_M,
        )


_KERNELS = {"grad_weight": ("fused_grad_weight_kernel", ("auto", "cooperative", "wgmma", "tma", "pointer")),
            "grad_hidden": ("grad_hidden_kernel", ("tma", "pointer"))}


def _tma_applies(use: str, a: Tensor, b: Tensor, traced: bool) -> bool:
    """Whether matmul_accumulate_tma.py runs out += a @ b for ``use`` under its setting: eager (Inductor's tracing
    of descriptor arguments is not relied on), sm_90+ or the interpreter, a M-major (grad_weight: the chunk
    transposed) or K-major (grad_hidden: the slab), b row-major, 16-byte aligned rows and bases."""
    name, allowed = _KERNELS[use]
    setting = getattr(SETTINGS, name)
    if setting not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {setting!r}")
    if setting == "pointer" or traced or TensorDescriptor is None:
        return False
    if not INTERPRET and (a.device.type != "cuda" or _capability(str(a.device))[0] < 9):
        return False
    a_rows = (a, 1) if a.stride(0) == 1 else (a, 0) if a.stride(1) == 1 else None
    return a_rows is not None and b.stride(1) == 1 and _tma_aligned(a_rows, (b, 0))


def _tma_aligned(*tensor_dims) -> bool:
    """16-byte aligned bases and strides along the given (tensor, dim) pairs (TMA descriptors need both)."""
    return all((t.stride(i) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t, i in tensor_dims)


def _gluon_configs(a: Tensor, state: Tensor, out: Tensor, mode: int) -> tuple:
    """The Gluon kernels' configs that may run out (+)= a @ b (where _tma_applies) under the setting: compiled (not
    interpreted) for sm_90 exactly (wgmma), with Gluon's Hopper API, 16-bit operands and output;
    matmul_accumulate_cooperative.py only for the compensated state (MODE 1), its hi / lo rows TMA-aligned."""
    setting = SETTINGS.fused_grad_weight_kernel
    if (INTERPRET or a.device.type != "cuda" or _capability(str(a.device)) != (9, 0)
            or a.dtype not in (torch.bfloat16, torch.float16) or out.dtype != a.dtype):
        return ()
    found = ()
    if setting in ("auto", "cooperative") and cooperative_kernel is not None and mode == MODE_COMPENSATED \
            and out.stride(1) == 1 and state.stride(1) == 1 and _tma_aligned((out, 0), (state, 0)):
        found += cooperative_configs()
    if setting in ("auto", "wgmma") and wgmma_kernel is not None:
        found += wgmma_configs()
    return found


# {(N, m_key, k_key, dtypes, mode): None (matmul_accumulate_tma.py) or a Gluon config (_gluon_configs)}
_GRAD_WEIGHT_CHOICE: dict = {}


def _grad_weight_kernel(a: Tensor, b: Tensor, state: Tensor, out: Tensor, *, mode: int, first: bool, last: bool,
                        m_key: int, k_key: int) -> Optional[dict]:
    """The Gluon config to run out (+)= a @ b with, or None for matmul_accumulate_tma.py (where TMA applies).
    "cooperative" / "wgmma": that kernel's first config where it applies; "auto": the fastest on this shape,
    timed once per key on the first launch that reads a state (a FIRST launch runs the TMA kernel until then):
    no kernel wins everywhere (bench/NOTES.md 8.10, 8.12, 8.13)."""
    configs = _gluon_configs(a, state, out, mode)
    if not configs:
        return None
    if SETTINGS.fused_grad_weight_kernel != "auto":
        return configs[0]
    key = (b.shape[1], m_key, k_key, a.dtype, b.dtype, state.dtype, out.dtype, mode)
    if key not in _GRAD_WEIGHT_CHOICE:
        if first or torch.cuda.is_current_stream_capturing():   # (no state yet / no host sync while capturing)
            return None
        _GRAD_WEIGHT_CHOICE[key] = _fastest_grad_weight_kernel(a, b, state, out, (None,) + configs, mode=mode,
                                                               last=last, m_key=m_key, k_key=k_key)
    return _GRAD_WEIGHT_CHOICE[key]


_TIMED_LAUNCHES = 3          # launches per timing, queued behind a GPU sleep
_SLEEP_CYCLES = 4_000_000    # ~2 ms at sm_90 clocks: longer than the host takes to enqueue them


def _fastest_grad_weight_kernel(a: Tensor, b: Tensor, state: Tensor, out: Tensor, candidates: tuple, *, mode: int,
                                last: bool, m_key: int, k_key: int) -> Optional[dict]:
    """Times each candidate (None: matmul_accumulate_tma.py, else a Gluon config) on the first rows of this launch
    and returns the fastest. The head is a whole number (>= 4) of waves of 128 x 256 tiles (and so of the ping-pong
    kernel's pairs of 128 x 128 tiles): a last, partly filled wave would cost a kernel with larger tiles more than
    it costs on the whole chunk (NOTES 8.13). A timing is 3 launches queued behind a GPU sleep, so the events see
    the kernels alone, not the host's launch overhead (through Triton's autotuner as long as the kernel on that
    head: NOTES 8.10); the best of 3 timings. The head's state (out and state rows) is restored after each, so
    the launch itself is still to do. One host sync per key."""
    M, N = a.shape[0], b.shape[1]
    num_sms, col_tiles = _num_sms(str(a.device)), _cdiv(N, 256)
    period = num_sms // math.gcd(num_sms, col_tiles)      # row blocks whose tiles fill whole waves
    head = min(M, _cdiv(_cdiv(4 * num_sms, col_tiles), period) * period * 128)
    a_h, out_h, state_h = a[:head], out[:head], state[:head]
    saved = [(t, t.clone()) for t in ((out_h,) if state.data_ptr() == out.data_ptr() else (out_h, state_h))]
    tma_kernel = matmul_accumulate_tma_kernels[1]

    def launch(candidate):
        if candidate is None:
            _launch_tma(tma_kernel, a_h, b, state_h, out_h, mode=mode, first=False, last=last, m_key=m_key,
                        k_key=k_key)
        else:
            _launch_gluon(a_h, b, state_h, out_h, mode=mode, first=False, last=last, cfg=candidate)

    def restore():
        for t, copy in saved:
            t.copy_(copy)

    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for candidate in candidates:
        launch(candidate)                                # compile (and autotune the TMA kernel's configs)
        restore()
        best = float("inf")
        for _ in range(3):
            torch.cuda._sleep(_SLEEP_CYCLES)
            start.record()
            for _ in range(_TIMED_LAUNCHES):             # (the state sums three times over: restored below)
                launch(candidate)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / _TIMED_LAUNCHES)
            restore()
        times.append(best)
    fastest = times.index(min(times))
    names = ["TMA" if c is None else c["name"] for c in candidates]
    log.info("grad_weight accumulation [%d, %d] += [%d, %d] @ [%d, %d] (mode %d): %s (ms per launch on its first "
             "%d rows: %s)", M, N, M, a.shape[1], a.shape[1], N, mode, names[fastest], head,
             ", ".join(f"{n} {t:.3f}" for n, t in zip(names, times)))
    return candidates[fastest]


def _launch_gluon(a: Tensor, b: Tensor, state: Tensor, out: Tensor, *, mode: int, first: bool, last: bool,
                  cfg: dict) -> None:
    """One launch of the Gluon kernel of config ``cfg`` (_gluon_configs()): out (+)= a @ b, a [M, K] M-major (read
    as a.t(), row-major); matmul_accumulate_wgmma.py, or matmul_accumulate_cooperative.py (MODE 1: state = lo)."""
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    num_sms = _num_sms(str(a.device))
    grid = (min(num_sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    if cfg["kernel"] == "cooperative":
        assert mode == MODE_COMPENSATED
        half = [bm, bn // 2]
        cooperative_kernel[grid](gluon_descriptor(a.t(), [bk, bm]), gluon_descriptor(b, [bk, bn // 2]),
                                 gluon_descriptor(out, half), gluon_descriptor(state, half), M, N, K,
                                 FIRST=first, LAST=last, GROUP_M=_GROUP_M, NUM_SMS=num_sms, **cfg["constexprs"],
                                 num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])
        return
    a_t_desc = gluon_descriptor(a.t(), [bk, bm])
    b_desc = gluon_descriptor(b, [bk, bn])
    wgmma_kernel[grid](a_t_desc, b_desc, state, state, out, M, N, K, state.stride(0), out.stride(0),
                       MODE=mode, FIRST=first, LAST=last, GROUP_M=_GROUP_M, NUM_SMS=num_sms, **cfg["constexprs"],
                       num_warps=cfg["num_warps"], maxnreg=cfg["maxnreg"])


def _launch_tma(kernel, a: Tensor, b: Tensor, state: Tensor, out: Tensor, *, mode: int, first: bool, last: bool,
                m_key: int, k_key: int) -> None:
    """One launch of matmul_accumulate_tma.py: out (+)= a @ b, a [M, K] M-major (read as a.t(), row-major) or
    K-major (row-major itself)."""
    M, K = a.shape
    N = b.shape[1]
    num_sms = _num_sms(str(a.device))
    k_major = a.stride(0) != 1
    a_desc = TensorDescriptor.from_tensor(a if k_major else a.t(), [16, 16])   # boxes set per config (its pre-hook)
    b_desc = TensorDescriptor.from_tensor(b, [16, 16])

    def grid(meta):
        return (min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    kernel[grid](a_desc, b_desc, state, state, out, M, N, K, m_key, k_key, state.stride(0), out.stride(0),
                 MODE=mode, FIRST=first, LAST=last, DOT_FP32=DOT_FP32, DOT_PRECISION=_dot_precision(b.dtype),
                 GROUP_M=_GROUP_M, NUM_SMS=num_sms, A_K_MAJOR=k_major)


def _grad_logits_slab(hidden, weight, bias, target, lse, grad_loss, grad_lse, grad_sum_logits, grad_bias_acc,
                      v0, v1, n_tokens, ignore_index, softcap, out=None):
    """[n_tokens, v1 - v0] grad_logits (d loss / d logits, after the soft-cap's chain rule) of classes [v0, v1)
    in the input dtype (into ``out``, a contiguous buffer of that shape, where given; then without bias), and
    their grad_bias sums."""
    flags = dict(HAS_BIAS=bias is not None, HAS_GRAD_LSE=grad_lse is not None,
                 HAS_GRAD_SUM=grad_sum_logits is not None, HAS_SOFTCAP=softcap > 0)
    dim = hidden.shape[1]
    width = v1 - v0
    if SETTINGS.grad_logits == "cublas":
        # logits by cuBLAS (F.linear: input-dtype output, like the reference), turned into grad_logits in place
        if out is None:
            grad_logits = torch.nn.functional.linear(hidden, weight[v0:v1], None if bias is None else bias[v0:v1])
        else:   # (F.linear without bias: the same mm)
            assert bias is None
            grad_logits = torch.mm(hidden, weight[v0:v1].t(), out=out)

        def grid_e(meta):
            return (triton.cdiv(n_tokens, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_N"]))

        wrap_triton(grad_logits_inplace_kernel)[grid_e](
            grad_logits, target, lse, grad_loss, grad_lse, grad_sum_logits, grad_bias_acc,
            n_tokens, width, v0, grad_logits.stride(0), ignore_index, softcap,
            **flags, EMULATE_ROUNDING=DOT_FP32,
        )
        return grad_logits
    grad_logits = hidden.new_empty((n_tokens, width)) if out is None else out

    def grid_l(meta):
        return (triton.cdiv(n_tokens, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)

    wrap_triton(grad_logits_kernel)[grid_l](
        hidden, weight, bias, target, lse, grad_loss, grad_lse, grad_sum_logits, grad_logits, grad_bias_acc,
        n_tokens, dim, v0, width, _bucket(n_tokens), hidden.stride(0), weight.stride(0),
        grad_logits.stride(0), ignore_index, softcap, **flags,
        EVEN_K=dim % _max_block(grad_logits_kernel, "BLOCK_K") == 0, DOT_FP32=DOT_FP32,
        DOT_PRECISION=_dot_precision(hidden.dtype), GROUP_M=_GROUP_M,
    )
    return grad_logits


# ------------------------------------------------------------------------------------------------- fused

# FusedPlan.state_mode: how grad_weight = sum over chunks of grad_logits.T @ hidden[rows] is kept exact
ONE_CHUNK = "one_chunk"        # all N rows in one chunk: one cuBLAS matmul writes grad_weight
IN_OUTPUT = "in_output"        # fp32 weights: grad_weight itself is the fp32 accumulator
FP32_STATE = "fp32"            # an fp32 [V, D] state (4 B per element)
COMPENSATED = "compensated"    # grad_weight (hi) + an int8 [V, D] residual (1 B per element), matmul_accumulate MODE 1
COMPENSATED4 = "compensated4"  # bf16 grad_weight (hi) + a 4-bit residual, uint8 [V, D / 2] (MODE 2)
RECOMPUTE = "recompute"        # not even COMPENSATED + a minimal chunk fits: lce_forward + lce_backward instead

_STATE_MODES = {IN_OUTPUT: MODE_FP32, FP32_STATE: MODE_FP32, COMPENSATED: MODE_COMPENSATED,
                COMPENSATED4: MODE_COMPENSATED4}   # the plan's state -> matmul_accumulate's MODE
_MIN_FUSED_WORKSPACE = 64 * 2**20
_FUSED_ROW_GRAIN = 8 if INTERPRET else 128   # chunk rows are a multiple of it (the last chunk ragged)
_CHUNK_STEP = 8 if INTERPRET else 64         # timed chunk sizes are multiples of it (chunk_schedule.py)
_FP32_STATE_MIN_ROWS = 1024                  # "auto" takes the fp32 state only beside chunks of >= min(N, this) rows


@dataclass(frozen=True)
class FusedPlan:
    chunk_rows: int        # tokens per chunk (the last one may be shorter); 0 with RECOMPUTE
    state_mode: str        # ONE_CHUNK | IN_OUTPUT | FP32_STATE | COMPENSATED | COMPENSATED4 | RECOMPUTE
    workspace_bytes: int   # state + the largest chunk of logits (+ traced temporaries); RECOMPUTE: plan_backward's
    max_chunk_rows: int = 0  # the most rows a chunk may have (timed chunk sizes, eager): a multiple of _CHUNK_STEP


def default_fused_workspace(n_tokens: int, num_classes: int, dtype: torch.dtype) -> int:
    """max(64 MiB, f * N * V * itemsize), f = Settings.fused_workspace_fraction: a fraction of one [N, V] logits
    tensor in the input dtype (what plain torch.compile keeps), so that with f < 0.5 the op's memory above the
    gradients stays under half of plain torch.compile's."""
    fraction = SETTINGS.fused_workspace_fraction
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fused_workspace_fraction must be in (0, 1], got {fraction!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(_MIN_FUSED_WORKSPACE, int(fraction * n_tokens * num_classes * itemsize))


def _chunk_grain() -> int:
    """The grad_weight kernel's largest BLOCK_M: a chunk row stride that is a multiple of it needs no masks."""
    return _max_block(matmul_accumulate_kernels["grad_weight"][0], "BLOCK_M")


def _chunk_stride(num_classes: int, traced: bool) -> int:
    """Row stride of a logits chunk: V rounded up to the grad_weight kernel's largest BLOCK_M (eager), so that the
    kernel reads the transposed chunk in unmasked, vectorized tiles. Traced: V (an ``out=`` matmul into a view
    would become matmul + copy there)."""
    grain = _chunk_grain()
    if traced or num_classes % grain == 0:
        return num_classes
    return _cdiv(num_classes, grain) * grain


def plan_fused(n_tokens: int, dim: int, num_classes: int, dtype: torch.dtype, workspace: Optional[int] = None,
               state: Optional[str] = None, traced: bool = False, bias: bool = False) -> FusedPlan:
    """Chunk rows and grad_weight state of the fused op so that state + one [chunk_rows, V] logits chunk fit
    ``workspace`` (default: Settings.fused_workspace_bytes, else default_fused_workspace):

    (a) all N rows fit in one chunk: ONE_CHUNK, no state;
    (b) fp32 weights: IN_OUTPUT (no state);
    (c) 16-bit weights, state "auto": FP32_STATE when V * D * 4 plus a chunk of >= min(N, 1024) rows fits and
        COMPENSATED's larger chunks would not need fewer of them, else (d) COMPENSATED (V * D bytes) with chunks of
        >= 128 rows (fewer chunks: fewer passes over the state, bench/NOTES.md 8.15); "fp32" / "compensated" force
        one (>= 128 rows); "compensated4", COMPENSATED4 (V * D / 2 bytes: larger chunks, fewer passes; bf16 with D
        even, else as "compensated"), is opt-in: it saves 2 of 5 passes at 8192 x 4096 x 128256 and at the e2e
        shape, but only the Gluon ping-pong kernel runs it without large spills, which made shape 2 3.8 ms slower
        and the e2e shape 0.5 ms faster (NOTES 8.20). Each of its passes but the last rounds the running sum to 2^-12
        relative (bf16's own rounding: 2^-8), so it is for few chunks;
    (e) nothing fits: RECOMPUTE.
    Chunks: as many rows as fit beside the state, a multiple of 128, then evened out over the chunks needed
    (chunk_rows); max_chunk_rows, the most that fit (a multiple of 64), bounds the timed sizes of the same count.
    Traced (Inductor), each row also costs a [D] temporary (the out= grad_hidden matmul becomes mm + copy), and with
    a 16-bit bias a [V] fp32 one (_logits_chunk's fp32 addmm)."""
    n = max(1, n_tokens)
    if workspace is None:
        workspace = SETTINGS.fused_workspace_bytes
    if workspace is None:
        workspace = default_fused_workspace(n, num_classes, dtype)
    state = SETTINGS.fused_state if state is None else state
    if state not in ("auto", "fp32", "compensated", "compensated4"):
        raise ValueError(f"fused_state must be auto, fp32, compensated or compensated4, got {state!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = (_chunk_stride(num_classes, traced) + (dim if traced else 0)) * itemsize
    if traced and bias and dtype != torch.float32:
        row_bytes += 4 * num_classes
    if n * row_bytes <= workspace:
        return FusedPlan(n, ONE_CHUNK, n * row_bytes, n)
    grain = _FUSED_ROW_GRAIN
    elements = num_classes * dim
    if dtype == torch.float32:
        options = [(IN_OUTPUT, 0, grain)]
    else:
        four_bits = dtype == torch.bfloat16 and dim % 2 == 0
        compensated = (COMPENSATED, elements, grain)
        options = {"auto": [(FP32_STATE, 4 * elements, _FP32_STATE_MIN_ROWS), compensated],
                   "fp32": [(FP32_STATE, 4 * elements, grain)],
                   "compensated": [compensated],
                   "compensated4": [(COMPENSATED4, elements // 2, grain) if four_bits else compensated]}[state]
    plans = []
    for mode, state_bytes, min_rows in options:
        fit = max(0, workspace - state_bytes) // row_bytes      # < n: one chunk of all rows did not fit
        if fit >= max(grain, min(n, min_rows)):
            rows = fit // grain * grain
            rows = _cdiv(_cdiv(n, _cdiv(n, rows)), grain) * grain   # the same chunk count, chunks evened out
            max_rows = max(rows, min(n, fit) // _CHUNK_STEP * _CHUNK_STEP)   # (chunk_schedule's bound)
            plans.append(FusedPlan(rows, mode, state_bytes + max_rows * row_bytes, max_rows))
    if plans:  # the first that fits, unless a later one (the smaller state) needs fewer chunks (state passes)
        return min(plans, key=lambda p: _cdiv(n, p.chunk_rows))
    return FusedPlan(0, RECOMPUTE, plan_backward(n, dim, num_classes, dtype, traced=traced).workspace_bytes)


@functools.lru_cache(maxsize=None)
def _cublas_fp32_accumulate_works(device: str) -> bool:
    """Whether this torch accumulates 16-bit products into an fp32 tensor in place by cuBLAS (``aten::mm.dtype_out``
    and ``aten::addmm.dtype_out`` with out = self; CUDA only, and older versions require self in the input dtype):
    tried once per device on a small problem shaped like the real one (A transposed)."""
    ops = torch.ops.aten
    if not (hasattr(ops.addmm, "dtype_out") and hasattr(ops.mm, "dtype_out")):
        return False
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(40, 64, device=device, generator=gen).to(torch.bfloat16).t()       # [64, 40], M-major
        b = torch.randn(40, 48, device=device, generator=gen).to(torch.bfloat16)
        state = torch.empty(64, 48, device=device, dtype=torch.float32)
        ops.mm.dtype_out(a, b, torch.float32, out=state)
        ops.addmm.dtype_out(state, a, b, torch.float32, out=state)
        return bool(torch.allclose(state, 2 * (a.float() @ b.float()), rtol=1e-4, atol=1e-4))
    except Exception:  # not implemented for this device / dtypes in this torch
        return False


def _use_cublas_fp32(plan: FusedPlan, device: torch.device, traced: bool) -> bool:
    if SETTINGS.fused_fp32_gemm not in ("cublas", "triton"):
        raise ValueError(f"fused_fp32_gemm must be cublas or triton, got {SETTINGS.fused_fp32_gemm!r}")
    if SETTINGS.fused_fp32_gemm != "cublas" or traced or INTERPRET or device.type != "cuda":
        return False
    return plan.state_mode == IN_OUTPUT or _cublas_fp32_accumulate_works(str(device))


def _logits_chunk(h_c: Tensor, weight: Tensor, bias: Optional[Tensor], traced: bool = False) -> Tensor:
    """[c, V] logits of a chunk of rows by cuBLAS with a bias or traced (eager without a bias, the chunk loop writes
    the same matmul into its chunk buffer), rounded to the input dtype exactly like F.linear (it is F.linear).
    Traced with a bias: Inductor may split the addmm into mm + a pointwise bias add when its users are pointwise
    (torch < 2.13 for 16-bit), rounding twice; an fp32 matmul + the bias, then one cast, keeps eager's single
    rounding (``aten.mm.dtype``: torch 2.11's decomposition of ``addmm.dtype`` is broken)."""
    if traced and bias is not None and h_c.dtype != torch.float32 and hasattr(torch.ops.aten.mm, "dtype"):
        return (torch.ops.aten.mm.dtype(h_c, weight.t(), torch.float32) + bias.float()).to(h_c.dtype)
    return torch.nn.functional.linear(h_c, weight, bias)


def _softmax_grad_rows(logits: Tensor, target: Tensor, loss: Tensor, lse: Tensor, grad_scale: Tensor,
                       ignore_index: int, softcap: float, traced: bool) -> None:
    """loss, lse of the chunk's rows and their grad_logits in place (softmax_grad_rows.py). The kernel's first
    launch per V (eager) runs on 2 * SMs rows alone, so its tuning copies only them (_tuning_split)."""
    n_rows, num_classes = logits.shape
    key = ("softmax_grad_rows", num_classes, logits.dtype, target.dtype)
    spans = _tuning_split(key, n_rows, 2 * _num_sms(str(logits.device)), traced)
    for r0, r1 in spans:
        whole = len(spans) == 1

        def grid(meta, rows=r1 - r0):
            return (triton.cdiv(rows, meta["BLOCK_M"]),)

        wrap_triton(softmax_grad_rows_kernel)[grid](
            *(t if whole else t[r0:r1] for t in (logits, target, loss, lse)), grad_scale, r1 - r0, num_classes,
            logits.stride(0), ignore_index, softcap, HAS_SOFTCAP=softcap > 0, EMULATE_ROUNDING=DOT_FP32,
        )


_COLUMN_SUM_BYTES = 16 * 2**20


def _add_column_sums(acc: Tensor, rows: Tensor, traced: bool) -> None:
    """acc [V] fp32 += rows [c, V].sum(0) in fp32. Eager, a few rows at a time: a 16-bit ``sum(0, dtype=float32)``
    makes an fp32 copy of its input (measured on the H100: 140 MB per 1024 x 32000 chunk), so at most 16 MiB of it.
    Traced: one reduction (Inductor fuses the upcast)."""
    if traced:
        acc += rows.sum(0, dtype=torch.float32)
        return
    step = max(1, _COLUMN_SUM_BYTES // (4 * max(1, rows.shape[1])))
    for r0 in range(0, rows.shape[0], step):
        acc += rows[r0:r0 + step].sum(0, dtype=torch.float32)


def _whole_or_rows(t: Tensor, r0, r1, n_tokens) -> Tensor:
    return t if (r0 == 0 and r1 == n_tokens) else t[r0:r1]


def lce_fused_impl(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, grad_scale: Tensor,
                   ignore_index: int, softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss [N], lse [N], grad_hidden [N, D], grad_weight [V, D], grad_bias [V] or [0]) (``inductor_lce::lce_fused``'s
    semantics: the gradients of sum_n grad_scale * loss_n, ignored tokens contributing nothing)."""
    from ..ops import check_grad_scale

    softcap = _check_softcap(softcap)
    check_grad_scale(grad_scale)
    n_tokens, dim = hidden.shape
    num_classes = weight.shape[0]
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    bias = None if bias is None else bias.contiguous()
    grad_scale = grad_scale.to(hidden.device)            # read by the kernel on the device: no host sync
    traced = _is_traced(hidden)
    plan = plan_fused(_hint(n_tokens), dim, num_classes, hidden.dtype, traced=traced, bias=bias is not None)
    if plan.state_mode == RECOMPUTE:  # the same results with four GEMMs and the backward's lean workspace
        loss, lse, _ = lce_forward_impl(hidden, weight, bias, target, ignore_index, softcap)
        grads = lce_backward_impl(grad_scale.expand(n_tokens), None, None, hidden, weight, bias, target, lse,
                                  ignore_index, softcap)
        return (loss, lse) + tuple(grads)
    loss = hidden.new_empty((n_tokens,), dtype=torch.float32)
    lse = hidden.new_empty((n_tokens,), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format)      # [N, D]
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format)      # [V, D]
    grad_bias_acc = None if bias is None else hidden.new_zeros((num_classes,), dtype=torch.float32)
    if _hint(n_tokens) == 0:
        grad_weight.zero_()
    else:
        _fused_chunks(plan, hidden, weight, bias, target, grad_scale, ignore_index, softcap, traced,
                      loss, lse, grad_hidden, grad_weight, grad_bias_acc)
    if SETTINGS.check_targets:
        # after the chunk loop, not before: its small launches then queue behind the GEMMs instead of delaying
        # the first one (0.35 ms of idle GPU, bench/NOTES.md); safe, as the kernels only compare targets with
        # column ids (an out-of-range target reads nothing), and the device-side assert fails the step either way
        _check_targets(target, num_classes, ignore_index)
    grad_bias = weight.new_empty((0,)) if bias is None else grad_bias_acc.to(bias.dtype)
    return loss, lse, grad_hidden, grad_weight, grad_bias


_CHUNK_TIMES: dict = {}       # (device, dtype, D, V, stride) -> {rows: ms of a chunk's two matmuls}, any N
_CHUNK_SCHEDULES: dict = {}   # (device, dtype, D, V, stride, N, max_chunk_rows) -> the chunk sizes


def _tune_chunks(hidden: Tensor, bias: Optional[Tensor], traced: bool) -> bool:
    """Whether the fused op times its chunk sizes: Settings.fused_chunk_tuning, eager on CUDA, without a bias (those
    chunks are F.linear's own outputs), and not under torch.use_deterministic_algorithms (the sizes, and so
    grad_weight's summation order, follow timings, as Inductor's autotuned kernels do)."""
    return (SETTINGS.fused_chunk_tuning and not traced and not INTERPRET and hidden.is_cuda and bias is None
            and not torch.are_deterministic_algorithms_enabled())


def _chunk_sizes_and_buffer(plan: FusedPlan, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int,
                            grad_hidden: Tensor, traced: bool) -> tuple[list, Optional[Tensor]]:
    """The fused op's chunk sizes (rows, in order) and, eager without a bias, the one [rows, V] buffer (row stride
    ``stride``) every chunk's logits are written to: the even split of plan.chunk_rows, or the sizes chosen on
    timed sizes (chunk_schedule.py). Sizes not timed yet for this D and V are timed here, in that buffer before
    grad_hidden is written (not while a CUDA graph is captured: the even split then)."""
    n_tokens, dim = hidden.shape
    num_classes = weight.shape[0]
    even = [min(plan.chunk_rows, n_tokens - r0) for r0 in range(0, n_tokens, plan.chunk_rows)]
    sizes, buf = even, None
    if len(even) > 1 and plan.max_chunk_rows > plan.chunk_rows and _tune_chunks(hidden, bias, traced):
        times_key = (str(hidden.device), hidden.dtype, dim, num_classes, stride)
        key = times_key + (n_tokens, plan.max_chunk_rows)
        if key not in _CHUNK_SCHEDULES and not (hidden.is_cuda and torch.cuda.is_current_stream_capturing()):
            max_rows = plan.max_chunk_rows
            step = whole_step(max_rows, _CHUNK_STEP)
            times = _CHUNK_TIMES.setdefault(times_key, {})
            needed = set(candidate_sizes(n_tokens, max_rows, step, _CHUNK_STEP))
            missing = sorted(needed.union(round_up(c, _CHUNK_STEP) for c in even) - times.keys())
            if missing:
                buf = hidden.new_empty((max_rows, stride))[:, :num_classes]
                times.update(time_chunk_matmuls(hidden, weight, buf, grad_hidden, missing))
            _CHUNK_SCHEDULES[key] = chunk_sizes(n_tokens, len(even), max_rows, step,
                                                lambda c: times[round_up(c, _CHUNK_STEP)], even)
            log.info("fused op chunks of [%d, %d] @ [%d, %d].T: %s rows (the even split: %s; %d sizes timed now)",
                     n_tokens, dim, num_classes, dim, _CHUNK_SCHEDULES[key], even, len(missing))
        sizes = _CHUNK_SCHEDULES.get(key, even)
    if bias is not None or traced:
        return sizes, None
    if buf is None:
        buf = hidden.new_empty((max(sizes), stride))[:, :num_classes]
    return sizes, buf


def _fused_chunks(plan, hidden, weight, bias, target, grad_scale, ignore_index, softcap, traced,
                  loss, lse, grad_hidden, grad_weight, grad_bias_acc):
    """The chunk loop of lce_fused_impl: fills loss, lse, grad_hidden, grad_weight and grad_bias_acc."""
    n_tokens, dim = hidden.shape
    num_classes = weight.shape[0]
    # with a bias: F.linear's own [c, V] output (addmm into a padded view rounds twice: mm, then + bias)
    stride = num_classes if bias is not None else _chunk_stride(num_classes, traced)
    mode = plan.state_mode
    cublas = mode in (IN_OUTPUT, FP32_STATE) and _use_cublas_fp32(plan, hidden.device, traced)
    state = None
    if mode == FP32_STATE:
        state = hidden.new_empty((num_classes, dim), dtype=torch.float32)       # [V, D]
    elif mode == COMPENSATED:
        state = hidden.new_empty((num_classes, dim), dtype=torch.int8)          # [V, D] compensation of grad_weight
    elif mode == COMPENSATED4:
        state = hidden.new_empty((num_classes, dim // 2), dtype=torch.uint8)    # [V, D / 2]: two 4-bit values a byte
    sizes, buf = _chunk_sizes_and_buffer(plan, hidden, weight, bias, stride, grad_hidden, traced)
    r1 = 0
    for i, rows in enumerate(sizes):
        r0, r1 = r1, r1 + rows
        first, last = i == 0, i == len(sizes) - 1
        h_c = hidden[r0:r1]
        if buf is None:
            logits = _logits_chunk(h_c, weight, bias, traced)                   # [c, V]
        else:  # the same matmul as F.linear's, into the chunk buffer
            logits = torch.mm(h_c, weight.t(), out=buf[:rows])                 # [c, V], row stride `stride`
        _softmax_grad_rows(logits, target[r0:r1], _whole_or_rows(loss, r0, r1, n_tokens),
                           _whole_or_rows(lse, r0, r1, n_tokens), grad_scale, ignore_index, softcap, traced)
        # grad_hidden of the chunk: one matmul over all V, written straight into the output (exact)
        torch.mm(logits, weight, out=_whole_or_rows(grad_hidden, r0, r1, n_tokens))
        gl_t = logits.t()                                                       # [V, c], stride (1, stride)
        if mode == ONE_CHUNK:
            torch.mm(gl_t, h_c, out=grad_weight)
        elif cublas and mode == IN_OUTPUT:
            if first:
                torch.mm(gl_t, h_c, out=grad_weight)
            else:
                grad_weight.addmm_(gl_t, h_c)
        elif cublas:  # FP32_STATE by cuBLAS: fp32 output of 16-bit products, accumulated in place
            if first:
                torch.ops.aten.mm.dtype_out(gl_t, h_c, torch.float32, out=state)
            else:
                torch.ops.aten.addmm.dtype_out(state, gl_t, h_c, torch.float32, out=state)
            if last:
                grad_weight.copy_(state)
        else:
            _matmul_accumulate("grad_weight", gl_t, h_c, grad_weight, grad_weight if mode == IN_OUTPUT else state,
                               mode=_STATE_MODES[mode], first=first, last=last,
                               m_key=_bucket(num_classes), k_key=_bucket(plan.chunk_rows), traced=traced,
                               a_padded=stride % _chunk_grain() == 0)
        if grad_bias_acc is not None:
            _add_column_sums(grad_bias_acc, logits, traced)
        del logits, gl_t  # (with a bias / traced, each chunk is allocated: one chunk alive at a time)
