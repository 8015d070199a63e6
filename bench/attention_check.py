"""Causal GQA attention on the GPU: is cuDNN's native GQA right, and is it faster than repeating K/V?

    python bench/attention_check.py      (CUDA only; writes bench/results/attention_check.json)
Each variant's output and gradients are compared with an fp32 math-backend reference (fresh random inputs),
in two memory layouts: separate contiguous (B, H, T, D) tensors, and the model's (q, k, v as transposed views
of one (B, T, (H + 2 KV) D) matmul output). The strides of the dk cuDNN returns are printed: the layout the
compiled model's rope backward has to read.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

B, T, H, KV, D = 32, 1024, 8, 4, 64


def run(q, k, v, backend, repeat: bool):
    if repeat:
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not repeat)


def views(leaf: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (B, heads, T, D) from one leaf holding the three."""
    if layout == "BHTD":
        return leaf[:, :H], leaf[:, H:H + KV], leaf[:, H + KV:]
    q, k, v = leaf.split((H * D, KV * D, KV * D), dim=-1)
    return q.view(B, T, H, D).transpose(1, 2), k.view(B, T, KV, D).transpose(1, 2), v.view(B, T, KV, D).transpose(1, 2)


def make_leaf(layout: str, dtype: torch.dtype) -> torch.Tensor:
    shape = (B, H + 2 * KV, T, D) if layout == "BHTD" else (B, T, (H + 2 * KV) * D)
    return torch.randn(shape, device="cuda", dtype=dtype)


def main() -> None:
    torch.manual_seed(0)
    dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    flops = 4 * B * H * T * T * D / 2 * 3.5  # causal fwd (2 matmuls) + bwd (2.5x)
    rows = []
    for layout in ("BHTD", "model"):
        base = make_leaf(layout, torch.float32)
        ref_leaf = base.clone().requires_grad_()
        ref = run(*views(ref_leaf, layout), SDPBackend.MATH, repeat=False)
        ref.backward(dout.float())
        refs = [ref.detach()] + [g for g in views(ref_leaf.grad, layout)]
        leaf = base.bfloat16().requires_grad_()
        for name, backend, repeat in [("cudnn, K/V repeated", SDPBackend.CUDNN_ATTENTION, True),
                                      ("cudnn, native GQA", SDPBackend.CUDNN_ATTENTION, False),
                                      ("flash, native GQA", SDPBackend.FLASH_ATTENTION, False)]:
            leaf.grad = None
            q, k, v = views(leaf, layout)
            dk_strides = []
            k.register_hook(lambda g: dk_strides.append(tuple(g.stride())))
            try:
                out = run(q, k, v, backend, repeat)
                out.backward(dout)
            except RuntimeError as e:
                rows.append({"layout": layout, "variant": name, "error": str(e).splitlines()[0][:120]})
                continue
            errs = [float((a.float() - r).norm() / r.norm()) for a, r in zip([out.detach(), *views(leaf.grad, layout)], refs)]

            def step():
                run(*views(leaf, layout), backend, repeat).backward(dout)

            ms = do_bench(step, warmup=50, rep=300, return_mode="median")
            rows.append({"layout": layout, "variant": name, "rel_err_out_dq_dk_dv": [round(e, 5) for e in errs],
                         "fwd_bwd_ms": round(ms, 3), "tflops": round(flops / ms / 1e9, 1), "dk_strides": dk_strides[0]})
    print(f"B={B} T={T} heads {H}/{KV} head_dim {D}, bf16, causal, fwd+bwd (grads into the layout's leaf included)")
    print("| layout | variant | rel err out / dq / dk / dv | fwd+bwd ms | TFLOP/s | dk strides |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['layout']} | {r['variant']} | refused: {r['error']} | - | - | - |")
        else:
            print(f"| {r['layout']} | {r['variant']} | {' / '.join(f'{e:.1e}' for e in r['rel_err_out_dq_dk_dv'])} | "
                  f"{r['fwd_bwd_ms']} | {r['tflops']} | {r['dk_strides']} |")
    bad = [r for r in rows if "error" not in r and max(r["rel_err_out_dq_dk_dv"]) > 2e-2]
    out = Path(__file__).resolve().parent / "results" / "attention_check.json"
    out.write_text(json.dumps(rows, indent=2))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
