"""The fused softcapped cross-entropy (pgolf/fused_ce.py) on the GPU: as exact as the eager path, and faster?

    python bench/fused_ce_check.py      (CUDA only; writes bench/results/fused_ce_check.json)
The record preset's head: 8,192 logits a token, softcap 30, bf16 logits as the head's matmul makes them, 24,576
tokens (one micro-batch of the parity bench). Errors of the loss and of the logits' gradient are measured against an
fp64 run of the eager maths on the same bf16 logits, for the fused kernels and for the eager path compiled (what
inductor made of model.py's softcap + cross_entropy). Times: forward + backward through autograd, both compiled.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.append(str(Path(__file__).resolve().parents[1]))
from pgolf import fused_ce  # noqa: E402

N, V, CAP = 24_576, 8192, 30.0


def eager(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    return F.cross_entropy(CAP * torch.tanh(z / CAP), targets)


def fused(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return fused_ce.softcapped_cross_entropy(logits, targets, CAP).mean()


def loss_and_grad(fn, logits, targets):
    logits = logits.detach().requires_grad_()
    loss = fn(logits, targets)
    loss.backward()
    return loss.detach().double(), logits.grad.double()


def main() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(N, V, device="cuda") * 4).bfloat16()
    targets = torch.randint(0, V, (N,), device="cuda")
    ref_loss, ref_grad = loss_and_grad(eager, logits.double(), targets)
    scale = ref_grad.abs().max().item()
    rows = {}
    fused_ce.define_compiled_ops()
    for name, fn in (("fused kernels", torch.compile(fused, fullgraph=True)), ("eager compiled", torch.compile(eager))):
        loss, grad = loss_and_grad(fn, logits, targets)
        ms = do_bench(lambda: loss_and_grad(fn, logits, targets), warmup=10, rep=50)
        rows[name] = {"loss_abs_err": abs(loss - ref_loss).item(), "grad_max_rel_err": (grad - ref_grad).abs().max().item()
                      / scale, "ms_fwd_bwd": round(ms, 3)}
    rows["speedup"] = round(rows["eager compiled"]["ms_fwd_bwd"] / rows["fused kernels"]["ms_fwd_bwd"], 3)
    print(f"| path | loss error | grad max error / max grad | ms fwd+bwd ({N:,} x {V:,}) |\n|---|---|---|---|")
    for name in ("fused kernels", "eager compiled"):
        r = rows[name]
        print(f"| {name} | {r['loss_abs_err']:.2e} | {r['grad_max_rel_err']:.2e} | {r['ms_fwd_bwd']:.3f} |")
    print(f"fused speedup: {rows['speedup']}x")
    out = Path(__file__).parent / "results" / "fused_ce_check.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), **rows}, indent=1) + "\n")
    fused_ok = rows["fused kernels"]["loss_abs_err"] < 1e-3 and rows["fused kernels"]["grad_max_rel_err"] < 2e-2
    sys.exit(0 if fused_ok else 1)


if __name__ == "__main__":
    main()
