"""ema: pick the EMA, SWA or raw weights -> artifacts/ema/model.safetensors, with its pre-quantization bpb."""

import torch

from pgolf import stage
from pgolf.checkpoint import load_tensors, save_tensors
from pgolf.config import ModelConfig, build, load_params
from pgolf.data import byte_table, load_tokenizer, load_val_tokens
from pgolf.errors import PgolfError
from pgolf.evaluate import score
from pgolf.model import GPT

DATA = stage.TOKENIZED
TRAINED = stage.ARTIFACTS / "train" / "model"
OUT = stage.ARTIFACTS / "ema" / "model.safetensors"


def load_model(path, device: torch.device) -> tuple[GPT, dict]:
    """Build a GPT from a checkpoint that carries its own model config."""
    tensors, meta = load_tensors(path)
    if "config" not in meta:
        raise PgolfError(f"{path}: no model config in its metadata")
    model = GPT(build(ModelConfig, meta["config"], "model")).to(device)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise PgolfError(f"{path}: weights do not match the model config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model, meta


def main() -> dict:
    cfg = load_params().ema
    if cfg.source not in ("ema", "swa", "raw"):
        raise PgolfError(f"ema.source: {cfg.source!r}; expected ema, swa or raw")
    src = TRAINED / f"{cfg.source}.safetensors"
    if cfg.source == "swa" and not src.exists():
        raise PgolfError(f"{src}: no SWA weights; set train.swa: true or ema.source: ema")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(src, device)
    save_tensors(OUT, model.state_dict(), {"config": meta["config"], "source": cfg.source})
    val = load_val_tokens(DATA, model.cfg.vocab_size)
    table = byte_table(load_tokenizer(DATA / "tokenizer.model"))
    s = score(model, val, table, cfg.eval_seq_len, 0, cfg.eval_batch_seqs, device=device, progress=True)
    return {"source": cfg.source, "prequant_val_bpb": round(s.bpb, 6), "prequant_val_loss": round(s.loss, 6),
            "val_tokens": s.tokens}


if __name__ == "__main__":
    stage.run(main, "ema")
