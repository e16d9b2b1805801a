"""What each family becomes: the fused op calls in the joint graph after the pass, one block per family.

The full before/after graphs of the basic patterns and of each op feature are in test_pass_snapshots.py;
here every family of test_families.py (and HF models) is summarised by its ``lce_forward`` /
``lce_backward`` calls: how many sites, which hidden / weight / bias / targets, which gradients flow in
(grad_loss, grad_lse for z-loss / label smoothing, grad_sum_logits), and the soft-cap.
Regenerate with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_family_snapshots.py``.
"""
import re

import pytest
import torch
from expecttest import TestCase

import inductor_lce
import test_families as F
from helpers import compile_recorded, rewrites, skips
from torch._dynamo.utils import counters


def _op_lines(fn, args, **options):
    torch._dynamo.reset()
    counters.clear()
    compiled, rec = compile_recorded(fn, options=inductor_lce.options(**options) if options else None)
    out = compiled(*args)
    (out.loss if hasattr(out, "loss") else out).backward()
    assert rewrites() >= 1 and not skips(), skips()
    after = rec["joint_after"].graphs[0][1]
    return [line.split(" = ", 1)[1] for line in after.splitlines() if "inductor_lce." in line]


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(F.B, F.T, F.D, generator=g).to(dtype).requires_grad_()
    w = torch.randn(F.V, F.D, generator=g).to(dtype).requires_grad_()
    return h, w, torch.randint(0, F.V, (F.B, F.T), generator=g)


class TestFamilySnapshots(TestCase):
    def test_families(self):
        blocks = []
        for fn, _ in F.FAMILIES + F.FEATURES:
            blocks.append(f"# {fn.__name__}\n" + "\n".join(_op_lines(fn, _inputs())))
        blocks.append("# nanogpt_no_float (bf16, low_precision_logits=True)\n" + "\n".join(
            _op_lines(F.nanogpt_no_float, _inputs(torch.bfloat16), low_precision_logits=True)))
        self.assertExpectedInline("\n".join(blocks), """\
# linear_bias
inductor_lce.lce_fused(view, primals_2, primals_3, view_3, div_tensor, -100, 0.0)
# none_then_weighted
inductor_lce.lce_forward(view, primals_2, None, view_3, -100, 0.0)
inductor_lce.lce_backward(reshape_default, None, None, view, primals_2, None, view_3, getitem_1, -100, 0.0)
# ce_module
inductor_lce.lce_fused(view, primals_2, None, view_3, div_tensor, -100, 0.0)
# log_softmax_then_nll
inductor_lce.lce_fused(view, primals_2, None, view_3, div_tensor, -100, 0.0)
# multi_token_prediction
inductor_lce.lce_fused(view, primals_2, None, view_3, div_tensor, -100, 0.0)
inductor_lce.lce_fused(view_4, primals_2, None, view_7, div_tensor_1, -100, 0.0)
# tied_embeddings
inductor_lce.lce_fused(view, primals_2, None, view_3, div_tensor, -100, 0.0)
# torchtune_chunked
inductor_lce.lce_fused(view, primals_3, None, view_3, div_tensor, -100, 0.0)
inductor_lce.lce_fused(view_4, primals_3, None, view_7, div_tensor_1, -100, 0.0)
inductor_lce.lce_fused(view_8, primals_3, None, view_11, div_tensor_2, -100, 0.0)
inductor_lce.lce_fused(view_12, primals_3, None, view_15, div_tensor_3, -100, 0.0)
# checkpointed_head
inductor_lce.lce_fused(view, primals_2, None, view_3, div_tensor, -100, 0.0)
# grad_accumulation
inductor_lce.lce_fused(getitem, primals_3, None, getitem_2, div_tensor_1, -100, 0.0)
inductor_lce.lce_fused(getitem_1, primals_3, None, getitem_3, div_tensor_3, -100, 0.0)
# label_smoothing
inductor_lce.lce_forward(view, primals_2, None, view_3, -100, 0.0)
inductor_lce.lce_backward(reshape_default, neg_default, reshape_default_1, view, primals_2, None, view_3, getitem_1, -100, 0.0)
# label_smoothing_sum_shifted
inductor_lce.lce_forward(view, primals_2, None, scatter_src, -100, 0.0)
inductor_lce.lce_backward(scatter_src_1, neg_default, scatter_src_2, view, primals_2, None, scatter_src, getitem_1, -100, 0.0)
# label_smoothing_none
inductor_lce.lce_forward(view, primals_2, None, view_3, -100, 0.0)
inductor_lce.lce_backward(reshape_default, neg_default, reshape_default_1, view, primals_2, None, view_3, getitem_1, -100, 0.0)
# z_loss_palm
inductor_lce.lce_forward(view, primals_2, None, view_3, -100, 0.0)
inductor_lce.lce_backward(reshape_default, reshape_default_1, None, view, primals_2, None, view_3, getitem_1, -100, 0.0)
# z_loss_olmo
inductor_lce.lce_forward(view, primals_2, None, view_3, -100, 0.0)
inductor_lce.lce_backward(reshape_default_1, reshape_default_2, None, view, primals_2, None, view_3, getitem_1, -100, 0.0)
# softcap_gemma
inductor_lce.lce_fused(view, primals_2, None, view_3, div_tensor, -100, 3.0)
# everything
inductor_lce.lce_forward(view, primals_3, primals_1, scatter_src, -100, 5.0)
inductor_lce.lce_backward(scatter_src_1, add_tensor, scatter_src_2, view, primals_3, primals_1, scatter_src, getitem_1, -100, 5.0)
# nanogpt_no_float (bf16, low_precision_logits=True)
inductor_lce.lce_fused(view, primals_2, None, view_3, convert_element_type_default, -1, 0.0)""")

    def test_hf_models(self):
        pytest.importorskip("transformers")
        import test_hf_models as H

        blocks = []
        for name in ("llama", "gemma2"):
            model = H._model(name)
            ids = torch.randint(0, H.V, (2, H.T), generator=torch.Generator().manual_seed(1))
            lines = _op_lines(lambda i, l: model(input_ids=i, labels=l).loss, (ids, ids))
            # node numbers depend on the transformers version's model code: the snapshot keeps the op's structure
            blocks.append(f"# {name}\n" + "\n".join(re.sub(r"_\d+\b", "_N", line) for line in lines))
        self.assertExpectedInline("\n".join(blocks), """\
# llama
inductor_lce.lce_fused(view_N, primals_N, None, view_N, div_tensor, -100, 0.0)
# gemma2
inductor_lce.lce_fused(view_N, primals_N, None, view_N, div_tensor, -100, 30.0)""")
