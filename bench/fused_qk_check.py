"""The fused q/k kernels (pgolf/fused_qk.py) on the GPU: as exact as the compiled torch path, and faster?

    python bench/fused_qk_check.py      (CUDA only; writes bench/results/fused_qk_check.json)
One layer of the baseline (8 heads / 4 KV, head dim 64, seq 1024), bf16 qkv rows as the matmul makes them.
Errors are measured against an fp64 run of the torch path on the same bf16 inputs, for the fused kernels and for
the compiled torch path (what inductor made of model.py before). Times: the fused kernels alone, forward and
backward (the ops called directly, 262,144 tokens: no autograd or host time in them) with the bandwidth of the
bytes they must move (4 KiB/token forward, 5.5 KiB backward); the compiled torch path forward + backward through
autograd, the same for the fused op, as a comparison that includes host time.
"""

import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.append(str(Path(__file__).resolve().parents[1]))
from pgolf import fused_qk  # noqa: E402
from pgolf.model import GPT, qk_norm_rope  # noqa: E402

T, H, KV, D = 1024, 8, 4, 64


def torch_path(qkv, cos, sin, gain):
    """model.py's Attention.forward between the qkv matmul and attention."""
    return qk_norm_rope(qkv, cos, sin, gain, H, KV)


def fwd_bwd(fn, qkv, cos, sin, gain, douts):
    qkv, gain = qkv.detach().requires_grad_(), gain.detach().requires_grad_()
    with torch.autocast("cuda", torch.bfloat16, enabled=qkv.dtype != torch.float64):  # as in training
        outs = fn(qkv, cos, sin, gain)
    torch.autograd.backward(outs, douts)
    return [o.detach() for o in outs] + [qkv.grad, gain.grad]


def model_check() -> dict:
    """The baseline GPT (random weights, 8 sequences), loss and gradients: fused vs the torch path compiled, and
    the torch path eager vs compiled as the yardstick of bf16 rounding-order noise."""
    from train_throughput import BASELINE
    torch.manual_seed(0)
    model = GPT(BASELINE[0]).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # zero-initialized projections would hide the attention path
    idx, tgt = torch.randint(0, 1024, (2, 8, 1024), device="cuda")
    runs = {}
    fused_qk.define_compiled_ops()
    for label, fused, compile in (("torch eager", False, False), ("torch compiled", False, True),
                                  ("fused compiled", True, True)):
        fused_qk.enabled = fused
        torch._dynamo.reset()
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16):
            loss = (torch.compile(model) if compile else model)(idx, tgt)
        loss.backward()
        runs[label] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    fused_qk.enabled = True

    def diff(a, b):
        return dict(loss=abs(runs[a][0] - runs[b][0]),
                    grad_rel=((runs[a][1] - runs[b][1]).norm() / runs[b][1].norm()).item())
    out = {"fused vs torch compiled": diff("fused compiled", "torch compiled"),
           "torch eager vs compiled (noise yardstick)": diff("torch eager", "torch compiled")}
    for k, v in out.items():
        print(f"model, {k}: |loss diff| {v['loss']:.2e}, gradient relative diff {v['grad_rel']:.2e}")
    return out


def inputs(B: int):
    qkv = (torch.randn(B, T, (H + 2 * KV) * D, device="cuda") * 0.7).bfloat16()
    angles = torch.outer(torch.arange(T, device="cuda", dtype=torch.float32),
                         1.0 / 10000 ** (torch.arange(D // 2, device="cuda") / (D // 2)))
    gain = 1.5 + 0.1 * torch.randn(H, device="cuda")
    douts = [torch.randn(B, T, n, D, device="cuda", dtype=torch.bfloat16) for n in (H, KV, KV)]
    return qkv, angles.cos().bfloat16(), angles.sin().bfloat16(), gain, douts


def fused(qkv, cos, sin, gain):
    return fused_qk.qk_norm_rope(qkv, cos, sin, gain, H, KV)


def main() -> None:
    result = {"model": model_check(), "errors": {}, "timings": []}
    torch.manual_seed(0)
    qkv, cos, sin, gain, douts = inputs(64)
    compiled = torch.compile(torch_path)
    ref = fwd_bwd(torch_path, qkv.double(), cos.double(), sin.double(), gain.double(), [d.double() for d in douts])
    names = ["q", "k", "v", "dqkv", "dgain"]
    for label, fn in (("compiled torch", compiled), ("fused", fused)):
        got = fwd_bwd(fn, qkv, cos, sin, gain, douts)
        errs = {n: ((g.double() - r).norm() / r.norm()).item() for n, g, r in zip(names, got, ref)}
        result["errors"][label] = errs
        print(f"{label:15s} relative error vs fp64: " + "  ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    e_f, e_c = result["errors"]["fused"], result["errors"]["compiled torch"]
    result["fused_within_compiled_error"] = all(e_f[n] <= 1.5 * e_c[n] + 1e-6 for n in names)

    B = 256
    qkv, cos, sin, gain, douts = inputs(B)
    tokens, per_step = B * T, 524_288 / (B * T) * 9  # the baseline step: 524,288 tokens, 9 layers
    rows = [("compiled torch, fwd+bwd with autograd", do_bench(lambda: fwd_bwd(compiled, qkv, cos, sin, gain, douts)), 0)]
    for block_rows, num_warps in [(bn, nw) for bn in (16, 32, 64) for nw in (2, 4, 8)]:
        fused_qk.BLOCK_ROWS, fused_qk.NUM_WARPS = block_rows, num_warps
        fwd = do_bench(lambda: torch.ops.pgolf.qk_norm_rope(qkv, cos, sin, gain, H, KV))
        bwd = do_bench(lambda: torch.ops.pgolf.qk_norm_rope_backward(*douts, qkv, cos, sin, gain, H, KV))
        rows += [(f"fused fwd, rows={block_rows} warps={num_warps}", fwd, 4096),
                 (f"fused bwd, rows={block_rows} warps={num_warps}", bwd, 5632)]
    rows.append(("fused, fwd+bwd with autograd (last config)", do_bench(lambda: fwd_bwd(fused, qkv, cos, sin, gain, douts)), 0))
    print(f"\n| variant ({tokens} tokens) | ms / layer | ms / baseline step | TB/s |")
    print("|---|---|---|---|")
    for label, ms, nbytes in rows:
        tbs = nbytes * tokens / (ms * 1e-3) / 1e12
        print(f"| {label} | {ms:.3f} | {ms * per_step:.1f} | {f'{tbs:.2f}' if nbytes else '-'} |")
        result["timings"].append(dict(label=label, ms_per_layer=ms, ms_per_baseline_step=ms * per_step))
    out = Path("bench/results/fused_qk_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("fused within the compiled path's error:", result["fused_within_compiled_error"])


if __name__ == "__main__":
    main()
