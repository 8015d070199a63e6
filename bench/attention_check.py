"""Causal GQA attention on the GPU: is cuDNN's native GQA right, and is it faster than repeating K/V?

    python bench/attention_check.py      (CUDA only; writes bench/results/attention_check.json)
Each variant's output and gradients are compared with an fp32 math-backend reference (fresh random inputs).
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


def main() -> None:
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = run(*ref_in, SDPBackend.MATH, repeat=False)
    ref.backward(dout.float())
    refs = [ref.detach()] + [t.grad for t in ref_in]
    flops = 4 * B * H * T * T * D / 2 * 3.5  # causal fwd (2 matmuls) + bwd (2.5x)
    rows = []
    for name, backend, repeat in [("cudnn, K/V repeated", SDPBackend.CUDNN_ATTENTION, True),
                                  ("cudnn, native GQA", SDPBackend.CUDNN_ATTENTION, False),
                                  ("flash, native GQA", SDPBackend.FLASH_ATTENTION, False)]:
        for t in (q, k, v):
            t.grad = None
        try:
            out = run(q, k, v, backend, repeat)
            out.backward(dout)
        except RuntimeError as e:
            rows.append({"variant": name, "error": str(e).splitlines()[0][:120]})
            continue
        errs = [float((a.float() - r).norm() / r.norm()) for a, r in zip([out.detach(), q.grad, k.grad, v.grad], refs)]

        def step():
            run(q, k, v, backend, repeat).backward(dout)

        ms = do_bench(step, warmup=50, rep=300, return_mode="median")
        rows.append({"variant": name, "rel_err_out_dq_dk_dv": [round(e, 5) for e in errs], "fwd_bwd_ms": round(ms, 3),
                     "tflops": round(flops / ms / 1e9, 1)})
    print(f"B={B} T={T} heads {H}/{KV} head_dim {D}, bf16, causal, fwd+bwd")
    print("| variant | rel err out / dq / dk / dv | fwd+bwd ms | TFLOP/s |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | refused: {r['error']} | - | - |")
        else:
            print(f"| {r['variant']} | {' / '.join(f'{e:.1e}' for e in r['rel_err_out_dq_dk_dv'])} | {r['fwd_bwd_ms']} | {r['tflops']} |")
    bad = [r for r in rows if "error" not in r and max(r["rel_err_out_dq_dk_dv"]) > 2e-2]
    out = Path(__file__).resolve().parent / "results" / "attention_check.json"
    out.write_text(json.dumps(rows, indent=2))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
