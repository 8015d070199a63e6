"""eval: score artifacts/compress/model.blob on the whole validation split, on eval.nproc_per_node processes."""

import time

import torch

from pgolf import evaluate, pack, paths, runtime, score, stage
from pgolf.config import load_params
from pgolf.data import load_val, shard_paths
from pgolf.errors import PgolfError
from pgolf.io import read_json, write_bytes, write_json


def check() -> None:
    """Before any rank starts: the blob compress recorded, and a validation split with its tokenizer."""
    if read_json(paths.BLOB_INFO)["bytes"] != (paths.BLOB.stat().st_size if paths.BLOB.is_file() else -1):
        raise PgolfError(f"{paths.BLOB}: missing or not the blob compress wrote (rerun compress)")
    load_val(paths.TOKENIZED)


def main() -> dict | None:
    params = load_params()
    cfg = params.eval
    rt = runtime.init()
    t0 = time.perf_counter()
    blob_sha = read_json(paths.BLOB_INFO)["sha256"]
    model = pack.load_model(paths.BLOB, rt.device, blob_sha)
    val = load_val(paths.TOKENIZED, model.cfg.vocab_size)
    load_seconds = time.perf_counter() - t0  # decoding the blob and building the model, inside eval_seconds
    s, record = evaluate.evaluate(model, val, cfg, rt.device)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # the quantization gap is taken like for like: plain windows, as the ema stage scored the float model
    plain_len = params.ema.eval_seq_len
    if evaluate.like_for_like(cfg, plain_len):
        plain = s
    else:  # test-time training has changed the weights: score the blob's own
        fresh = pack.load_model(paths.BLOB, rt.device) if cfg.mode != "sliding" else model
        plain = score.score(fresh, val, plain_len, 0, cfg.batch_seqs, device=rt.device, what="plain eval")
    if not rt.master:
        return None
    prequant = read_json(paths.metrics("ema"))["prequant_val_bpb"]
    model_bytes = paths.BLOB.stat().st_size
    inputs = [p.name for p in shard_paths(paths.TOKENIZED, "val") + shard_paths(paths.TOKENIZED, "val_bytes", False)]
    line = (f"eval: val_bpb {s.bpb:.6f} (quant gap {plain.bpb - prequant:+.6f}) | model {model_bytes:,} bytes | "
            f"{s.tokens:,} targets in {seconds:.1f}s")
    print(line)
    write_bytes(paths.EVAL_LOG, (line + "\n").encode())
    write_json(paths.EVAL_EVIDENCE, {  # what the audit checks
        "targets": s.tokens, "bytes": s.bytes, "targets_expected": val.tokens.numel() - 1,
        "bytes_expected": val.total_bytes, "gpu": runtime.gpu_name(rt.device),
        "gpu_count": rt.world if rt.device.type == "cuda" else 0, "inputs": inputs, "mode": cfg.mode,
        "blob_sha256": blob_sha, "val_sha256": val.sha256(), **record})
    return {"val_bpb": round(s.bpb, 6), "val_loss": round(s.loss, 6), "eval_seconds": round(seconds, 3),
            "load_seconds": round(load_seconds, 3),
            "val_bpb_plain": round(plain.bpb, 6), "quant_gap": round(plain.bpb - prequant, 6),
            "window_gain": round(plain.bpb - s.bpb, 6)}


if __name__ == "__main__":
    stage.run_ranks(main, "eval", lambda: load_params().eval.nproc_per_node, check)
