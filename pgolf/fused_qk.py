"""Attention's q/k preparation as one Triton kernel pair over the rows of the fused qkv matmul.

Forward: per-head RMS norm of q and k, RoPE on the first 2*rd dims, a learned gain per query head, and v
copied out, all in one pass. Backward: the qkv gradient (q/k through gain, rope and norm; v as it came) and
the gain's partial sums, in one pass that re-derives the norm from the raw rows instead of saving it.
Inductor made six passes for the backward (issue 7). The torch path in model.py is the definition that the
tests hold this to; the kernels run wherever Triton does (on CPU under TRITON_INTERPRET=1).
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default under CUDA autocast, which runs it in fp32
BLOCK_ROWS, NUM_WARPS = 32, 4
enabled = True  # False forces the torch path (A/B benchmarks)


def usable(qkv: torch.Tensor) -> bool:
    """True where the fused kernels can run on qkv: Triton present and a CUDA tensor (or the interpreter)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return enabled and triton is not None and (qkv.is_cuda or interpret)


if triton is not None:
    @triton.jit
    def _rope_coeffs(t, d, cos, sin, RD: tl.constexpr):
        """Per (token, dim): y[d] = x[d] * c + x[partner(d)] * s rotates pairs (d, d + RD) for d < RD."""
        rot = d < 2 * RD
        partner = tl.where(d < RD, d + RD, tl.where(rot, d - RD, d))
        i = t[:, None] * RD + d % RD
        c = tl.load(cos + i, mask=rot, other=1.0).to(tl.float32)
        s = tl.load(sin + i, mask=rot, other=0.0).to(tl.float32)
        return partner, c, tl.where(d < RD, s, -s)

    @triton.jit
    def _fwd_kernel(qkv, cos, sin, gain, q_out, k_out, v_out, N, T, eps,
                    H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, RD: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid, h = tl.program_id(0), tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (rows < N)[:, None] & (d < D)
        src = qkv + rows[:, None] * ((H + 2 * KV) * D) + h * D
        if h < H + KV:
            partner, c, s = _rope_coeffs(rows % T, d, cos, sin, RD)
            x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
            xp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
            g = tl.load(gain + h, mask=h < H, other=1.0).to(tl.float32)
            y = (x * c + xp * s) * (r * g)
            if h < H:
                tl.store(q_out + rows[:, None] * (H * D) + h * D + d, y.to(q_out.dtype.element_ty), mask=mask)
            else:
                tl.store(k_out + rows[:, None] * (KV * D) + (h - H) * D + d, y.to(k_out.dtype.element_ty),
                         mask=mask)
        else:
            v = tl.load(src + d, mask=mask, other=0.0)
            tl.store(v_out + rows[:, None] * (KV * D) + (h - H - KV) * D + d, v, mask=mask)

    @triton.jit
    def _bwd_kernel(dq, dk, dv, qkv, cos, sin, gain, dqkv, dgain_parts, N, T, eps,
                    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                    H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, RD: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid, h = tl.program_id(0), tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        b, t = rows // T, rows % T
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (rows < N)[:, None] & (d < D)
        W = (H + 2 * KV) * D
        dst = dqkv + rows[:, None] * W + h * D
        if h < H + KV:
            partner, c, s = _rope_coeffs(t, d, cos, sin, RD)
            src = qkv + rows[:, None] * W + h * D
            x = tl.load(src + d, mask=mask, other=0.0).to(tl.float32)
            xp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32)
            if h < H:
                grad = dq + (b * sq_b + t * sq_t)[:, None] + h * sq_h
            else:
                grad = dk + (b * sk_b + t * sk_t)[:, None] + (h - H) * sk_h
            dy = tl.load(grad + d, mask=mask, other=0.0).to(tl.float32)
            dyp = tl.load(grad + partner, mask=mask, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)[:, None]
            n = x * r
            y = n * c + xp * r * s
            tl.store(dgain_parts + pid * (H + KV) + h, tl.sum(tl.sum(dy * y, 1), 0))
            g = tl.load(gain + h, mask=h < H, other=1.0).to(tl.float32)
            dn = (dy * c - dyp * s) * g  # the rotation's transpose: the partner's coefficient is -s
            dx = r * (dn - n * (tl.sum(dn * n, 1) / D)[:, None])
            tl.store(dst + d, dx.to(dqkv.dtype.element_ty), mask=mask)
        else:
            j = h - H - KV
            g_v = tl.load(dv + (b * sv_b + t * sv_t)[:, None] + j * sv_h + d, mask=mask, other=0.0)
            tl.store(dst + d, g_v.to(dqkv.dtype.element_ty), mask=mask)


def _grid(N: int, heads: int, kv_heads: int) -> tuple[int, int]:
    return triton.cdiv(N, BLOCK_ROWS), heads + 2 * kv_heads


@torch.library.custom_op("pgolf::qk_norm_rope", mutates_args=())
def _qk_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor,
                  heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, W = qkv.shape
    D = W // (heads + 2 * kv_heads)
    q, k, v = (qkv.new_empty(B, T, n, D) for n in (heads, kv_heads, kv_heads))
    _fwd_kernel[_grid(B * T, heads, kv_heads)](
        qkv, cos, sin, gain, q, k, v, B * T, T, EPS, H=heads, KV=kv_heads, D=D, RD=cos.size(-1),
        BLOCK_N=BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(D), num_warps=NUM_WARPS)
    return q, k, v


@_qk_norm_rope.register_fake
def _(qkv, cos, sin, gain, heads, kv_heads):
    B, T, W = qkv.shape
    D = W // (heads + 2 * kv_heads)
    return tuple(qkv.new_empty(B, T, n, D) for n in (heads, kv_heads, kv_heads))


@torch.library.custom_op("pgolf::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor,
                           heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, W = qkv.shape
    D = W // (heads + 2 * kv_heads)
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
    grid = _grid(B * T, heads, kv_heads)
    dqkv = torch.empty_like(qkv)
    dgain_parts = torch.empty(grid[0], heads + kv_heads, device=qkv.device, dtype=torch.float32)
    _bwd_kernel[grid](
        dq, dk, dv, qkv, cos, sin, gain, dqkv, dgain_parts, B * T, T, EPS,
        *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H=heads, KV=kv_heads, D=D, RD=cos.size(-1), BLOCK_N=BLOCK_ROWS, BLOCK_D=triton.next_power_of_2(D),
        num_warps=NUM_WARPS)
    return dqkv, dgain_parts[:, :heads].sum(0).to(gain.dtype)


@_qk_norm_rope_backward.register_fake
def _(dq, dk, dv, qkv, cos, sin, gain, heads, kv_heads):
    return torch.empty_like(qkv), torch.empty_like(gain)


def _setup_context(ctx, inputs, output):
    qkv, cos, sin, gain, heads, kv_heads = inputs
    ctx.save_for_backward(qkv, cos, sin, gain)
    ctx.heads, ctx.kv_heads = heads, kv_heads


def _backward(ctx, dq, dk, dv):
    qkv, cos, sin, gain = ctx.saved_tensors
    dqkv, dgain = _qk_norm_rope_backward(dq, dk, dv, qkv, cos, sin, gain, ctx.heads, ctx.kv_heads)
    return dqkv, None, None, dgain, None, None


_qk_norm_rope.register_autograd(_backward, setup_context=_setup_context)


def qk_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_gain: torch.Tensor,
                 heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, (heads + 2 kv_heads) D) qkv rows -> q, k, v as (B, T, heads or kv_heads, D): q and k RMS-normed
    per head, rotated by the (T, rd) cos/sin tables, q times q_gain per head."""
    return _qk_norm_rope(qkv.contiguous(), cos.contiguous(), sin.contiguous(), q_gain, heads, kv_heads)
