"""The Triton lowerings (inductor_lce/lowerings) against reference.py.

CPU (CI): the kernels run on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``). Triton reads
that variable when a kernel is decorated, i.e. when ``inductor_lce.lowerings`` is first imported, so unless
this process already interprets, all interpreted cases run in ONE worker subprocess (this file run as a
script) that saves its outputs; the tests here compare them with the reference. Interpreter notes:

* ``tl.dot`` on bf16 operands returns garbage in triton 3.6's interpreter; the kernels upcast their tiles to
  fp32 before ``tl.dot`` when interpreting (``DOT_FP32``), so bf16 runs test the bf16 loads/stores and the
  rounding of logits/grad_logits to bf16, with an exact fp32 product (on the GPU: bf16 wgmma, fp32 accumulate).
* its fp32 -> bf16 conversion truncates; the kernels round explicitly there (``_rounding.round_to``).

Outputs checked: the forward's (loss, lse, sum_logits) and the backward's (grad_hidden, grad_weight,
grad_bias), with and without the logit soft-cap (softcap c > 0: s = c * tanh(z / c), both tanh branches hit:
logits have std ~2 and c = 3-5) and the optional grad_lse / grad_sum_logits inputs.

Tolerances. fp32: 1e-5 relative against a float64 reference. bf16/fp16 against reference.py on the same
inputs (same rounding points): loss/lse within 1e-3 absolute, sum_logits within 1e-5 relative (norm over
tokens; fp32 sums of the same scores in another order; 1e-3 on the GPU, where a logit's bf16 rounding may
flip by one ulp), grads within 1e-3 relative on the CPU
(exact fp32 dots: grad_weight is one matmul per slab, grad_hidden a compensated sum over slabs, where
plain bf16 accumulation is already 2.4e-3 off after 3 slabs) and 3e-3 on the GPU (bf16 tensor-core dots
and cuBLAS round logits/grads in other orders); and against float64 math on the same inputs (soft-cap and
its derivative in float64 too) within 1.1x eager's own error (CPU; 1.25x on the GPU); plain bf16
accumulation of grad_hidden over the 25 slabs of ``many_slabs_bf16`` would be 3.3x eager's. The kernels'
tanh (``lowerings/_tanh.py``, exp2 + polynomial, as libdevice's cannot be interpreted): within 2 ulps of
float64 tanh (measured 1.6; torch.tanh 0.51). GPU (skipped without CUDA): the same checks at larger
shapes, and the ops through torch.compile.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from typing import NamedTuple, Optional

import pytest
import torch

try:  # the worker's tanh probe kernel (decorated here: in the worker this module runs with TRITON_INTERPRET=1)
    import triton
    import triton.language as tl

    from inductor_lce.lowerings._tanh import tanh_f32
except ImportError:
    triton = tl = tanh_f32 = None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

class Case(NamedTuple):
    N: int
    D: int
    V: int
    dtype: str
    bias: bool
    frac: object            # fraction of tokens ignored, or "all"
    grad_lse: bool
    ignore_index: int
    settings: dict          # SETTINGS fields for the run
    softcap: float = 0.0    # > 0: Gemma 2 logit soft-cap
    grad_sum: Optional[str] = None  # grad_sum_logits: "smooth" (randn / V, label smoothing's scale) or "randn" (O(1))


# logits here have std ~2 (plus a 0.5-std bias): softcap 3-5 puts them in tanh's curved and saturated ranges
CASES = {
    "ragged_bf16": Case(37, 48, 83, "bfloat16", False, 0.2, False, -100, dict(workspace_bytes=4000)),
    "ragged_bf16_bias_lse_fp32state": Case(37, 48, 83, "bfloat16", True, 0.2, True, -100,
                                           dict(workspace_bytes=4000, grad_hidden_state="fp32")),
    "n1_bf16": Case(1, 32, 50, "bfloat16", False, 0.0, True, -100, dict(workspace_bytes=200)),
    "all_ignored_bias_lse": Case(21, 40, 70, "bfloat16", True, "all", True, -100, dict(workspace_bytes=3000)),
    "all_ignored_no_lse": Case(21, 40, 70, "bfloat16", False, "all", False, -100, dict(workspace_bytes=3000)),
    "fp32_bias_lse": Case(19, 40, 70, "float32", True, 0.3, True, -100, dict(workspace_bytes=3000)),
    "fp16_ignore0": Case(29, 32, 61, "float16", False, 0.3, False, 0, dict(workspace_bytes=3000)),
    "one_slab_bf16_bias": Case(33, 64, 45, "bfloat16", True, 0.1, True, -100, dict(workspace_bytes=1 << 20)),
    "cublas_forward_bias_lse": Case(37, 48, 83, "bfloat16", True, 0.2, True, -100,
                                    dict(workspace_bytes=4000, forward="cublas")),
    "fused_grad_logits_bias_lse": Case(37, 48, 83, "bfloat16", True, 0.2, True, -100,
                                       dict(workspace_bytes=4000, grad_logits="fused")),
    "row_groups_bias_lse": Case(37, 48, 83, "bfloat16", True, 0.2, True, -100,
                                dict(workspace_bytes=3000, row_groups=2)),
    # 25 slabs: plain bf16 accumulation of grad_hidden would be ~1e-2 off; the compensated state is not
    "many_slabs_bf16": Case(24, 32, 800, "bfloat16", False, 0.1, False, -100, dict(workspace_bytes=1800)),
    # logit soft-cap (s = c * tanh(z / c)), grad_sum_logits (label smoothing), both
    "softcap_bf16_bias_lse": Case(37, 48, 83, "bfloat16", True, 0.2, True, -100, dict(workspace_bytes=4000),
                                  softcap=3.0),
    "softcap_bf16_one_slab": Case(33, 64, 45, "bfloat16", False, 0.1, False, -100, dict(workspace_bytes=1 << 20),
                                  softcap=5.0),
    "softcap_fp32_bias_lse": Case(19, 40, 70, "float32", True, 0.3, True, -100, dict(workspace_bytes=3000),
                                  softcap=3.0),
    "softcap_fp16_ignore0": Case(29, 32, 61, "float16", False, 0.3, False, 0, dict(workspace_bytes=3000),
                                 softcap=4.0),
    "softcap_many_slabs_bf16": Case(24, 32, 800, "bfloat16", True, 0.1, False, -100, dict(workspace_bytes=1800),
                                    softcap=3.0),
    "grad_sum_bf16": Case(37, 48, 83, "bfloat16", False, 0.2, False, -100, dict(workspace_bytes=4000),
                          grad_sum="smooth"),
    "grad_sum_fp32_bias_lse": Case(19, 40, 70, "float32", True, 0.3, True, -100, dict(workspace_bytes=3000),
                                   grad_sum="randn"),
    "softcap_grad_sum_bf16_bias_lse": Case(37, 48, 83, "bfloat16", True, 0.2, True, -100,
                                           dict(workspace_bytes=4000), softcap=3.0, grad_sum="smooth"),
    "softcap_grad_sum_fp32": Case(19, 40, 70, "float32", False, 0.3, False, -100, dict(workspace_bytes=3000),
                                  softcap=4.0, grad_sum="randn"),
    # grad_sum_logits is not masked on ignored tokens: gradients are nonzero although every token is ignored
    "softcap_grad_sum_all_ignored_bias": Case(21, 40, 70, "bfloat16", True, "all", True, -100,
                                              dict(workspace_bytes=3000), softcap=3.0, grad_sum="randn"),
    "cublas_forward_softcap_bias": Case(37, 48, 83, "bfloat16", True, 0.2, True, -100,
                                        dict(workspace_bytes=4000, forward="cublas"), softcap=3.0),
    "cublas_forward_softcap_fp32": Case(19, 40, 70, "float32", True, 0.3, False, -100,
                                        dict(workspace_bytes=3000, forward="cublas"), softcap=3.0,
                                        grad_sum="smooth"),
    "fused_grad_logits_softcap_grad_sum_bias": Case(37, 48, 83, "bfloat16", True, 0.2, True, -100,
                                                    dict(workspace_bytes=4000, grad_logits="fused"), softcap=3.0,
                                                    grad_sum="smooth"),
    "fused_grad_logits_softcap_fp32": Case(19, 40, 70, "float32", False, 0.3, True, -100,
                                           dict(workspace_bytes=3000, grad_logits="fused"), softcap=4.0),
    "row_groups_softcap_grad_sum_bias": Case(37, 48, 83, "bfloat16", True, 0.2, True, -100,
                                             dict(workspace_bytes=3000, row_groups=2), softcap=3.0,
                                             grad_sum="smooth"),
}


def make_inputs(N, D, V, dtype, bias, frac, grad_lse, ignore_index, seed=0, device="cpu", grad_sum=None):
    """(hidden, weight, bias, target, grad_loss, grad_lse, grad_sum_logits); bias / grad_lse / grad_sum may be None."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    hidden = torch.randn(N, D, generator=g).to(dtype)
    weight = (torch.randn(V, D, generator=g) * D**-0.5 * 2).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, V, (N,), generator=g)
    if frac == "all":
        target.fill_(ignore_index)
    else:
        target[torch.rand(N, generator=g) < frac] = ignore_index
    grad_loss = torch.randn(N, generator=g)
    glse = torch.randn(N, generator=g) * 0.3 if grad_lse else None
    gsum = None
    if grad_sum is not None:
        gsum = torch.randn(N, generator=g) * ({"smooth": 1.0 / V, "randn": 0.3}[grad_sum])
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return tuple(move(t) for t in (hidden, weight, b, target, grad_loss, glse, gsum))


