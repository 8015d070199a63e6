"""The fused q/k Triton kernels, run by Triton's interpreter on the CPU, against model.py's torch path."""

import os
import textwrap

import pytest
from conftest import LaunchRecorder, in_triton_interpreter

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import sys

    import torch
    from conftest import fused_against_eager, tiny_model
    from pgolf import fused_qk
    from pgolf.model import GPT, qk_norm_rope

    torch.manual_seed(0)
    # the eager path leaves torch.compile's machinery unimported (a custom op's first call imports it: seconds)
    loss = sum(o.sum() for o in fused_qk.qk_norm_rope(torch.randn(1, 4, 64, requires_grad=True), torch.ones(4, 4),
                                                       torch.zeros(4, 4), torch.ones(2), 2, 1))
    loss.backward()
    compile_modules = [m for m in sys.modules if m.startswith(("torch._dynamo", "torch._inductor"))]
    assert not compile_modules, compile_modules[:5]
    fused_qk.define_compiled_ops()

    # full rope, partial rope, no unrotated rest with odd sizes, a head dim that is no power of two,
    # a row count that leaves the last tile partial
    for B, T, H, KV, D, rd in [(2, 37, 4, 2, 16, 8), (1, 20, 2, 1, 32, 4), (2, 9, 2, 1, 24, 12), (3, 5, 2, 2, 24, 6)]:
        qkv = torch.randn(B, T, (H + 2 * KV) * D, requires_grad=True)
        angles = torch.outer(torch.arange(T, dtype=torch.float32), torch.rand(rd))
        cos, sin = angles.cos(), angles.sin()
        gain = (1 + torch.rand(H)).requires_grad_()
        assert fused_qk.usable(qkv)
        # eager (an autograd Function), the triton op a compiled graph calls (its autograd and backward op; run
        # eagerly: the interpreter's kernels can't be traced, bench/fused_qk_check.py checks it compiled on a GPU),
        # and the definition
        outs = [fused_qk.qk_norm_rope(qkv, cos, sin, gain, H, KV), torch.ops.pgolf.qk_norm_rope(qkv, cos, sin, gain, H, KV),
                qk_norm_rope(qkv, cos, sin, gain, H, KV)]
        weights = [torch.randn_like(o) for o in outs[-1]]
        grads = [torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, weights)), (qkv, gain)) for out in outs]
        for out, grad in zip(outs[:2], grads[:2]):
            for got, want in zip(list(out) + list(grad), list(outs[-1]) + list(grads[-1])):
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)

    # the whole model: fused kernels vs the torch path, with the options that touch q, k and v
    model = GPT(tiny_model(rope_dims=4, ve_last=2, xsa_last=1))
    grads = fused_against_eager(model, fused_qk, scale=0.05, atol=2e-5)
    q_gain = [n for n, _ in model.named_parameters()].index("blocks.0.attn.q_gain")
    assert grads[q_gain].abs().sum() > 0
    print("fused q/k kernels match the torch path")
""")


def test_fused_qk_kernels_match_the_torch_path_in_the_triton_interpreter():
    assert "fused q/k kernels match the torch path" in in_triton_interpreter(SCRIPT)


def test_fused_path_is_off_on_cpu_without_the_interpreter():
    import torch

    from pgolf import fused_qk
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on in this process")
    assert not fused_qk.usable(torch.zeros(1, 1, 8))


def test_a_dynamic_shape_trace_launches_on_symbolic_rows_and_fixed_tiles():
    """Under a dynamic-shape compile (the LoRA TTT's) the triton ops' bodies are traced with symbolic sizes: the grid
    follows the rows (B * T) as a symbol, the kernels' constexprs (head dims, tiles) are plain ints."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from pgolf import fused_qk
    rec = LaunchRecorder()
    H, KV, D, rd = 4, 2, 16, 6
    qkv, cos = torch.randn(2, 37, (H + 2 * KV) * D), torch.randn(37, rd)
    gain, dq, dk, dv = torch.ones(H), torch.randn(2, 37, H, D), torch.randn(2, 37, KV, D), torch.randn(2, 37, KV, D)
    make_fx(lambda qkv, cos: fused_qk._launch_forward(qkv, cos, cos, gain, H, KV, rec),
            tracing_mode="symbolic")(qkv, cos)
    make_fx(lambda dq, dk, dv, qkv, cos: fused_qk._launch_backward(dq, dk, dv, qkv, cos, cos, gain, H, KV, rec),
            tracing_mode="symbolic")(dq, dk, dv, qkv, cos)
    assert [k for k, _, _, _ in rec.launches] == [fused_qk._fwd_kernel, fused_qk._bwd_kernel]
    for _, (rows, heads), _, meta in rec.launches:
        assert isinstance(rows, torch.SymInt) and heads == H + 2 * KV
        constexprs = {k: v for k, v in meta.items() if k.isupper()}
        assert all(type(v) is int for v in constexprs.values()), constexprs
        assert constexprs | {"BLOCK_N": 0} == dict(H=H, KV=KV, D=D, RD=rd, REST=D - 2 * rd, BLOCK_N=0, BLOCK_RD=8,
                                                   BLOCK_REST=4, BLOCK_D=16)
