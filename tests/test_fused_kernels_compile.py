"""The fused kernels compile for an H100 with the argument types a compiled graph launches them with.

Inductor types a triton op's Python float arguments fp64 (torch/_inductor/codegen/triton_utils.py), where an eager
launch types them fp32: a kernel that mixes such a float into an fp32 loop-carried value fails to compile only inside
torch.compile, and one that mixes it into its maths silently computes in fp64. Triton's compiler runs without a GPU,
so each kernel is compiled here for sm_90 from the arguments its own launcher passes, typed as inductor types them.
"""

import pytest

pytest.importorskip("triton")
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from conftest import LaunchRecorder  # noqa: E402

from pgolf import fused_ce, fused_qk  # noqa: E402

POINTER = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64", torch.int32: "*i32"}


def inductor_signature(kernel, bound: dict) -> tuple[dict, dict]:
    signature, constexprs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = bound[name]
        if i in kernel.constexprs:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp64"  # inductor keeps a Python float's precision
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
    return signature, constexprs


def launches() -> list:
    """Each kernel's launch as its launcher makes it: (kernel, its arguments by name)."""
    rec = LaunchRecorder()
    N, V = 6, 8192
    logits, targets = torch.randn(N, V, dtype=torch.bfloat16), torch.randint(0, V, (N,))
    fused_ce._launch_forward(logits, targets, 30.0, rec)
    fused_ce._launch_backward(logits, targets, torch.zeros(N), torch.ones(N), 30.0, rec)
    B, T, H, KV, D, RD = 2, 16, 8, 4, 64, 16
    qkv, cos, sin, gain = (torch.randn(B, T, (H + 2 * KV) * D, dtype=torch.bfloat16), torch.randn(T, RD),
                           torch.randn(T, RD), torch.ones(H))
    q, k, v = fused_qk._launch_forward(qkv, cos, sin, gain, H, KV, rec)
    fused_qk._launch_backward(q, k, v, qkv, cos, sin, gain, H, KV, rec)
    tuning = ("num_warps", "num_stages")
    return [(kernel, dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in tuning})
            for kernel, _, args, kwargs in rec.launches]


def test_each_kernel_compiles_for_sm90_in_fp32_with_inductors_argument_types():
    recorded = launches()
    assert [k.fn.__module__ + "." + k.fn.__name__ for k, _ in recorded] == [
        "pgolf.fused_ce._fwd_kernel", "pgolf.fused_ce._bwd_kernel", "pgolf.fused_qk._fwd_kernel",
        "pgolf.fused_qk._bwd_kernel"]
    for kernel, bound in recorded:
        signature, constexprs = inductor_signature(kernel, bound)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert "f64" not in compiled.asm["ttir"], f"{kernel.fn.__name__} computes in fp64"