def case_inputs(case: Case):
    return make_inputs(case.N, case.D, case.V, case.dtype, case.bias, case.frac, case.grad_lse, case.ignore_index,
                       grad_sum=case.grad_sum)


def run_ops(inputs, ignore_index, settings, softcap=0.0):
    """Our two ops (the triton_op entry points) on ``inputs``, with ``settings`` applied:
    (loss, lse, sum_logits, grad_hidden, grad_weight, grad_bias)."""
    from inductor_lce.lowerings import SETTINGS

    hidden, weight, bias, target, grad_loss, grad_lse, grad_sum = inputs
    saved = {k: getattr(SETTINGS, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(SETTINGS, k, v)
        loss, lse, sum_logits = torch.ops.inductor_lce.lce_forward_triton(hidden, weight, bias, target,
                                                                          ignore_index, softcap)
        grads = torch.ops.inductor_lce.lce_backward_triton(grad_loss, grad_lse, grad_sum, hidden, weight, bias,
                                                            target, lse, ignore_index, softcap)
    finally:
        for k, v in saved.items():
            setattr(SETTINGS, k, v)
    return (loss, lse, sum_logits) + tuple(grads)


if triton is not None:

    @triton.jit
    def _tanh_probe_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):  # y = tanh_f32(x), for the accuracy test
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        tl.store(y_ptr + offs, tanh_f32(tl.load(x_ptr + offs, mask=ok, other=0.0)), mask=ok)


def tanh_probe_inputs():
    """fp32 x over |x| in [1e-30, 1e4] (log-spaced) and [0, 12] (linear, both tanh branches), both signs."""
    mag = torch.cat([torch.logspace(-30, 4, 100001, dtype=torch.float64),
                     torch.linspace(0, 12, 100001, dtype=torch.float64)])
    return torch.cat([mag, -mag, torch.tensor([0.55, 0.5499999, 0.5500001])]).float()


def _worker(out_path):
    """Subprocess body (TRITON_INTERPRET=1 is set before anything imports triton)."""
    torch.set_num_threads(1)
    import inductor_lce.lowerings as L

    assert L.AVAILABLE and L._impl.INTERPRET, L.UNAVAILABLE_REASON
    results = {}
    for name, case in CASES.items():
        results[name] = run_ops(case_inputs(case), case.ignore_index, case.settings, case.softcap)
    x = tanh_probe_inputs()
    y = torch.empty_like(x)
    _tanh_probe_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    results["__tanh__"] = (x, y)
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted():
    """{case: outputs} from the interpreted kernels (one worker process for all cases)."""
    pytest.importorskip("triton")
    already = os.environ.get("TRITON_INTERPRET") == "1" and "triton" in sys.modules
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.pt")
        if already:
            _worker(out)
        else:
            env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
                [ROOT, os.environ.get("PYTHONPATH", "")]))
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", out], env=env,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return torch.load(out)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def exact_reference(inputs, ignore_index, softcap=0.0):
    """float64 math on the same inputs, logits rounded to the input dtype like F.linear (then soft-capped in
    float64): (loss, lse, sum_logits, gh, gw, gb)."""
    hidden, weight, bias, target, grad_loss, grad_lse, grad_sum = inputs
    z = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    z = z.to(hidden.dtype).double()
    s = softcap * torch.tanh(z / softcap) if softcap else z
    lse = torch.logsumexp(s, -1)
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    loss = torch.where(valid, lse - s.gather(1, safe[:, None])[:, 0], 0.0)
    g = torch.where(valid, grad_loss.double(), 0.0)
    gt = g + (0 if grad_lse is None else grad_lse.double())
    grad_s = torch.softmax(s, -1) * gt[:, None]
    grad_s[torch.arange(len(g), device=g.device), safe] -= g
    if grad_sum is not None:
        grad_s += grad_sum.double()[:, None]
    grad_logits = grad_s * (1 - torch.tanh(z / softcap) ** 2) if softcap else grad_s
    return (loss, lse, s.sum(-1), grad_logits @ weight.double(), grad_logits.T @ hidden.double(),
            grad_logits.sum(0))


