"""FP8 matmuls for the blocks' projections in training (`train.fp8`).

x Wᵀ with x and W in e4m3 and, in the backward, the output gradient in e5m2 (its wider range), each with one scale
per tensor taken from its own amax at every call (just-in-time scaling: no history to drift over a run, at the cost
of one reduction per operand). The products accumulate in fp32 inside torch._scaled_mm and come out in the input's
dtype; the weight gradient in fp32, for the fp32 master weight. The operands are saved in FP8 for the backward (half
the activation memory of bf16). On one H200 an MLP-shaped matmul (98,304 x 512 -> 2,048) ran 1.40x bf16's speed
with tensor-wise scales (issue 28); whether a whole step gains, and what it costs in loss, is bench/'s to measure.
"""

import torch

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t in `dtype`, scaled so that its largest magnitude lands on the format's largest value, and the inverse
    scale _scaled_mm multiplies back."""
    top = torch.finfo(dtype).max
    scale = top / t.detach().abs().amax().float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column, as _scaled_mm wants its second operand."""
    return t.t().contiguous().t()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.size(-1))
        (xq, sx), (wq, sw) = _quantize(x2, E4M3), _quantize(w, E4M3)
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.dtypes = x.dtype, w.dtype
        y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=x.dtype)
        return y.view(*x.shape[:-1], w.size(0))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xq, sx, wq, sw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        gq, sg = _quantize(grad.reshape(-1, grad.size(-1)), E5M2)
        dx = torch._scaled_mm(gq, _column_major(wq), scale_a=sg, scale_b=sw, out_dtype=x_dtype)
        dw = torch._scaled_mm(gq.t().contiguous(), _column_major(xq), scale_a=sg, scale_b=sx, out_dtype=torch.float32)
        return dx.view(*grad.shape[:-1], wq.size(1)), dw.to(w_dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x Wᵀ through FP8 (e4m3 operands, e5m2 gradients); x (..., in), w (out, in); the result in x's dtype."""
    return _Linear.apply(x, w)
