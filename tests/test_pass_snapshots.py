"""The graphs before and after the pass: the documentation of what is matched.

Joint graphs (training) lose every [N, V] node, forward and backward, and gain
``lce_forward`` / ``lce_backward``; the user's reduction (sum / count) stays as it was.
Regenerate with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/test_pass_snapshots.py``.
"""
import torch
import torch.nn.functional as F
from expecttest import TestCase

import loss_patterns as P
from helpers import compile_recorded, rewrites
from torch._dynamo.utils import counters

V, D = 11, 4


def _compile_and_run(fn, h, w, y, grad=True):
    torch._dynamo.reset()
    counters.clear()
    compiled, rec = compile_recorded(fn)
    if grad:
        compiled(h, w, y).backward()
    else:
        with torch.no_grad():
            compiled(h, w, y)
    assert rewrites() == 1
    before = rec["joint_before"].graphs[0][1]
    after = rec["joint_after"].graphs[0][1]
    return before, after


class TestSnapshots(TestCase):
    def test_plain_2d_joint(self):
        h = torch.randn(6, D, requires_grad=True)
        w = torch.randn(V, D, requires_grad=True)
        y = torch.randint(0, V, (6,))
        before, after = _compile_and_run(P.plain_2d, h, w, y)
        self.assertExpectedInline(before, """\
primals_1: float32[6, 4] = input
primals_2: float32[11, 4] = input
primals_3: int64[6] = input
tangents_1: float32[] = input
permute: float32[4, 11] = aten.permute(primals_2, [1, 0])
mm: float32[6, 11] = aten.mm(primals_1, permute)
amax: float32[6, 1] = aten.amax(mm, [1], True)
sub: float32[6, 11] = aten.sub.Tensor(mm, amax)
exp: float32[6, 11] = aten.exp(sub)
sum_1: float32[6, 1] = aten.sum.dim_IntList(exp, [1], True)
log: float32[6, 1] = aten.log(sum_1)
sub_1: float32[6, 11] = aten.sub.Tensor(sub, log)
alias: float32[6, 11] = aten.alias(sub_1)
ne: bool[6] = aten.ne.Scalar(primals_3, -100)
scalar_tensor: int64[] = aten.scalar_tensor(0, dtype=int64)
where: int64[6] = aten.where.self(ne, primals_3, scalar_tensor)
unsqueeze: int64[6, 1] = aten.unsqueeze(where, 1)
gather: float32[6, 1] = aten.gather(sub_1, 1, unsqueeze)
squeeze: float32[6] = aten.squeeze.dim(gather, 1)
neg: float32[6] = aten.neg(squeeze)
ne_1: bool[6] = aten.ne.Scalar(primals_3, -100)
scalar_tensor_1: float32[] = aten.scalar_tensor(0, dtype=float32)
where_1: float32[6] = aten.where.self(ne_1, neg, scalar_tensor_1)
ne_2: bool[6] = aten.ne.Scalar(primals_3, -100)
sum_2: int64[] = aten.sum(ne_2)
convert_element_type: float32[] = prims.convert_element_type(sum_2, float32)
sum_3: float32[] = aten.sum(where_1)
div: float32[] = aten.div.Tensor(sum_3, convert_element_type)
div_1: float32[] = aten.div.Tensor(tangents_1, convert_element_type)
unsqueeze_1: int64[6, 1] = aten.unsqueeze(primals_3, 1)
ne_3: bool[6, 1] = aten.ne.Scalar(unsqueeze_1, -100)
scalar_tensor_2: int64[] = aten.scalar_tensor(0, dtype=int64)
where_2: int64[6, 1] = aten.where.self(ne_3, unsqueeze_1, scalar_tensor_2)
full: float32[6, 11] = aten.full([6, 11], 0, dtype=float32)
scatter: float32[6, 11] = aten.scatter.value(full, 1, where_2, -1.0)
ne_4: bool[6, 1] = aten.ne.Scalar(unsqueeze_1, -100)
scalar_tensor_3: float32[] = aten.scalar_tensor(0, dtype=float32)
where_3: float32[6, 1] = aten.where.self(ne_4, div_1, scalar_tensor_3)
mul: float32[6, 11] = aten.mul.Tensor(scatter, where_3)
alias_1: float32[6, 11] = aten.alias(alias)
exp_1: float32[6, 11] = aten.exp(alias_1)
sum_4: float32[6, 1] = aten.sum.dim_IntList(mul, [1], True)
mul_1: float32[6, 11] = aten.mul.Tensor(exp_1, sum_4)
sub_2: float32[6, 11] = aten.sub.Tensor(mul, mul_1)
permute_1: float32[11, 6] = aten.permute(sub_2, [1, 0])
mm_1: float32[11, 4] = aten.mm(permute_1, primals_1)
permute_2: float32[4, 11] = aten.permute(mm_1, [1, 0])
permute_3: float32[11, 4] = aten.permute(permute, [1, 0])
mm_2: float32[6, 4] = aten.mm(sub_2, permute_3)
permute_4: float32[11, 4] = aten.permute(permute_2, [1, 0])
return [div, mm_2, permute_4, None]""")
        self.assertExpectedInline(after, """\
primals_1: float32[6, 4] = input
primals_2: float32[11, 4] = input
primals_3: int64[6] = input
tangents_1: float32[] = input
lce_forward_default: (float32[6], float32[6]) = inductor_lce.lce_forward(primals_1, primals_2, None, primals_3, -100)
getitem: float32[6] = getitem(lce_forward_default, 0)
getitem_1: float32[6] = getitem(lce_forward_default, 1)
ne_2: bool[6] = aten.ne.Scalar(primals_3, -100)
sum_2: int64[] = aten.sum(ne_2)
convert_element_type: float32[] = prims.convert_element_type(sum_2, float32)
sum_3: float32[] = aten.sum(getitem)
div: float32[] = aten.div.Tensor(sum_3, convert_element_type)
div_1: float32[] = aten.div.Tensor(tangents_1, convert_element_type)
unsqueeze_1: int64[6, 1] = aten.unsqueeze(primals_3, 1)
ne_4: bool[6, 1] = aten.ne.Scalar(unsqueeze_1, -100)
scalar_tensor_3: float32[] = aten.scalar_tensor(0, dtype=float32)
where_3: float32[6, 1] = aten.where.self(ne_4, div_1, scalar_tensor_3)
reshape_default: float32[6] = aten.reshape(where_3, [-1])
lce_backward_default: (float32[6, 4], float32[11, 4], float32[0]) = inductor_lce.lce_backward(reshape_default, None, primals_1, primals_2, None, primals_3, getitem_1, -100)
getitem_2: float32[6, 4] = getitem(lce_backward_default, 0)
getitem_3: float32[11, 4] = getitem(lce_backward_default, 1)
permute_2: float32[4, 11] = aten.permute(getitem_3, [1, 0])
permute_4: float32[11, 4] = aten.permute(permute_2, [1, 0])
return [div, getitem_2, permute_4, None]""")

    def test_shift_slice_bf16_joint(self):
        h = torch.randn(2, 3, D, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(V, D, dtype=torch.bfloat16, requires_grad=True)
        y = torch.randint(0, V, (2, 3))
        before, after = _compile_and_run(P.shift_slice, h, w, y)
        self.assertExpectedInline(before, """\
primals_1: bfloat16[2, 3, 4] = input
primals_2: bfloat16[11, 4] = input
primals_3: int64[2, 3] = input
tangents_1: float32[] = input
permute: bfloat16[4, 11] = aten.permute(primals_2, [1, 0])
view: bfloat16[6, 4] = aten.view(primals_1, [6, 4])
mm: bfloat16[6, 11] = aten.mm(view, permute)
view_1: bfloat16[2, 3, 11] = aten.view(mm, [2, 3, 11])
convert_element_type_2: float32[2, 3, 11] = prims.convert_element_type(view_1, float32)
slice_1: float32[2, 2, 11] = aten.slice.Tensor(convert_element_type_2, 1, 0, -1)
clone: float32[2, 2, 11] = aten.clone(slice_1, memory_format=torch.contiguous_format)
slice_2: int64[2, 2] = aten.slice.Tensor(primals_3, 1, 1, 9223372036854775807)
clone_1: int64[2, 2] = aten.clone(slice_2, memory_format=torch.contiguous_format)
view_2: float32[4, 11] = aten.view(clone, [-1, 11])
view_3: int64[4] = aten.view(clone_1, [-1])
amax: float32[4, 1] = aten.amax(view_2, [1], True)
sub: float32[4, 11] = aten.sub.Tensor(view_2, amax)
exp: float32[4, 11] = aten.exp(sub)
sum_1: float32[4, 1] = aten.sum.dim_IntList(exp, [1], True)
log: float32[4, 1] = aten.log(sum_1)
sub_1: float32[4, 11] = aten.sub.Tensor(sub, log)
alias: float32[4, 11] = aten.alias(sub_1)
ne: bool[4] = aten.ne.Scalar(view_3, -100)
scalar_tensor: int64[] = aten.scalar_tensor(0, dtype=int64)
where: int64[4] = aten.where.self(ne, view_3, scalar_tensor)
unsqueeze: int64[4, 1] = aten.unsqueeze(where, 1)
gather: float32[4, 1] = aten.gather(sub_1, 1, unsqueeze)
squeeze: float32[4] = aten.squeeze.dim(gather, 1)
neg: float32[4] = aten.neg(squeeze)
ne_1: bool[4] = aten.ne.Scalar(view_3, -100)
scalar_tensor_1: float32[] = aten.scalar_tensor(0, dtype=float32)
where_1: float32[4] = aten.where.self(ne_1, neg, scalar_tensor_1)
ne_2: bool[4] = aten.ne.Scalar(view_3, -100)
sum_2: int64[] = aten.sum(ne_2)
convert_element_type_3: float32[] = prims.convert_element_type(sum_2, float32)
sum_3: float32[] = aten.sum(where_1)
div: float32[] = aten.div.Tensor(sum_3, convert_element_type_3)
div_1: float32[] = aten.div.Tensor(tangents_1, convert_element_type_3)
unsqueeze_1: int64[4, 1] = aten.unsqueeze(view_3, 1)
ne_3: bool[4, 1] = aten.ne.Scalar(unsqueeze_1, -100)
scalar_tensor_2: int64[] = aten.scalar_tensor(0, dtype=int64)
where_2: int64[4, 1] = aten.where.self(ne_3, unsqueeze_1, scalar_tensor_2)
full: float32[4, 11] = aten.full([4, 11], 0, dtype=float32)
scatter: float32[4, 11] = aten.scatter.value(full, 1, where_2, -1.0)
ne_4: bool[4, 1] = aten.ne.Scalar(unsqueeze_1, -100)
scalar_tensor_3: float32[] = aten.scalar_tensor(0, dtype=float32)
where_3: float32[4, 1] = aten.where.self(ne_4, div_1, scalar_tensor_3)
mul: float32[4, 11] = aten.mul.Tensor(scatter, where_3)
alias_1: float32[4, 11] = aten.alias(alias)
exp_1: float32[4, 11] = aten.exp(alias_1)
sum_4: float32[4, 1] = aten.sum.dim_IntList(mul, [1], True)
mul_1: float32[4, 11] = aten.mul.Tensor(exp_1, sum_4)
sub_2: float32[4, 11] = aten.sub.Tensor(mul, mul_1)
view_4: float32[2, 2, 11] = aten.view(sub_2, [2, 2, 11])
full_1: float32[2, 3, 11] = aten.full([2, 3, 11], 0, dtype=float32)
slice_scatter: float32[2, 3, 11] = aten.slice_scatter(full_1, view_4, 1, 0, -1)
convert_element_type_4: bfloat16[2, 3, 11] = prims.convert_element_type(slice_scatter, bfloat16)
view_5: bfloat16[6, 11] = aten.view(convert_element_type_4, [6, 11])
permute_1: bfloat16[11, 6] = aten.permute(view_5, [1, 0])
mm_1: bfloat16[11, 4] = aten.mm(permute_1, view)
permute_2: bfloat16[4, 11] = aten.permute(mm_1, [1, 0])
permute_3: bfloat16[11, 4] = aten.permute(permute, [1, 0])
mm_2: bfloat16[6, 4] = aten.mm(view_5, permute_3)
view_6: bfloat16[2, 3, 4] = aten.view(mm_2, [2, 3, 4])
permute_4: bfloat16[11, 4] = aten.permute(permute_2, [1, 0])
return [div, view_6, permute_4, None]""")
        self.assertExpectedInline(after, """\
primals_1: bfloat16[2, 3, 4] = input
primals_2: bfloat16[11, 4] = input
primals_3: int64[2, 3] = input
tangents_1: float32[] = input
view: bfloat16[6, 4] = aten.view(primals_1, [6, 4])
slice_2: int64[2, 2] = aten.slice.Tensor(primals_3, 1, 1, 9223372036854775807)
clone_1: int64[2, 2] = aten.clone(slice_2, memory_format=torch.contiguous_format)
view_3: int64[4] = aten.view(clone_1, [-1])
iota_default: int64[6] = prims.iota(6, start=0, step=1, dtype=int64, requires_grad=False)
view_default: int64[6, 1] = aten.view(iota_default, [6, 1])
reshape_default: int64[2, 3, 1] = aten.reshape(view_default, [2, 3, 1])
slice_tensor: int64[2, 2, 1] = aten.slice.Tensor(reshape_default, 1, 0, -1)
reshape_default_1: int64[4, 1] = aten.reshape(slice_tensor, [-1, 1])
reshape_default_2: int64[4] = aten.reshape(reshape_default_1, [-1])
full_default: int64[6] = aten.full([6], -100, dtype=int64)
scatter_src: int64[6] = aten.scatter.src(full_default, 0, reshape_default_2, view_3)
lce_forward_default: (float32[6], float32[6]) = inductor_lce.lce_forward(view, primals_2, None, scatter_src, -100)
getitem: float32[6] = getitem(lce_forward_default, 0)
getitem_1: float32[6] = getitem(lce_forward_default, 1)
index_tensor: float32[4] = aten.index.Tensor(getitem, [reshape_default_2])
ne_2: bool[4] = aten.ne.Scalar(view_3, -100)
sum_2: int64[] = aten.sum(ne_2)
convert_element_type_3: float32[] = prims.convert_element_type(sum_2, float32)
sum_3: float32[] = aten.sum(index_tensor)
div: float32[] = aten.div.Tensor(sum_3, convert_element_type_3)
div_1: float32[] = aten.div.Tensor(tangents_1, convert_element_type_3)
unsqueeze_1: int64[4, 1] = aten.unsqueeze(view_3, 1)
ne_4: bool[4, 1] = aten.ne.Scalar(unsqueeze_1, -100)
scalar_tensor_3: float32[] = aten.scalar_tensor(0, dtype=float32)
where_3: float32[4, 1] = aten.where.self(ne_4, div_1, scalar_tensor_3)
reshape_default_3: float32[4] = aten.reshape(where_3, [-1])
full_default_1: float32[6] = aten.full([6], 0.0, dtype=float32)
scatter_src_1: float32[6] = aten.scatter.src(full_default_1, 0, reshape_default_2, reshape_default_3)
lce_backward_default: (bfloat16[6, 4], bfloat16[11, 4], bfloat16[0]) = inductor_lce.lce_backward(scatter_src_1, None, view, primals_2, None, scatter_src, getitem_1, -100)
getitem_2: bfloat16[6, 4] = getitem(lce_backward_default, 0)
getitem_3: bfloat16[11, 4] = getitem(lce_backward_default, 1)
permute_2: bfloat16[4, 11] = aten.permute(getitem_3, [1, 0])
view_6: bfloat16[2, 3, 4] = aten.view(getitem_2, [2, 3, 4])
permute_4: bfloat16[11, 4] = aten.permute(permute_2, [1, 0])
return [div, view_6, permute_4, None]""")

    def test_shift_pad_sum_joint(self):
        h = torch.randn(2, 3, D, requires_grad=True)
        w = torch.randn(V, D, requires_grad=True)
        y = torch.randint(0, V, (2, 3))
        fn = lambda h, w, y: P.shift_pad(h, w, y, reduction="sum")
        _, after = _compile_and_run(fn, h, w, y)
        self.assertExpectedInline(after, """\
primals_1: float32[2, 3, 4] = input
primals_2: float32[11, 4] = input
primals_3: int64[2, 3] = input
tangents_1: float32[] = input
view: float32[6, 4] = aten.view(primals_1, [6, 4])
constant_pad_nd: int64[2, 4] = aten.constant_pad_nd(primals_3, [0, 1], -100.0)
slice_1: int64[2, 3] = aten.slice.Tensor(constant_pad_nd, 1, 1, 9223372036854775807)
clone: int64[2, 3] = aten.clone(slice_1, memory_format=torch.contiguous_format)
view_3: int64[6] = aten.view(clone, [-1])
lce_forward_default: (float32[6], float32[6]) = inductor_lce.lce_forward(view, primals_2, None, view_3, -100)
getitem: float32[6] = getitem(lce_forward_default, 0)
getitem_1: float32[6] = getitem(lce_forward_default, 1)
sum_3: float32[] = aten.sum(getitem)
unsqueeze_1: int64[6, 1] = aten.unsqueeze(view_3, 1)
ne_4: bool[6, 1] = aten.ne.Scalar(unsqueeze_1, -100)
scalar_tensor_3: float32[] = aten.scalar_tensor(0, dtype=float32)
where_3: float32[6, 1] = aten.where.self(ne_4, tangents_1, scalar_tensor_3)
reshape_default: float32[6] = aten.reshape(where_3, [-1])
lce_backward_default: (float32[6, 4], float32[11, 4], float32[0]) = inductor_lce.lce_backward(reshape_default, None, view, primals_2, None, view_3, getitem_1, -100)
getitem_2: float32[6, 4] = getitem(lce_backward_default, 0)
getitem_3: float32[11, 4] = getitem(lce_backward_default, 1)
permute_2: float32[4, 11] = aten.permute(getitem_3, [1, 0])
view_6: float32[2, 3, 4] = aten.view(getitem_2, [2, 3, 4])
permute_4: float32[11, 4] = aten.permute(permute_2, [1, 0])
return [sum_3, view_6, permute_4, None]""")

    def test_view_3d_inference(self):
        h = torch.randn(2, 3, D)
        w = torch.randn(V, D)
        y = torch.randint(0, V, (2, 3))
        before, after = _compile_and_run(P.view_3d, h, w, y, grad=False)
        self.assertExpectedInline(before, """\
arg0_1: float32[2, 3, 4] = input
arg1_1: float32[11, 4] = input
arg2_1: int64[2, 3] = input
permute: float32[4, 11] = aten.permute(arg1_1, [1, 0])
view: float32[6, 4] = aten.view(arg0_1, [6, 4])
mm: float32[6, 11] = aten.mm(view, permute)
view_1: float32[2, 3, 11] = aten.view(mm, [2, 3, 11])
view_2: float32[6, 11] = aten.view(view_1, [-1, 11])
view_3: int64[6] = aten.view(arg2_1, [-1])
amax: float32[6, 1] = aten.amax(view_2, [1], True)
sub: float32[6, 11] = aten.sub.Tensor(view_2, amax)
exp: float32[6, 11] = aten.exp(sub)
sum_1: float32[6, 1] = aten.sum.dim_IntList(exp, [1], True)
log: float32[6, 1] = aten.log(sum_1)
sub_1: float32[6, 11] = aten.sub.Tensor(sub, log)
ne: bool[6] = aten.ne.Scalar(view_3, -100)
scalar_tensor: int64[] = aten.scalar_tensor(0, dtype=int64)
where: int64[6] = aten.where.self(ne, view_3, scalar_tensor)
unsqueeze: int64[6, 1] = aten.unsqueeze(where, 1)
gather: float32[6, 1] = aten.gather(sub_1, 1, unsqueeze)
squeeze: float32[6] = aten.squeeze.dim(gather, 1)
neg: float32[6] = aten.neg(squeeze)
ne_1: bool[6] = aten.ne.Scalar(view_3, -100)
scalar_tensor_1: float32[] = aten.scalar_tensor(0, dtype=float32)
where_1: float32[6] = aten.where.self(ne_1, neg, scalar_tensor_1)
ne_2: bool[6] = aten.ne.Scalar(view_3, -100)
sum_2: int64[] = aten.sum(ne_2)
convert_element_type: float32[] = prims.convert_element_type(sum_2, float32)
sum_3: float32[] = aten.sum(where_1)
div: float32[] = aten.div.Tensor(sum_3, convert_element_type)
return [div]""")
        self.assertExpectedInline(after, """\
arg0_1: float32[2, 3, 4] = input
arg1_1: float32[11, 4] = input
arg2_1: int64[2, 3] = input
view: float32[6, 4] = aten.view(arg0_1, [6, 4])
view_3: int64[6] = aten.view(arg2_1, [-1])
lce_forward_default: (float32[6], float32[6]) = inductor_lce.lce_forward(view, arg1_1, None, view_3, -100)
getitem: float32[6] = getitem(lce_forward_default, 0)
ne_2: bool[6] = aten.ne.Scalar(view_3, -100)
sum_2: int64[] = aten.sum(ne_2)
convert_element_type: float32[] = prims.convert_element_type(sum_2, float32)
sum_3: float32[] = aten.sum(getitem)
div: float32[] = aten.div.Tensor(sum_3, convert_element_type)
return [div]""")