def reference_ops(inputs, ignore_index, softcap=0.0, chunk_size=None):
    """reference.py (what the CPU ops run): (loss, lse, sum_logits, gh, gw, gb or None)."""
    from inductor_lce.reference import lce_backward_reference, lce_forward_reference

    hidden, weight, bias, target, grad_loss, grad_lse, grad_sum = inputs
    fwd = lce_forward_reference(hidden, weight, bias, target, ignore_index, softcap, chunk_size=chunk_size)
    grads = lce_backward_reference(grad_loss, grad_lse, grad_sum, hidden, weight, bias, target, fwd[1],
                                   ignore_index, softcap, chunk_size=chunk_size)
    return tuple(fwd) + tuple(grads)


def eager_like(inputs, ignore_index, softcap=0.0):
    """What eager PyTorch computes in the input dtype (one rounding of grad_logits and of each grad)."""
    return reference_ops(inputs, ignore_index, softcap, chunk_size=len(inputs[3]) or 1)


def check_outputs(got, inputs, ignore_index, case="", row_groups=1, softcap=0.0):
    """got = (loss, lse, sum_logits, grad_hidden, grad_weight, grad_bias). row_groups > 1 adds one bf16
    rounding of grad_weight per group: its bounds are 5e-3 / 1.5x eager."""
    hidden, weight, bias, target, grad_loss, grad_lse, grad_sum = inputs
    N, D = hidden.shape
    V = weight.shape[0]
    on_cpu = hidden.device.type == "cpu"
    assert len(got) == 6, case
    loss, lse, sum_logits, gh, gw, gb = got
    for t in (loss, lse, sum_logits):
        assert t.shape == (N,) and t.dtype == torch.float32, case
    assert gh.shape == (N, D) and gh.dtype == hidden.dtype
    assert gw.shape == (V, D) and gw.dtype == weight.dtype
    assert gb.shape == ((V,) if bias is not None else (0,))
    for t in got:
        assert torch.isfinite(t.float()).all(), case
    assert (loss[target == ignore_index] == 0).all(), case
    if softcap:
        assert (lse <= softcap + torch.log(torch.tensor(float(V))) + 1e-4).all(), case
        assert (sum_logits.abs() <= softcap * V * (1 + 1e-6)).all(), case
    exact = exact_reference(inputs, ignore_index, softcap)
    pairs = [(loss, exact[0]), (lse, exact[1]), (sum_logits, exact[2]), (gh, exact[3]), (gw, exact[4])] + (
        [(gb, exact[5])] if bias is not None else [])
    if hidden.dtype == torch.float32:
        for i, (a, r) in enumerate(pairs):
            assert rel(a, r) <= 1e-5 or (a.double() - r).abs().max() <= 1e-6, (case, i, rel(a, r))
        return
    ref = reference_ops(inputs, ignore_index, softcap)
    for i in (0, 1):
        assert (got[i] - ref[i]).abs().max() <= 1e-3, (case, i, (got[i] - ref[i]).abs().max())
    # sum_logits: fp32 sums of the same scores in another order (CPU; on the GPU also logits whose bf16
    # rounding flipped: a whole bf16 ulp each)
    assert rel(sum_logits, ref[2]) <= (1e-5 if on_cpu else 1e-3), (case, 2, rel(sum_logits, ref[2]))
    for i in (3, 4, 5):
        if ref[i] is None:
            continue
        if ref[i].float().norm() == 0:
            assert got[i].float().abs().max() == 0, (case, i)
            continue
        tol = 1e-3 if on_cpu else 3e-3
        tol = 5e-3 if (i == 4 and row_groups > 1) else tol
        assert rel(got[i], ref[i]) <= tol, (case, i, rel(got[i], ref[i]))
    # precision: the error against float64 math may not exceed eager's own by more than 10% on the CPU
    # (measured: equal to 3 digits) or 25% on the GPU, plus a little
    eager = eager_like(inputs, ignore_index, softcap)
    factor, slack = (1.1, 1e-5) if on_cpu else (1.25, 1e-4)
    for i, (a, r) in enumerate(pairs):
        if r.norm() == 0:
            continue
        extra = (1e-6 if on_cpu else 1e-4) if i < 3 else slack
        f = 1.5 if (i == 4 and row_groups > 1) else factor
        assert rel(a, r) <= f * rel(eager[i], r) + extra, (case, i, rel(a, r), rel(eager[i], r))


