"""Softcapped cross-entropy as one Triton kernel pair over the rows of the output head's logits (record 2026-04-23).

The eager path casts the (tokens, vocab) logits to fp32, softcaps them, and takes the cross-entropy: at a micro-batch
of 98,304 tokens and a vocabulary of 8,192 that is 3.2 GB of fp32 logits written and read again, twice more for the
backward. The forward kernel reads each row of the head's own logits once, softcaps in registers and keeps a running
log-sum-exp; the backward re-derives the softcapped row and writes the gradient of the raw logits. softcap · tanh(x /
softcap) is computed as 2 softcap · sigmoid(2 x / softcap), which differs by the constant softcap: the log-sum-exp and
the target's logit move together, the loss does not. `GPT.forward`'s eager path is the definition the tests hold this
to; the kernels run wherever Triton does (on the CPU under TRITON_INTERPRET=1).
"""

import functools

import torch

from .fused_qk import INTERPRET, triton, unwrapped

if triton is not None:
    import triton.language as tl

BLOCK_V, NUM_WARPS = 1024, 4
enabled = True  # False forces the eager path (A/B benchmarks)


def usable(logits: torch.Tensor) -> bool:
    return enabled and triton is not None and (logits.is_cuda or INTERPRET)


if triton is not None:
    @triton.jit
    def _fwd_kernel(logits, targets, losses, lse, stride, V, softcap: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src = logits + row * stride
        two_c, inv = 2.0 * softcap, 2.0 / softcap
        m = -float("inf")
        s = 0.0
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < V, other=0.0).to(tl.float32)
            z = tl.where(cols < V, two_c * tl.sigmoid(x * inv), float("-inf"))
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        total = m + tl.log(s)
        t = tl.load(targets + row)
        zt = two_c * tl.sigmoid(tl.load(src + t).to(tl.float32) * inv)
        tl.store(losses + row, total - zt)
        tl.store(lse + row, total)

    @triton.jit
    def _bwd_kernel(logits, targets, lse, grad_losses, dlogits, stride, V, softcap: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        src, dst = logits + row * stride, dlogits + row * stride
        two_c, inv = 2.0 * softcap, 2.0 / softcap
        total, g, t = tl.load(lse + row), tl.load(grad_losses + row), tl.load(targets + row)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(src + cols, mask=cols < V, other=0.0).to(tl.float32)
            sg = tl.sigmoid(x * inv)
            p = tl.exp(two_c * sg - total) - (cols == t).to(tl.float32)
            # d(softcap tanh(x / softcap)) / dx = 1 - tanh^2 = 4 sigmoid (1 - sigmoid) at 2 x / softcap
            tl.store(dst + cols, (g * p * 4.0 * sg * (1.0 - sg)).to(dst.dtype.element_ty), mask=cols < V)


def _launch_forward(logits: torch.Tensor, targets: torch.Tensor, softcap: float,
                    wrap=unwrapped) -> tuple[torch.Tensor, torch.Tensor]:
    N, V = logits.shape
    losses = torch.empty(N, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(losses)
    wrap(_fwd_kernel)[(N,)](logits, targets, losses, lse, logits.stride(0), V, softcap=softcap, BLOCK=BLOCK_V,
                            num_warps=NUM_WARPS)
    return losses, lse


def _launch_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                     softcap: float, wrap=unwrapped) -> torch.Tensor:
    N, V = logits.shape
    dlogits = torch.empty_like(logits)
    wrap(_bwd_kernel)[(N,)](logits, targets, lse, grad.contiguous(), dlogits, logits.stride(0), V, softcap=softcap,
                            BLOCK=BLOCK_V, num_warps=NUM_WARPS)
    return dlogits


def _setup_context(ctx, inputs, output):
    logits, targets, softcap = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.softcap = softcap


def _grads(ctx, grad, _grad_lse, launch_backward=_launch_backward):
    """The logits' gradient from the saved context, by `launch_backward`: the kernels eager, the backward op compiled."""
    logits, targets, lse = ctx.saved_tensors
    return launch_backward(logits, targets, lse, grad, ctx.softcap), None, None


@functools.cache
def define_compiled_ops() -> None:
    """Defines torch.ops.pgolf.softcapped_ce (and its backward), which a compiled model calls: triton ops, launched
    from inductor's generated code, as in fused_qk (and deferred to the compile for the same reason)."""
    @torch.library.triton_op("pgolf::softcapped_ce", mutates_args=())
    def forward(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_forward(logits, targets, softcap, torch.library.wrap_triton)

    @torch.library.triton_op("pgolf::softcapped_ce_backward", mutates_args=())
    def backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor,
                 softcap: float) -> torch.Tensor:
        return _launch_backward(logits, targets, lse, grad, softcap, torch.library.wrap_triton)

    forward.register_autograd(lambda ctx, grad, grad_lse: _grads(ctx, grad, grad_lse, backward),
                              setup_context=_setup_context)


class _EagerSoftcappedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, softcap):
        losses, lse = _launch_forward(logits, targets, softcap)
        _setup_context(ctx, (logits, targets, softcap), (losses, lse))
        ctx.mark_non_differentiable(lse)
        return losses, lse

    backward = staticmethod(_grads)


def softcapped_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """Per-row cross-entropy (nats) of softcap · tanh(logits / softcap) against targets; logits (N, V) raw."""
    op = torch.ops.pgolf.softcapped_ce if torch.compiler.is_compiling() else _EagerSoftcappedCE.apply
    return op(logits.contiguous(), targets.contiguous(), float(softcap))[0]
