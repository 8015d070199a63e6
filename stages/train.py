"""train: tokenized shards -> artifacts/train/model/{raw,ema[,swa]}.safetensors (run under stages.launch)."""

import json
from dataclasses import asdict

import torch.distributed as dist

from pgolf import stage
from pgolf.checkpoint import save_tensors
from pgolf.config import load_params
from pgolf.data import byte_table, load_tokenizer, load_val_tokens
from pgolf.errors import PgolfError
from pgolf.evaluate import score
from pgolf.io import atomic_dir, read_json
from pgolf.train import Trainer, init_runtime

DATA = stage.TOKENIZED
OUT = stage.ARTIFACTS / "train"


def main() -> dict | None:
    params = load_params()
    mcfg, cfg = params.model, params.train
    manifest = read_json(DATA / "manifest.json")
    vocab = manifest["tokenizer"]["vocab_size"]
    if vocab != mcfg.vocab_size:
        raise PgolfError(f"{DATA / 'tokenizer.model'}: vocab {vocab} but model.vocab_size is {mcfg.vocab_size}")
    rt = init_runtime()
    val_fn = None
    if cfg.val_every:
        val = load_val_tokens(DATA, mcfg.vocab_size)[: cfg.val_tokens + 1]
        table = byte_table(load_tokenizer(DATA / "tokenizer.model"))
        val_fn = lambda model: score(model, val, table, cfg.seq_len, device=rt.device).bpb  # noqa: E731
    (OUT / "checkpoint").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(mcfg, cfg, DATA, rt, checkpoint=OUT / "checkpoint", val_fn=val_fn,
                      log=lambda s: print(s, flush=True) if rt.master else None)
    resumed = trainer.try_resume()
    if rt.master:
        from dvclive import Live

        trainer.live = Live(dir=str(OUT / "live"), resume=resumed, save_dvc_exp=False, dvcyaml=None)
    result = trainer.run()
    if rt.world > 1:
        dist.barrier()
    if not rt.master:
        return None
    meta = {"config": asdict(mcfg), "steps": result.metrics["steps"]}
    with atomic_dir(OUT / "model") as tmp:
        save_tensors(tmp / "raw.safetensors", result.raw, meta)
        save_tensors(tmp / "ema.safetensors", result.ema, meta)
        if result.swa is not None:
            save_tensors(tmp / "swa.safetensors", result.swa, meta)
        (tmp / "config.json").write_text(json.dumps({"model": asdict(mcfg), "train": asdict(cfg)}, indent=2) + "\n")
    trainer.live.end()
    return result.metrics


if __name__ == "__main__":
    stage.run(main, "train")