@pytest.mark.parametrize("case", list(CASES))
def test_interpreted_kernels_match_reference(interpreted, case):
    c = CASES[case]
    check_outputs(interpreted[case], case_inputs(c), c.ignore_index, case,
                  row_groups=c.settings.get("row_groups", 1), softcap=c.softcap)


def test_interpreted_tanh_accuracy(interpreted):
    """The kernels' fp32 tanh (``_tanh.tanh_f32``, exp2 + polynomial) against float64, next to torch.tanh:
    measured 1.6 ulps at most (torch.tanh on the CPU: 0.51); +-1 exactly where it saturates, odd, tanh(0) = 0."""
    x, y = interpreted["__tanh__"]
    exact = torch.tanh(x.double())
    ulp = (torch.nextafter(exact.float().abs(), torch.tensor(float("inf"))) - exact.float().abs()).double()
    ulps = (y.double() - exact).abs() / ulp
    assert ulps.max() <= 2.0, (ulps.max().item(), x[ulps.argmax()].item())
    nonzero = x != 0
    assert ((y.double() - exact).abs() / exact.abs())[nonzero].max() <= 2.5e-7
    assert ((y - torch.tanh(x)).abs() <= 3 * ulp).all()
    assert (y[x.abs() >= 10] == torch.sign(x[x.abs() >= 10])).all()
    assert (y[x == 0] == 0).all()
    m = (x.numel() - 3) // 2  # the magnitudes, then their negatives, then 3 points around the branch switch
    assert torch.equal(y[:m], -y[m: 2 * m])


