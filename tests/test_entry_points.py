"""options(), install()/uninstall() chaining, the backend entry point, the FX graph cache."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass

import inductor_lce
from helpers import rewrites


def loss_fn(h, w, y):
    return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 5, 8, generator=g, requires_grad=True),
            torch.randn(33, 8, generator=g, requires_grad=True), torch.randint(0, 33, (2, 5), generator=g))


class UserPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "user-pass-v1"


def test_options_has_both_slots():
    opts = inductor_lce.options()
    assert set(opts) == {"joint_custom_pre_pass", "post_grad_custom_pre_pass"}
    assert all(isinstance(p, inductor_lce.LinearCrossEntropyPass) for p in opts.values())
    assert isinstance(opts["joint_custom_pre_pass"].uuid(), str)


def test_uuid_follows_the_source():
    import pathlib

    from inductor_lce.graph import driver

    p = inductor_lce.LinearCrossEntropyPass()
    assert p.uuid() == inductor_lce.LinearCrossEntropyPass().uuid()
    assert p.uuid() != inductor_lce.LinearCrossEntropyPass(report_training_graphs=False).uuid()
    package = pathlib.Path(inductor_lce.__file__).parent  # every source file of the package, subpackages included
    assert set(driver._source_files()) == {str(f) for f in package.rglob("*.py")}


def test_install_chains_with_user_passes_and_uninstall_restores():
    user_joint, user_post = UserPass(), UserPass()
    old = (inductor_config.joint_custom_pre_pass, inductor_config.post_grad_custom_pre_pass)
    inductor_config.joint_custom_pre_pass = user_joint
    inductor_config.post_grad_custom_pre_pass = user_post
    try:
        inductor_lce.install()
        inductor_lce.install()  # idempotent
        assert inductor_lce.is_installed()
        h, w, y = _inputs()
        torch.compile(loss_fn)(h, w, y).backward()
        assert rewrites() == 1
        assert user_joint.calls >= 1 and user_post.calls >= 1
        assert inductor_config.joint_custom_pre_pass.uuid()[0] == "user-pass-v1"
        inductor_lce.uninstall()
        assert inductor_config.joint_custom_pre_pass is user_joint
        assert inductor_config.post_grad_custom_pre_pass is user_post
        assert not inductor_lce.is_installed()
        torch._dynamo.reset()
        counters.clear()
        torch.compile(loss_fn)(h, w, y).backward()
        assert rewrites() == 0
    finally:
        inductor_lce.uninstall()
        inductor_config.joint_custom_pre_pass, inductor_config.post_grad_custom_pre_pass = old


def test_install_keeps_a_list_of_user_passes():
    first, second = UserPass(), UserPass()
    old = inductor_config.joint_custom_pre_pass
    inductor_config.joint_custom_pre_pass = [first, second]
    try:
        inductor_lce.install()
        h, w, y = _inputs()
        torch.compile(loss_fn)(h, w, y).backward()
        assert first.calls >= 1 and second.calls >= 1 and rewrites() == 1
    finally:
        inductor_lce.uninstall()
        inductor_config.joint_custom_pre_pass = old
    assert inductor_config.joint_custom_pre_pass == old


def test_backend_entry_point_without_import(tmp_path):
    """A fresh interpreter finds backend="inductor_lce" through the installed entry point."""
    code = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        from torch._dynamo.utils import counters
        def f(h, w, y):
            return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
        h = torch.randn(2, 5, 8, requires_grad=True); w = torch.randn(33, 8, requires_grad=True)
        y = torch.randint(0, 33, (2, 5))
        assert "inductor_lce" not in sys.modules
        out = torch.compile(f, backend="inductor_lce")(h, w, y)
        out.backward()
        torch.testing.assert_close(out, f(h, w, y))
        print("REWRITES", counters["inductor_lce"]["rewrites"])
    """)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))  # cold cache: the pass runs
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REWRITES 1" in proc.stdout


def test_backend_accepts_user_options():
    from inductor_lce.backend import inductor_lce_backend

    user = UserPass()
    h, w, y = _inputs()
    compiled = torch.compile(loss_fn, backend=inductor_lce_backend,
                             options={"joint_custom_pre_pass": user})
    compiled(h, w, y).backward()
    assert rewrites() == 1 and user.calls >= 1


def test_fx_graph_cache_hit_still_rewritten():
    from torch._inductor.utils import fresh_cache, run_and_get_code

    h, w, y = _inputs()
    with fresh_cache(), inductor_config.patch({"fx_graph_cache": True}):
        for attempt in range(2):
            torch._dynamo.reset()
            counters.clear()
            out, codes = run_and_get_code(lambda: torch.compile(loss_fn, options=inductor_lce.options())(h, w, y))
            assert rewrites() == 1
            assert any("inductor_lce" in c for c in codes)
            key = "fxgraph_cache_miss" if attempt == 0 else "fxgraph_cache_hit"
            assert counters["inductor"][key] >= 1, dict(counters["inductor"])
            torch.testing.assert_close(out, loss_fn(h, w, y))


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
@pytest.mark.parametrize("entry", ["backend", "install"])
def test_compile_modes_keep_the_pass(entry, mode):
    """The two ways the README gives to combine the pass with a compile mode (torch.compile refuses mode= with
    options=): the site is rewritten, loss and grads as eager's. (On the CPU, reduce-overhead's CUDA graphs do not
    apply; the GPU figures are bench/compile_modes.py's.)"""
    h, w, y = _inputs()
    want = loss_fn(h, w, y)
    want_grads = torch.autograd.grad(want, (h, w))
    try:
        if entry == "install":
            inductor_lce.install()
            compiled = torch.compile(loss_fn, mode=mode)
        else:
            compiled = torch.compile(loss_fn, backend="inductor_lce", mode=mode)
        got = compiled(h, w, y)
        got_grads = torch.autograd.grad(got, (h, w))
    finally:
        inductor_lce.uninstall()
    assert rewrites() == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
