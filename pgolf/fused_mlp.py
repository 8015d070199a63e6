"""The LeakyReLU² MLP's up-projection with its activation in the matmul's epilogue (record 2026-04-10, its
linear_leaky_relu_square kernel).

Eager, `fc` writes the pre-activation h = x W1ᵀ, a second kernel reads it and writes leaky(h)², and the backward
reads both again for dh = (g W2) · leaky'(h)·2 leaky(h). Here one Triton matmul writes h and leaky(h)² from its
accumulator, and in the backward one matmul computes g W2 and multiplies by the activation's derivative
(2h where h > 0, 2 slope² h elsewhere) before it stores: a (tokens, hidden) tensor is not written and read back each
way. The down-projection and the weight gradients stay cuBLAS matmuls. `model.MLP`'s eager path is the definition the
tests hold this to; the kernel runs wherever Triton does (on the CPU under TRITON_INTERPRET=1).

Off by default (`enabled`): a plain tiled Triton matmul has to match cuBLAS on the GPU for the saved traffic to show,
and that has not been measured yet (bench/train_throughput.py --fused-mlp).
"""

import torch
import torch.nn.functional as F

from .fused_qk import INTERPRET, triton

if triton is not None:
    import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES = 128, 128, 64, 8, 3
enabled = False


def usable(x: torch.Tensor) -> bool:
    """On CUDA in half precision only: tl.dot would take fp32 inputs as TF32, cuBLAS (and the eager path) not."""
    return enabled and triton is not None and (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) or INTERPRET)


if triton is not None:
    @triton.jit
    def _matmul_act_kernel(a, b, c, aux, M, N, K, stride_am, stride_bn, stride_cm, slope,
                           FORWARD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """acc = A Bᵀ for one (BM, BN) tile; A (M, K), B (N, K) row-major. Forward: c <- acc (h), aux <- leaky(h)².
        Backward: aux holds h; c <- acc · (2h if h > 0 else 2 slope² h)."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + ks
            x = tl.load(a + rows[:, None] * stride_am + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            w = tl.load(b + cols[:, None] * stride_bn + kk[None, :], mask=(cols[:, None] < N) & (kk[None, :] < K),
                        other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        out = c + rows[:, None] * stride_cm + cols[None, :]
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        low = acc.to(c.dtype.element_ty)  # the eager path rounds the matmul's output first, then activates it
        if FORWARD:
            tl.store(out, low, mask=mask)
            h = low.to(tl.float32)
            act = tl.where(h > 0, h, slope * h)
            tl.store(aux + rows[:, None] * stride_cm + cols[None, :], (act * act).to(c.dtype.element_ty), mask=mask)
        else:
            h = tl.load(aux + rows[:, None] * stride_cm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            grad = low.to(tl.float32) * tl.where(h > 0, 2.0 * h, 2.0 * slope * slope * h)
            tl.store(out, grad.to(c.dtype.element_ty), mask=mask)


def _matmul_act(a: torch.Tensor, b: torch.Tensor, slope: float, h: torch.Tensor | None = None):
    """Forward (h None): (h, leaky(h)²) for h = a bᵀ. Backward: (a bᵀ) · leaky²'(h)."""
    a, b = a.contiguous(), b.contiguous()
    M, K = a.shape
    N = b.size(0)
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    aux = torch.empty_like(c) if h is None else h.contiguous()
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _matmul_act_kernel[grid](a, b, c, aux, M, N, K, a.stride(0), b.stride(0), c.stride(0), slope, FORWARD=h is None,
                             BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return (c, aux) if h is None else c


def _forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, slope: float):
    h, post = _matmul_act(x, w1, slope)
    return F.linear(post, w2), h, post


def _backward(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor,
              post: torch.Tensor, slope: float):
    grad = grad.contiguous()
    dh = _matmul_act(grad, w2.t(), slope, h)
    return dh @ w1, dh.t() @ x, grad.t() @ post


# As in fused_ce: custom ops under torch.compile, an autograd Function outside it.
@torch.library.custom_op("pgolf::leaky_relu2_mlp", mutates_args=())
def _mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, slope: float
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, w1, w2, slope)


@_mlp.register_fake
def _(x, w1, w2, slope):
    hidden = x.new_empty(x.size(0), w1.size(0))
    return x.new_empty(x.size(0), w2.size(0)), hidden, torch.empty_like(hidden)


@torch.library.custom_op("pgolf::leaky_relu2_mlp_backward", mutates_args=())
def _mlp_backward(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor,
                  post: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(grad, x, w1, w2, h, post, slope)


@_mlp_backward.register_fake
def _(grad, x, w1, w2, h, post, slope):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    x, w1, w2, slope = inputs
    ctx.save_for_backward(x, w1, w2, output[1], output[2])
    ctx.slope = slope


def _op_backward(ctx, grad, _gh, _gpost):
    return *_mlp_backward(grad, *ctx.saved_tensors, ctx.slope), None


_mlp.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, slope):
        out = _forward(x, w1, w2, slope)
        _setup_context(ctx, (x, w1, w2, slope), out)
        ctx.mark_non_differentiable(out[1], out[2])
        return out

    @staticmethod
    def backward(ctx, grad, _gh, _gpost):
        return *_backward(grad, *ctx.saved_tensors, ctx.slope), None


def leaky_relu2_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, slope: float) -> torch.Tensor:
    """leaky(x W1ᵀ, slope)² W2ᵀ over the last dim of x; w1 (hidden, dim), w2 (dim, hidden) in x's dtype."""
    op = _mlp if torch.compiler.is_compiling() else _EagerMLP.apply
    out = op(x.reshape(-1, x.size(-1)).contiguous(), w1.contiguous(), w2.contiguous(), float(slope))[0]
    return out.view(*x.shape[:-1], w2.size(0))