def test_ops_for_cpu_is_reference():
    from inductor_lce.lowerings import ops_for

    assert ops_for("cpu") == (torch.ops.inductor_lce.lce_forward.default,
                              torch.ops.inductor_lce.lce_backward.default)


def test_ops_for_cuda_schema_matches_reference():
    import inductor_lce.lowerings as L

    if not L.AVAILABLE:
        pytest.skip(f"triton lowering unavailable: {L.UNAVAILABLE_REASON}")
    fwd, bwd = L.ops_for("cuda")
    ref_f, ref_b = torch.ops.inductor_lce.lce_forward.default, torch.ops.inductor_lce.lce_backward.default
    strip = lambda s: str(s).split("(", 1)[1]  # noqa: E731  (drop the op name)
    assert strip(fwd._schema) == strip(ref_f._schema)
    assert strip(bwd._schema) == strip(ref_b._schema)


def test_backward_plan_fits_workspace():
    import inductor_lce.lowerings as L

    if not L.AVAILABLE:
        pytest.skip(f"triton lowering unavailable: {L.UNAVAILABLE_REASON}")
    mib = 2**20
    for N, D, V in [(8192, 2304, 256000), (8192, 4096, 128256), (16384, 2048, 32000)]:
        plan = L._impl.plan_backward(N, D, V, torch.bfloat16, workspace=56 * mib, state="auto")
        assert plan.workspace_bytes <= 56 * mib and plan.mode == L._impl.MODE_COMPENSATED, plan
        assert plan.slab % 32 == 0 and plan.slab >= 256


