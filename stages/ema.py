"""ema: pick the EMA, SWA or raw weights -> artifacts/ema/model.safetensors, with its pre-quantization bpb."""

import torch

from pgolf import paths, score, stage, weights
from pgolf.config import load_params
from pgolf.data import load_val


def main() -> dict:
    cfg = load_params().ema
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = weights.load_model(weights.picked_path(cfg.source, paths.TRAINED), device)
    weights.save_model(paths.PICKED, model.state_dict(), meta | {"source": cfg.source})
    val = load_val(paths.TOKENIZED, model.cfg.vocab_size)
    s = score.score(model, val, cfg.eval_seq_len, 0, cfg.eval_batch_seqs, device=device, progress=True,
                       what="ema")
    return {"prequant_val_bpb": round(s.bpb, 6), "prequant_val_loss": round(s.loss, 6)}


if __name__ == "__main__":
    stage.run(main, "ema")
