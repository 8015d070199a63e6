"""The fused softcapped cross-entropy, run by Triton's interpreter on the CPU, against the model's eager path."""

import os
import textwrap

import pytest
from conftest import in_triton_interpreter

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from conftest import fused_against_eager, tiny_model
    from pgolf import fused_ce
    from pgolf.model import GPT

    torch.manual_seed(0)
    fused_ce.define_compiled_ops()
    # rows of a vocabulary that is no multiple of the block (and one that spans several), large logits near the cap
    for N, V, softcap, scale in [(7, 320, 30.0, 1.0), (5, 2500, 15.0, 40.0), (3, 8192, 30.0, 10.0)]:
        raw = (scale * torch.randn(N, V)).requires_grad_()
        targets = torch.randint(0, V, (N,))
        eager = F.cross_entropy(softcap * torch.tanh(raw / softcap), targets, reduction="none")
        w = torch.rand(N)
        g_eager, = torch.autograd.grad((eager * w).sum(), raw)
        # the autograd Function outside compile, and the triton op a compiled graph calls (its autograd and backward
        # op; run eagerly: the interpreter's kernels can't be traced, bench/fused_ce_check.py compiles it on a GPU)
        for fused in (fused_ce.softcapped_cross_entropy(raw, targets, softcap),
                      torch.ops.pgolf.softcapped_ce(raw, targets, softcap)[0]):
            g_fused, = torch.autograd.grad((fused * w).sum(), raw)
            torch.testing.assert_close(fused, eager, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(g_fused, g_eager, atol=1e-6, rtol=1e-4)
            assert g_fused.abs().max() > 1e-3

    # the model's training loss and every gradient, fused and eager
    fused_against_eager(GPT(tiny_model(logit_softcap=20.0)), fused_ce, scale=0.1, atol=2e-6)
    print("fused softcapped cross-entropy matches the eager path")
""")


def test_fused_softcapped_ce_matches_the_eager_path_in_the_triton_interpreter():
    assert "fused softcapped cross-entropy matches the eager path" in in_triton_interpreter(SCRIPT)


def test_the_fused_loss_is_off_on_cpu_without_the_interpreter():
    import torch

    from pgolf import fused_ce
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    assert not fused_ce.usable(torch.zeros(2, 8))
