"""Document-masked attention on the GPU: FlexAttention's block mask against PyTorch's varlen attention
(FlashAttention-2 kernels), with causal cuDNN SDPA (no document mask) for scale. Which should pgolf's trainer use?

    python bench/doc_attention.py --mirror DIR [--rows 12] [--seq-len 2048]     (CUDA only)

The documents are the first rows x seq-len tokens of DIR's first train shard (a `pgolf mirror`), cut at each BOS as
pgolf's trainer cuts them. Forward + backward of (rows, seq-len, 8 heads, 4 KV heads, head dim 64) bf16, timed with
triton's do_bench; each masked backend's output is compared with the other's. Prints a table, writes --out.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgolf import attention  # noqa: E402
from pgolf.data import read_shard, shard_paths  # noqa: E402

H, KV, D = 8, 4, 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mirror", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bos-id", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("doc_attention.json"))
    args = ap.parse_args()
    data = next(p for p in (args.mirror / "datasets" / "datasets").iterdir() if p.is_dir())
    n = args.rows * args.seq_len
    idx = torch.from_numpy(read_shard(shard_paths(data, "train")[0])[:n].astype("int64")).view(args.rows, -1).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(args.rows, args.seq_len, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
              .requires_grad_() for h in (H, KV, KV)]
    grad = torch.randn(args.rows, args.seq_len, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    masks = {b: attention.document_mask(idx, args.bos_id, b) for b in ("flex", "varlen")}

    def run(backend: str):
        if backend == "causal cuDNN":
            return attention.attention(*leaves)
        return attention.attention(*leaves, masks[backend])

    rows, outs = [], {}
    for backend in ("flex", "varlen", "causal cuDNN"):
        outs[backend] = run(backend).float()
        fwd = do_bench(lambda: run(backend), warmup=25, rep=200)
        both = do_bench(lambda: torch.autograd.grad(run(backend), leaves, grad), warmup=25, rep=200)
        rows.append({"backend": backend, "forward_ms": round(fwd, 3), "forward_backward_ms": round(both, 3)})
    diff = (outs["flex"] - outs["varlen"]).abs().max().item()
    docs = int((idx == args.bos_id).sum()) + args.rows
    print(f"{args.rows} x {args.seq_len} tokens, {docs} documents (cut at rows), {torch.cuda.get_device_name()}")
    print("| backend | forward ms | forward + backward ms |\n|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['forward_ms']} | {r['forward_backward_ms']} |")
    print(f"flex vs varlen output: max abs diff {diff:.2e}")
    args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": args.rows, "seq_len": args.seq_len,
                                    "documents": docs, "max_abs_diff_flex_varlen": diff, "table": rows}, indent=1))


if __name__ == "__main__":
    main()
