"""train.fp8: the blocks' projections through FP8 matmuls (e4m3 operands, e5m2 gradients, a scale per tensor)."""

import torch
from conftest import tiny_model, tiny_train
from test_model import CPU, make_shards

from pgolf import fp8
from pgolf.model import GPT
from pgolf.train import Trainer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_fp8_linear_is_the_matmul_to_fp8_precision_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = (3.0 * torch.randn(2, 40, 64, generator=g)).requires_grad_()
    w = (0.02 * torch.randn(48, 64, generator=g)).requires_grad_()  # small weights: the scale, not the range, matters
    out = torch.randn(2, 40, 48, generator=g)
    y = fp8.linear(x, w)
    dx, dw = torch.autograd.grad((y * out).sum(), (x, w))
    ref = x @ w.t()
    rdx, rdw = torch.autograd.grad((ref * out).sum(), (x, w))
    assert y.dtype == x.dtype and dw.dtype == w.dtype
    for got, want in ((y, ref), (dx, rdx), (dw, rdw)):
        assert 1e-3 < rel(got, want) < 0.08  # FP8's few mantissa bits: an error, but a small one
    zero = torch.zeros(48, 64, requires_grad=True)  # a zero-initialised projection: no scale from a zero amax
    y0 = fp8.linear(x, zero)
    (y0 * out).sum().backward()
    assert not y0.any() and torch.isfinite(zero.grad).all() and zero.grad.abs().sum() > 0


def test_a_model_trained_with_fp8_projections_learns_as_the_full_precision_one(tmp_path):
    """set_fp8 reaches the six projections of every block and nothing else; 40 steps of the tiny model land near the
    full-precision run's loss."""
    model = GPT(tiny_model())
    model.set_fp8(True)
    on = {n for n, m in model.named_modules() if getattr(m, "fp8", False)}
    assert on == {f"blocks.{i}.{p}" for i in range(4) for p in ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc",
                                                                  "mlp.proj")}
    make_shards(tmp_path)
    losses = {}
    for use in (False, True):
        trainer = Trainer(tiny_model(), tiny_train(iterations=40, fp8=use), tmp_path, CPU, log=lambda s: None)
        assert trainer.model.blocks[0].mlp.fc.fp8 == use
        m = trainer.run().metrics
        losses[use] = m["final_train_loss"]
    first = trainer.losses[0][1]
    assert losses[True] < first - 1.0 and abs(losses[True] - losses[False]) < 0.15, (first, losses)
