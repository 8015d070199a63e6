"""eval: score artifacts/compress/model.blob on the whole validation split (run under stages.launch)."""

import hashlib
import time

import torch

from pgolf import pack, stage
from pgolf.config import ModelConfig, build, load_params
from pgolf.data import byte_table, load_tokenizer, load_val_tokens, shard_paths
from pgolf.errors import PgolfError
from pgolf.evaluate import score, score_ttt
from pgolf.io import read_json, write_json
from pgolf.model import GPT
from pgolf.train import init_runtime

DATA = stage.TOKENIZED
BLOB = stage.ARTIFACTS / "compress" / "model.blob"


def load_blob_model(device: torch.device) -> GPT:
    expected = read_json(stage.ARTIFACTS / "compress" / "metrics.json")["blob_sha256"]
    blob = BLOB.read_bytes() if BLOB.exists() else b""
    if not blob:
        raise PgolfError(f"{BLOB}: missing or empty (run the compress stage)")
    actual = hashlib.sha256(blob).hexdigest()
    if actual != expected:
        raise PgolfError(f"{BLOB}: sha256 {actual[:12]}... differs from {expected[:12]}... recorded by compress")
    state, meta = pack.unpack(blob, str(BLOB))
    model = GPT(build(ModelConfig, meta["config"], "model")).to(device)
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    return model


def main() -> dict | None:
    params = load_params()
    cfg = params.eval
    rt = init_runtime()
    t0 = time.perf_counter()
    model = load_blob_model(rt.device)
    val_files = shard_paths(DATA, "val")
    val = load_val_tokens(DATA, model.cfg.vocab_size)
    table = byte_table(load_tokenizer(DATA / "tokenizer.model"))
    record = {"ttt": "off"}
    if cfg.ttt.enabled:
        s, record = score_ttt(model, val, table, cfg.seq_len, cfg.stride, cfg.batch_seqs, cfg.ttt, cfg.temperature, rt.device)
    else:
        s = score(model, val, table, cfg.seq_len, cfg.stride, cfg.batch_seqs, cfg.temperature, rt.device,
                  progress=rt.master)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    # the quantization gap is taken like for like: plain windows, as the ema stage scored the float model
    if cfg.stride in (0, cfg.seq_len) and not cfg.ttt.enabled and cfg.seq_len == params.ema.eval_seq_len:
        plain = s
    else:  # TTT has changed the weights: score the blob's own
        plain = score(load_blob_model(rt.device) if cfg.ttt.enabled else model, val, table, params.ema.eval_seq_len,
                      0, cfg.batch_seqs, device=rt.device)
    if not rt.master:
        return None
    prequant = read_json(stage.ARTIFACTS / "ema" / "metrics.json")["prequant_val_bpb"]
    model_bytes = BLOB.stat().st_size
    write_json(stage.ARTIFACTS / "eval" / "point.json", [{"model_bytes": model_bytes, "val_bpb": round(s.bpb, 6)}])
    cuda = rt.device.type == "cuda"
    return {
        "val_bpb": round(s.bpb, 6), "val_loss": round(s.loss, 6), "tokens": s.tokens, "bytes": s.bytes,
        "eval_seconds": round(seconds, 3), "val_bpb_plain": round(plain.bpb, 6),
        "quant_gap": round(plain.bpb - prequant, 6), "window_gain": round(plain.bpb - s.bpb, 6),
        "gpu": torch.cuda.get_device_name(rt.device) if cuda else "cpu", "gpu_count": rt.world if cuda else 0,
        "inputs": [p.name for p in val_files], "val_tokens_trained_before_scored": 0, **record,
    }


if __name__ == "__main__":
    stage.run(main, "eval")
