"""The operand ring of the warp-specialized Gluon kernels (matmul_accumulate_wgmma.py,
matmul_accumulate_cooperative.py): STAGES shared-memory slots, each with a ``ready`` barrier (its TMA loads have
landed, expect-tx) and an ``empty`` barrier (its consumers are done with it). The producer fills slot
``step % STAGES`` on its ``step // STAGES``-th round; empty barriers start "phase 1 complete", so the first round
does not wait."""
from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
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
