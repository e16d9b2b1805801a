"""``torch.compile(model, backend="inductor_lce")``: Inductor with the pass in its slots.

Registered under the ``torch_dynamo_backends`` entry-point group in pyproject.toml, so
Dynamo finds it by name after ``pip install``, without an import.
"""
from __future__ import annotations

from .entry import SLOTS, _chain, options as _options


def inductor_lce_backend(gm, example_inputs, *, mode=None, options=None, **kwargs):
    from torch._inductor.compile_fx import compile_fx

    patches = dict(options or {})
    for slot, ours in _options().items():
        patches[slot] = _chain(patches.get(slot), ours)
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        patches = {**list_mode_options(mode), **patches}
    return compile_fx(gm, example_inputs, config_patches=patches, **kwargs)


__all__ = ["inductor_lce_backend", "SLOTS"]
