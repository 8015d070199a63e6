"""The fused LeakyReLU² MLP, run by Triton's interpreter on the CPU, against the model's eager MLP."""

import os

import pytest
from conftest import in_triton_interpreter

pytest.importorskip("triton")

SCRIPT = """
import torch
import torch.nn.functional as F
from conftest import fused_against_eager, tiny_model
from pgolf import fused_mlp
from pgolf.model import GPT

torch.manual_seed(0)
fused_mlp.enabled = True
# token counts and widths that are no multiple of the tiles (and one that spans several), two slopes
for M, D, H, slope in [(37, 24, 56, 0.5), (300, 64, 200, 0.5), (9, 16, 40, 0.1)]:
    x = torch.randn(M, D, requires_grad=True)
    w1, w2 = (torch.randn(H, D) / D ** 0.5).requires_grad_(), (torch.randn(D, H) / H ** 0.5).requires_grad_()
    g = torch.randn(M, D)
    fused = fused_mlp.leaky_relu2_mlp(x, w1, w2, slope)
    eager = F.linear(F.leaky_relu(F.linear(x, w1), slope).square(), w2)
    grads = [torch.autograd.grad((y * g).sum(), (x, w1, w2)) for y in (fused, eager)]
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert b.abs().max() > 1e-2

# the model's training loss and every gradient (out_scale folded into proj, as CastedLinear does), fused and eager
model = GPT(tiny_model(activation="leaky_relu2", leaky_slope=0.5, ln_scale=True)).train()
calls, forward = [], fused_mlp._forward
fused_mlp._forward = lambda *a: calls.append(1) or forward(*a)
fused_against_eager(model, fused_mlp, scale=0.1, atol=2e-6)
assert len(calls) == model.cfg.layers, calls  # the fused run took the kernel in every MLP, the eager run none
print("fused LeakyReLU2 MLP matches the eager path")
"""


def test_fused_mlp_matches_the_eager_path_in_the_triton_interpreter():
    assert "fused LeakyReLU2 MLP matches the eager path" in in_triton_interpreter(SCRIPT)


def test_the_fused_mlp_is_off_by_default_and_on_cpu_without_the_interpreter():
    import torch

    from pgolf import fused_mlp
    assert not fused_mlp.usable(torch.zeros(2, 8, dtype=torch.bfloat16))  # off until measured on a GPU
    if os.environ.get("TRITON_INTERPRET") != "1":
        fused_mlp.enabled = True
        try:
            assert not fused_mlp.usable(torch.zeros(2, 8, dtype=torch.bfloat16))
        finally:
            fused_mlp.enabled = False
