"""Attention's q/k preparation as one Triton kernel pair over the rows of the fused qkv matmul.

Forward: per-head RMS norm of q and k, RoPE on the first 2*rd dims, a learned gain per query head, and v
copied out, all in one pass. Backward: the qkv gradient (q/k through gain, rope and norm; v as it came) and
the gain's partial sums, in one pass that re-derives the norm from the raw rows instead of saving it.
Inductor made six passes for the backward. `model.qk_norm_rope` is the definition that the
tests hold this to; the kernels run wherever Triton does (on CPU under TRITON_INTERPRET=1).
"""

import functools
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
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it once, at import, as well


def usable(qkv: torch.Tensor) -> bool:
    """True where the fused kernels can run on qkv: Triton present and a CUDA tensor (or the interpreter)."""
    return enabled and triton is not None and (qkv.is_cuda or INTERPRET)


if triton is not None:
    @triton.jit
    def _load_head(src, rows_mask, RD: tl.constexpr, REST: tl.constexpr,
                   BLOCK_RD: tl.constexpr, BLOCK_REST: tl.constexpr):
        """A head's dims as fp32 tiles: the two rotated halves [0, RD) and [RD, 2 RD), and the unrotated rest."""
        c, e = tl.arange(0, BLOCK_RD)[None, :], tl.arange(0, BLOCK_REST)[None, :]
        x1 = tl.load(src + c, mask=rows_mask & (c < RD), other=0.0).to(tl.float32)
        x2 = tl.load(src + RD + c, mask=rows_mask & (c < RD), other=0.0).to(tl.float32)
        x3 = tl.load(src + 2 * RD + e, mask=rows_mask & (e < REST), other=0.0).to(tl.float32)
        return x1, x2, x3

    @triton.jit
    def _store_head(dst, x1, x2, x3, rows_mask, RD: tl.constexpr, REST: tl.constexpr,
                    BLOCK_RD: tl.constexpr, BLOCK_REST: tl.constexpr):
        c, e = tl.arange(0, BLOCK_RD)[None, :], tl.arange(0, BLOCK_REST)[None, :]
        dt = dst.dtype.element_ty
        tl.store(dst + c, x1.to(dt), mask=rows_mask & (c < RD))
        tl.store(dst + RD + c, x2.to(dt), mask=rows_mask & (c < RD))
        tl.store(dst + 2 * RD + e, x3.to(dt), mask=rows_mask & (e < REST))

    @triton.jit
    def _load_rope(cos, sin, t, rows_mask, RD: tl.constexpr, BLOCK_RD: tl.constexpr):
        """The (T, RD) cos and sin tables at positions t, as fp32 tiles."""
        c = tl.arange(0, BLOCK_RD)[None, :]
        i, mask = t[:, None] * RD + c, rows_mask & (c < RD)
        return (tl.load(cos + i, mask=mask, other=0.0).to(tl.float32),
                tl.load(sin + i, mask=mask, other=0.0).to(tl.float32))

    @triton.jit
    def _rstd(x1, x2, x3, D: tl.constexpr, eps):
        """1 / RMS of each row of a head given as its three tiles, as a column."""
        return tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1) + tl.sum(x3 * x3, 1)) / D + eps)[:, None]

    @triton.jit
    def _fwd_kernel(qkv, cos, sin, gain, q_out, k_out, v_out, N, T, eps: tl.constexpr,
                    H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, RD: tl.constexpr, REST: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_RD: tl.constexpr, BLOCK_REST: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        pid, h = tl.program_id(0), tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_mask = (rows < N)[:, None]
        src = qkv + rows[:, None] * ((H + 2 * KV) * D) + h * D
        if h < H + KV:
            x1, x2, x3 = _load_head(src, rows_mask, RD, REST, BLOCK_RD, BLOCK_REST)
            cs, sn = _load_rope(cos, sin, rows % T, rows_mask, RD, BLOCK_RD)
            r = _rstd(x1, x2, x3, D, eps)
            rg = r * tl.load(gain + h, mask=h < H, other=1.0).to(tl.float32)
            y1, y2, y3 = (x1 * cs + x2 * sn) * rg, (x2 * cs - x1 * sn) * rg, x3 * rg
            if h < H:
                _store_head(q_out + rows[:, None] * (H * D) + h * D, y1, y2, y3, rows_mask,
                            RD, REST, BLOCK_RD, BLOCK_REST)
            else:
                _store_head(k_out + rows[:, None] * (KV * D) + (h - H) * D, y1, y2, y3, rows_mask,
                            RD, REST, BLOCK_RD, BLOCK_REST)
        else:
            d = tl.arange(0, BLOCK_D)[None, :]
            v = tl.load(src + d, mask=rows_mask & (d < D), other=0.0)
            tl.store(v_out + rows[:, None] * (KV * D) + (h - H - KV) * D + d, v, mask=rows_mask & (d < D))

    @triton.jit
    def _bwd_kernel(dq, dk, dv, qkv, cos, sin, gain, dqkv, dgain_parts, N, T,
                    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, eps: tl.constexpr,
                    H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, RD: tl.constexpr, REST: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_RD: tl.constexpr, BLOCK_REST: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        pid, h = tl.program_id(0), tl.program_id(1)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_mask = (rows < N)[:, None]
        b, t = rows // T, rows % T
        W = (H + 2 * KV) * D
        dst = dqkv + rows[:, None] * W + h * D
        if h < H + KV:
            x1, x2, x3 = _load_head(qkv + rows[:, None] * W + h * D, rows_mask, RD, REST, BLOCK_RD, BLOCK_REST)
            if h < H:
                grad = dq + (b * sq_b + t * sq_t)[:, None] + h * sq_h
            else:
                grad = dk + (b * sk_b + t * sk_t)[:, None] + (h - H) * sk_h
            g1, g2, g3 = _load_head(grad, rows_mask, RD, REST, BLOCK_RD, BLOCK_REST)
            cs, sn = _load_rope(cos, sin, t, rows_mask, RD, BLOCK_RD)
            r = _rstd(x1, x2, x3, D, eps)
            n1, n2, n3 = x1 * r, x2 * r, x3 * r
            y1, y2 = n1 * cs + n2 * sn, n2 * cs - n1 * sn
            dgain = tl.sum(g1 * y1, 1) + tl.sum(g2 * y2, 1) + tl.sum(g3 * n3, 1)
            tl.store(dgain_parts + pid * (H + KV) + h, tl.sum(dgain, 0))
            gain_h = tl.load(gain + h, mask=h < H, other=1.0).to(tl.float32)
            dn1, dn2, dn3 = (g1 * cs - g2 * sn) * gain_h, (g1 * sn + g2 * cs) * gain_h, g3 * gain_h
            dot = ((tl.sum(dn1 * n1, 1) + tl.sum(dn2 * n2, 1) + tl.sum(dn3 * n3, 1)) / D)[:, None]
            _store_head(dst, r * (dn1 - n1 * dot), r * (dn2 - n2 * dot), r * (dn3 - n3 * dot), rows_mask,
                        RD, REST, BLOCK_RD, BLOCK_REST)
        else:
            d = tl.arange(0, BLOCK_D)[None, :]
            g_v = tl.load(dv + (b * sv_b + t * sv_t)[:, None] + (h - H - KV) * sv_h + d,
                          mask=rows_mask & (d < D), other=0.0)
            tl.store(dst + d, g_v.to(dqkv.dtype.element_ty), mask=rows_mask & (d < D))


def _blocks(D: int, RD: int) -> dict:
    """Constexpr tile sizes for head dim D with the first 2 RD dims rotated. Plain ints where a dynamic-shape compile
    (the LoRA TTT's) traces them as symbols: a graph specializes on the head's dims, never on the rows."""
    D, RD = int(D), int(RD)
    rest = D - 2 * RD
    return dict(D=D, RD=RD, REST=rest, BLOCK_N=BLOCK_ROWS, BLOCK_RD=triton.next_power_of_2(RD),
                BLOCK_REST=triton.next_power_of_2(max(rest, 1)), BLOCK_D=triton.next_power_of_2(D))


def _grid(N: int, heads: int, kv_heads: int) -> tuple[int, int]:
    return triton.cdiv(N, BLOCK_ROWS), heads + 2 * kv_heads


def _new_qkv(qkv: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Empty q, k, v (B, T, heads or kv_heads, D) for (B, T, (heads + 2 kv_heads) D) qkv rows."""
    B, T, W = qkv.shape
    D = W // (heads + 2 * kv_heads)
    return tuple(qkv.new_empty(B, T, n, D) for n in (heads, kv_heads, kv_heads))


def unwrapped(kernel):
    """A kernel launched as it is (outside a triton op; inside one, `torch.library.wrap_triton` wraps it)."""
    return kernel


def _launch_forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor,
                    heads: int, kv_heads: int, wrap=unwrapped) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, _ = qkv.shape
    q, k, v = _new_qkv(qkv, heads, kv_heads)
    wrap(_fwd_kernel)[_grid(B * T, heads, kv_heads)](
        qkv, cos, sin, gain, q, k, v, B * T, T, eps=EPS, H=heads, KV=kv_heads, **_blocks(q.size(-1), cos.size(-1)),
        num_warps=NUM_WARPS)
    return q, k, v


def _launch_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, gain: torch.Tensor, heads: int, kv_heads: int,
                     wrap=unwrapped) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, W = qkv.shape
    D = W // (heads + 2 * kv_heads)
    dq, dk, dv = (g if g.stride(-1) == 1 else g.contiguous() for g in (dq, dk, dv))
    grid = _grid(B * T, heads, kv_heads)
    dqkv = torch.empty_like(qkv)
    dgain_parts = torch.empty(grid[0], heads + kv_heads, device=qkv.device, dtype=torch.float32)
    wrap(_bwd_kernel)[grid](
        dq, dk, dv, qkv, cos, sin, gain, dqkv, dgain_parts, B * T, T,
        *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        eps=EPS, H=heads, KV=kv_heads, **_blocks(D, cos.size(-1)), num_warps=NUM_WARPS)
    return dqkv, dgain_parts[:, :heads].sum(0).to(gain.dtype)


def _setup_context(ctx, inputs, output):
    qkv, cos, sin, gain, heads, kv_heads = inputs
    ctx.save_for_backward(qkv, cos, sin, gain)
    ctx.heads, ctx.kv_heads = heads, kv_heads


def _grads(ctx, dq, dk, dv, launch_backward=_launch_backward):
    """The inputs' gradients from the saved context, by `launch_backward`: the kernels eager, the backward op compiled."""
    qkv, cos, sin, gain = ctx.saved_tensors
    dqkv, dgain = launch_backward(dq, dk, dv, qkv, cos, sin, gain, ctx.heads, ctx.kv_heads)
    return dqkv, None, None, dgain, None, None


@functools.cache
def define_compiled_ops() -> None:
    """Defines torch.ops.pgolf.qk_norm_rope (and its backward), which a compiled model calls: triton ops, whose
    kernel launches inductor traces into its own graph and makes from its generated code (as custom ops they cost
    ~0.3 ms of host time a call in Python dispatch and Triton's launcher, 272 calls a step at micro-batch 24,576).
    Call it before torch.compile of a model; outside compile the kernels run from an autograd Function. Not done at
    import: defining an op imports dynamo (~1 s), which a stage that only evaluates the model would pay for nothing."""
    @torch.library.triton_op("pgolf::qk_norm_rope", mutates_args=())
    def forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gain: torch.Tensor,
                heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _launch_forward(qkv, cos, sin, gain, heads, kv_heads, torch.library.wrap_triton)

    @torch.library.triton_op("pgolf::qk_norm_rope_backward", mutates_args=())
    def backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, gain: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_backward(dq, dk, dv, qkv, cos, sin, gain, heads, kv_heads, torch.library.wrap_triton)

    forward.register_autograd(lambda ctx, dq, dk, dv: _grads(ctx, dq, dk, dv, backward), setup_context=_setup_context)


class _EagerQKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, gain, heads, kv_heads):
        _setup_context(ctx, (qkv, cos, sin, gain, heads, kv_heads), None)
        return _launch_forward(qkv, cos, sin, gain, heads, kv_heads)

    backward = staticmethod(_grads)


def qk_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_gain: torch.Tensor,
                 heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, (heads + 2 kv_heads) D) qkv rows -> q, k, v as (B, T, heads or kv_heads, D): q and k RMS-normed
    per head, rotated by the (T, rd) cos/sin tables, q times q_gain per head."""
    op = torch.ops.pgolf.qk_norm_rope if torch.compiler.is_compiling() else _EagerQKNormRope.apply
    return op(qkv.contiguous(), cos.contiguous(), sin.contiguous(), q_gain, heads, kv_heads)