def _sm90_builds():
    from inductor_lce.lowerings._config import configs

    common = dict(DOT_FP32=False, DOT_PRECISION="tf32")
    f, g, h = (configs(k)[0] for k in ("lse_forward", "grad_logits", "grad_hidden"))
    blk = lambda c: dict(c.kwargs)  # noqa: E731
    plain = dict(HAS_SOFTCAP=False)  # what softcap=0 launches: the soft-cap code is compiled out
    capped = dict(HAS_SOFTCAP=True)
    return [
        ("lse_forward", dict(bias_ptr=None, HAS_BIAS=False, EVEN_K=True, **plain, **common, **blk(f)), f, True),
        ("lse_forward", dict(HAS_BIAS=True, EVEN_K=False, **capped, **common, **blk(f)), f, True),
        ("grad_logits", dict(grad_sum_ptr=None, HAS_BIAS=True, HAS_GRAD_LSE=True, HAS_GRAD_SUM=False, EVEN_K=False,
                             GROUP_M=8, **plain, **common, **blk(g)), g, True),
        ("grad_logits", dict(HAS_BIAS=True, HAS_GRAD_LSE=True, HAS_GRAD_SUM=True, EVEN_K=True, GROUP_M=8, **capped,
                             **common, **blk(g)), g, True),
        ("grad_hidden", dict(MODE=1, FIRST=False, LAST=False, EVEN_K=True, EVEN_D=True, GROUP_M=8, **common,
                             **blk(h)), h, True),
        ("grad_hidden", dict(MODE=0, FIRST=False, LAST=True, EVEN_K=False, EVEN_D=False, GROUP_M=8, **common,
                             **blk(h)), h, True),
        ("lse_update", dict(FIRST=False, BLOCK_M=16, BLOCK_N=512, **plain), None, False),
        ("lse_update", dict(FIRST=True, BLOCK_M=16, BLOCK_N=512, **capped), None, False),
        ("grad_logits_inplace", dict(grad_lse_ptr=None, grad_sum_ptr=None, HAS_BIAS=True, HAS_GRAD_LSE=False,
                                     HAS_GRAD_SUM=False, EMULATE_ROUNDING=False, BLOCK_M=16, BLOCK_N=512, **plain),
         None, False),
        ("grad_logits_inplace", dict(HAS_BIAS=True, HAS_GRAD_LSE=True, HAS_GRAD_SUM=True, EMULATE_ROUNDING=False,
                                     BLOCK_M=16, BLOCK_N=512, **capped), None, False),
    ]


def test_kernels_build_for_hopper_offline():
    """Each kernel compiles for sm_90 (Triton front end, TTGIR, PTX, ptxas) without a GPU, and the GEMM
    kernels use wgmma: catches errors the interpreter does not (e.g. non-constexpr globals)."""
    pytest.importorskip("triton")
    import importlib

    import inductor_lce.lowerings as L

    if not L.AVAILABLE or L._impl.INTERPRET:
        pytest.skip("needs the compiled (not interpreted) Triton kernels")
    try:
        from inductor_lce.lowerings._compile_check import compile_sm90
    except ImportError as e:
        pytest.skip(f"no Triton NVIDIA backend here: {e}")
    for name, const, cfg, gemm in _sm90_builds():
        fn = getattr(importlib.import_module(f"inductor_lce.lowerings.{name}"), f"{name}_kernel_jit")
        warps, stages = (cfg.num_warps, cfg.num_stages) if cfg else (4, 1)
        types = {"state_ptr": "*i8", "lo_ptr": "*i8"} if const.get("MODE") == 1 else {
            "state_ptr": "*fp32", "lo_ptr": "*fp32"}
        kernel = compile_sm90(fn, const, warps, stages, ptr_types=types)
        if gemm:
            assert "wgmma.mma_async" in kernel.asm["ptx"], name


