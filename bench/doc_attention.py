"""Document-masked attention on the GPU: FlexAttention's block mask against PyTorch's varlen attention
(FlashAttention-2 kernels), with causal cuDNN SDPA (no document mask) for scale. Which should pgolf's trainer use?

    python bench/doc_attention.py --mirror DIR [--rows 12] [--seq-len 2048] [--flex-grid best.json]   (CUDA only)

The documents are the first rows x seq-len tokens of DIR's first train shard (a `pgolf mirror`), cut at each BOS as
pgolf's trainer cuts them (--bos-id -1: at row starts only, so every backend computes plain causal attention, the
baseline config's). Causal cuDNN runs on pgolf's (B, T, H, D) views and on (B, H, T, D) copies. Forward + backward of
(rows, seq-len, 8 heads, 4 KV heads, head dim 64) bf16, timed with triton's do_bench; each masked backend's output is
compared with the other's. Prints a table, writes --out.
With --flex-grid, FlexAttention's kernel configs are timed too: each forward candidate on the forward, then each
backward candidate on forward + backward behind the fastest forward; the fastest pair is written to the file named
(for `train_throughput.py --flex-options`, and pgolf.attention.FLEX_KERNEL_OPTIONS).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pgolf import attention  # noqa: E402
from pgolf.data import read_shard, shard_paths  # noqa: E402

H, KV, D = 8, 4, 64

# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first is inductor's default on an H100 for head dim 64, bf16
FWD_GRID = [(128, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 2)]
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages); the first is inductor's sm90 default
BWD_GRID = [(64, 128, 128, 64, 8, 3), (64, 64, 64, 64, 4, 3), (32, 128, 128, 32, 4, 3), (64, 128, 128, 64, 4, 3),
            (64, 128, 128, 64, 8, 2), (64, 64, 64, 64, 4, 4), (32, 64, 64, 32, 4, 3)]


def fwd_options(c: tuple) -> dict:
    return {"fwd_BLOCK_M": c[0], "fwd_BLOCK_N": c[1], "fwd_num_warps": c[2], "fwd_num_stages": c[3]}


def bwd_options(c: tuple) -> dict:
    return {"bwd_BLOCK_M1": c[0], "bwd_BLOCK_N1": c[1], "bwd_BLOCK_M2": c[2], "bwd_BLOCK_N2": c[3],
            "bwd_num_warps": c[4], "bwd_num_stages": c[5]}


def flex_grid(run, leaves: list, grad: torch.Tensor) -> tuple[list[dict], dict]:
    """Time each candidate (a fresh compile of flex under its options); a candidate that fails to compile or run is
    reported and skipped. Returns the rows and the fastest forward + backward pair's options."""
    rows, best_fwd = [], ({}, float("inf"))

    def timed(options: dict, backward: bool) -> float | str:
        attention.tune_flex(options)
        torch._dynamo.reset()
        try:
            if backward:
                return do_bench(lambda: torch.autograd.grad(run("flex"), leaves, grad), warmup=25, rep=200)
            with torch.no_grad():
                return do_bench(lambda: run("flex"), warmup=25, rep=200)
        except Exception as e:  # noqa: BLE001 - a config past the GPU's shared memory: reported, not fatal
            return f"failed: {type(e).__name__}"
    for c in FWD_GRID:
        ms = timed(fwd_options(c), backward=False)
        rows.append({"pass": "forward", "config": c, "ms": ms if isinstance(ms, str) else round(ms, 3)})
        if not isinstance(ms, str) and ms < best_fwd[1]:
            best_fwd = (fwd_options(c), ms)
    best = (best_fwd[0], float("inf"))
    for c in BWD_GRID:
        ms = timed(best_fwd[0] | bwd_options(c), backward=True)
        rows.append({"pass": "forward + backward", "config": c, "ms": ms if isinstance(ms, str) else round(ms, 3)})
        if not isinstance(ms, str) and ms < best[1]:
            best = (best_fwd[0] | bwd_options(c), ms)
    attention.tune_flex(None)
    return rows, best[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mirror", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bos-id", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("doc_attention.json"))
    ap.add_argument("--flex-grid", type=Path, help="also time FlexAttention's kernel configs; the fastest to this file")
    args = ap.parse_args()
    data = next(p for p in (args.mirror / "datasets" / "datasets").iterdir() if p.is_dir())
    n = args.rows * args.seq_len
    idx = torch.from_numpy(read_shard(shard_paths(data, "train")[0])[:n].astype("int64")).view(args.rows, -1).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(args.rows, args.seq_len, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
              .requires_grad_() for h in (H, KV, KV)]
    grad = torch.randn(args.rows, args.seq_len, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    masks = {b: attention.document_mask(idx, args.bos_id, b) for b in ("flex", "varlen")}
    # the same q, k, v laid out (B, H, T, D) in memory, as SDPA's kernels index them (pgolf's are transposed views)
    heads_first = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in leaves]

    def run(backend: str):
        if backend == "causal cuDNN":
            return attention.attention(*leaves)
        if backend == "causal cuDNN, heads first":
            with sdpa_kernel(attention.CUDA_SDPA_ORDER):
                return F.scaled_dot_product_attention(*heads_first, is_causal=True, enable_gqa=True).transpose(1, 2)
        return attention.attention(*leaves, masks[backend])

    rows, outs = [], {}
    for backend in ("flex", "varlen", "causal cuDNN", "causal cuDNN, heads first"):
        wrt = heads_first if backend.endswith("heads first") else leaves
        outs[backend] = run(backend).float()
        fwd = do_bench(lambda: run(backend), warmup=25, rep=200)
        both = do_bench(lambda: torch.autograd.grad(run(backend), wrt, grad), warmup=25, rep=200)
        rows.append({"backend": backend, "forward_ms": round(fwd, 3), "forward_backward_ms": round(both, 3)})
    diff = (outs["flex"] - outs["varlen"]).abs().max().item()
    docs = int((idx == args.bos_id).sum()) + args.rows
    print(f"{args.rows} x {args.seq_len} tokens, {docs} documents (cut at rows), {torch.cuda.get_device_name()}")
    print("| backend | forward ms | forward + backward ms |\n|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['forward_ms']} | {r['forward_backward_ms']} |")
    print(f"flex vs varlen output: max abs diff {diff:.2e}")
    result = {"gpu": torch.cuda.get_device_name(), "rows": args.rows, "seq_len": args.seq_len, "documents": docs,
              "max_abs_diff_flex_varlen": diff, "table": rows}
    if args.flex_grid:
        grid, best = flex_grid(run, leaves, grad)
        print("| flex pass timed | config | ms |\n|---|---|---|")
        for r in grid:
            print(f"| {r['pass']} | {r['config']} | {r['ms']} |")
        print(f"fastest: {best}")
        args.flex_grid.write_text(json.dumps(best))
        result |= {"flex_grid": grid, "flex_best": best}
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
