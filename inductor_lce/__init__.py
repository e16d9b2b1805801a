"""inductor_lce: fused linear + cross-entropy for torch.compile, found by a compiler pass.

    model = torch.compile(model, options=inductor_lce.options())

rewrites ``F.cross_entropy(lm_head(h).float(), labels)`` in the joint forward/backward
graph into custom ops that never materialize the [N, V] logits.
"""
from . import ops
from .entry import install, is_installed, options, uninstall
from .explain import explain
from .graph import LinearCrossEntropyPass
from .ops import linear_cross_entropy

try:  # faster kernels per device, where available (never required)
    from . import lowering as _lowering  # noqa: F401
except ImportError:
    pass

__all__ = [
    "LinearCrossEntropyPass",
    "explain",
    "install",
    "is_installed",
    "linear_cross_entropy",
    "ops",
    "options",
    "uninstall",
]
__version__ = "0.1.0"