# ------------------------------------------------------------------------------------------------ GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_inputs(N, D, V, bias, glse, dtype=torch.bfloat16, seed=0, grad_sum=None):
    return make_inputs(N, D, V, dtype, bias, 0.1, glse, -100, seed=seed, device="cuda", grad_sum=grad_sum)


@cuda
@pytest.mark.parametrize("shape,bias,glse,softcap,gsum", [
    ((4099, 2304, 32000), False, False, 0.0, None), ((1000, 1024, 50257), True, True, 0.0, None),
    ((1, 256, 1000), False, True, 0.0, None), ((1000, 1024, 50257), True, True, 5.0, "smooth")])
def test_cuda_ops_match_reference(shape, bias, glse, softcap, gsum):
    import inductor_lce.lowerings as L

    assert L.AVAILABLE, L.UNAVAILABLE_REASON
    inputs = _gpu_inputs(*shape, bias, glse, grad_sum=gsum)
    got = run_ops(inputs, -100, {}, softcap)
    check_outputs(got, inputs, -100, str(shape), softcap=softcap)  # references (fp64, reference.py) on the GPU too


@cuda
@pytest.mark.parametrize("softcap,smoothing", [(None, 0.0), (5.0, 0.1)])
def test_cuda_eager_op_is_triton_and_matches(softcap, smoothing):
    import inductor_lce

    h, w, b, y, _, _, _ = _gpu_inputs(2048, 1024, 32000, False, False)
    h.requires_grad_(), w.requires_grad_()
    loss = inductor_lce.linear_cross_entropy(h, w, y, softcap=softcap, label_smoothing=smoothing)
    loss.backward()
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    z = hf @ wf.T
    z = softcap * torch.tanh(z / softcap) if softcap else z
    ref = torch.nn.functional.cross_entropy(z, y, label_smoothing=smoothing)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-2
    assert rel(h.grad, hf.grad) < 1e-2 and rel(w.grad, wf.grad) < 1e-2


@cuda
@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_cuda_triton_op_under_compile(softcap):
    import inductor_lce.lowerings  # noqa: F401

    h, w, b, y, _, _, _ = _gpu_inputs(1024, 512, 20000, True, False)
    h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    V = w.shape[0]

    def f(h, w, b, y):  # z-loss on lse and label smoothing's sum_logits term: all three outputs get gradients
        loss, lse, sum_logits = torch.ops.inductor_lce.lce_forward_triton(h, w, b, y, -100, softcap)
        return loss.sum() / (y != -100).sum() + 1e-4 * (lse**2).mean() - 0.1 / V * sum_logits.mean()

    out = torch.compile(f, fullgraph=True)(h, w, b, y)
    out.backward()
    got = (out.detach(), h.grad.clone(), w.grad.clone(), b.grad.clone())
    h.grad = w.grad = b.grad = None
    hf, wf, bf = (t.detach().float().requires_grad_() for t in (h, w, b))
    z = torch.nn.functional.linear(hf, wf, bf)
    z = softcap * torch.tanh(z / softcap) if softcap else z
    ref = (torch.nn.functional.cross_entropy(z, y) + 1e-4 * (torch.logsumexp(z, -1) ** 2).mean()
           - 0.1 / V * z.sum(-1).mean())
    ref.backward()
    assert abs(got[0].item() - ref.item()) < 1e-2
    for a, r in zip(got[1:], (hf.grad, wf.grad, bf.grad)):
        assert rel(a, r) < 1e-2


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.path.insert(0, ROOT)
    _worker(sys.argv[2])
