import os

import pytest
import torch
from torch._dynamo.utils import counters

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: no Dynamo state, and no on-disk cache hit that would
    skip the passes (and their counters). The cache test turns the FX graph cache back on."""
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch({"fx_graph_cache": False}), \
            torch._functorch.config.patch({"enable_autograd_cache": False}):
        yield
    torch._dynamo.reset()
