"""calibrate: the picked model's input Hessians -> artifacts/calibrate/hessians.safetensors."""

import torch

from pgolf import calibrate, paths, stage, weights
from pgolf.checkpoint import save_tensors
from pgolf.config import load_params


def main() -> dict:
    cfg = load_params().calibrate
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = weights.load_model(paths.PICKED, device)
    c = calibrate.calibrate(model, cfg, paths.TOKENIZED, device)
    save_tensors(paths.HESSIANS, c.hessians, {"shared": c.shared, "tokens": c.tokens, "source": cfg.source})
    return {"seconds": round(c.seconds, 3), "tokens": c.tokens, "reads_training_data": c.reads_training_data}


if __name__ == "__main__":
    stage.run(main, "calibrate")
