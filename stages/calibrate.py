"""calibrate: the EMA model's input Hessians -> artifacts/calibrate/hessians.safetensors."""

import time

import torch

from pgolf import stage
from pgolf.calibrate import collect_hessians, generate
from pgolf.checkpoint import save_tensors
from pgolf.config import load_params
from pgolf.data import TokenStream, shard_paths
from pgolf.errors import PgolfError
from stages.ema import OUT as EMA_MODEL, load_model

DATA = stage.TOKENIZED
OUT = stage.ARTIFACTS / "calibrate" / "hessians.safetensors"


def main() -> dict:
    cfg = load_params().calibrate
    if cfg.source not in ("train", "self"):
        raise PgolfError(f"calibrate.source: {cfg.source!r}; expected train or self (never validation data)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(EMA_MODEL, device)
    t0 = time.perf_counter()
    if cfg.source == "train":
        stream = TokenStream(shard_paths(DATA, "train"), model.cfg.vocab_size)

        def batches():
            for start in range(0, cfg.num_seqs, cfg.batch_seqs):
                b = min(cfg.batch_seqs, cfg.num_seqs - start)
                yield torch.from_numpy(stream.take(b * cfg.seq_len)).view(b, cfg.seq_len)
        source = batches()
    else:
        from pgolf.data import load_tokenizer

        bos = load_tokenizer(DATA / "tokenizer.model").bos_id()
        source = generate(model, cfg.num_seqs, cfg.seq_len, cfg.temperature, bos, device, cfg.batch_seqs, cfg.seed)
    hessians, shared, tokens = collect_hessians(model, source, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    save_tensors(OUT, hessians, {"shared": shared, "tokens": tokens, "source": cfg.source})
    return {"seconds": round(seconds, 3), "tokens": tokens, "source": cfg.source, "hessians": len(hessians),
            "weights": len(shared)}


if __name__ == "__main__":
    stage.run(main, "calibrate")
