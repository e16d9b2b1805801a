"""What the warp-specialized Gluon kernels (matmul_accumulate_wgmma.py, matmul_accumulate_cooperative.py) share:

* their operand ring: STAGES shared-memory slots, each with a ``ready`` barrier (its TMA loads have landed,
  expect-tx) and an ``empty`` barrier (its consumers are done with it). The producer fills slot ``step % STAGES``
  on its ``step // STAGES``-th round; empty barriers start "phase 1 complete", so the first round does not wait;
* their host-side TMA descriptors (``descriptor``)."""
from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:   # (triton without Gluon's Hopper API)
    gluon = None

if gluon is not None:

    @gluon.jit
    def acquire_slot(empty, ready, step, STAGES: gl.constexpr, nbytes: gl.constexpr):
        """Waits until the producer's ``step`` may overwrite its slot, arms the slot's ready barrier for ``nbytes``
        of TMA loads and returns the slot."""
        slot = step % STAGES
        mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(slot), nbytes)
        return slot

    @gluon.jit
    def ready_slot(ready, step, STAGES: gl.constexpr):
        """Waits until the loads of the consumers' ``step`` have landed in its slot and returns the slot."""
        slot = step % STAGES
        mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
        return slot


def descriptor(t, block: list):
    """A Gluon TMA descriptor of a row-major 2-D bf16 / fp16 / int8 tensor with [block] boxes, default swizzle."""
    dtype = {"torch.bfloat16": gl.bfloat16, "torch.float16": gl.float16, "torch.int8": gl.int8}[str(t.dtype)]
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))
