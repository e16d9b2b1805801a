"""The Triton kernels of the lowering (``inductor_lce/lowering/lce_triton.py`` launches them), one per file:

  lse_forward.py            forward: online log-sum-exp, target logit and class sum over V-splits, logits never stored
  lse_update.py             folds one slab of cuBLAS logits into the running lse (row-wise)
  grad_logits.py            backward slab: logits recomputed by tl.dot, turned into grad_logits (opt-in variant)
  grad_logits_inplace.py    backward slab: cuBLAS logits turned into grad_logits in place
  softmax_grad_rows.py      fused op: loss, lse and grad_logits of whole rows of V in place (two passes per row)
  matmul_accumulate.py      GEMM with a running fp32 or compensated bf16 state (grad_hidden, grad_weight)
  matmul_accumulate_tma.py  the same, persistent with TMA descriptors (sm_90)
  matmul_accumulate_wgmma.py  the same in Gluon, warp-specialized ping-pong (sm_90; timed against the others per shape)
  matmul_accumulate_cooperative.py  the compensated state in Gluon, 128 x 256 cooperative tiles, the state moved by
                            TMA through shared memory (sm_90; timed against the others per shape)

and the ``@triton.jit`` helpers they share: ``_config.py`` (autotuning configs, constants, the interpreter's
flags and patches, applied when a kernel module is imported), ``_grid.py`` (tile order), ``_rounding.py``
(explicit bf16/fp16 rounding), ``_softmax.py`` (scores, online lse, softmax gradient), ``_tanh.py`` (the
soft-cap's tanh), ``_logits_tile.py`` (one tile of logits by tl.dot), and the Gluon kernels' ``_gluon.py``
(their operand ring's barrier protocol, their TMA descriptors).

Kernels import only each other and Triton: nothing from the graph pass, the ops or the lowering. Importing this
package imports no kernel.
"""
