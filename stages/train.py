"""train: tokenized shards -> artifacts/train/model/{raw,ema[,swa]}.safetensors and the loss curves.

Runs on train.nproc_per_node processes. An interrupted run resumes from artifacts/train/checkpoint/, which
is not a stage output: a finished run removes it, and experiments elsewhere restore the model from the cache.
"""

import shutil

import torch.distributed as dist

from pgolf import paths, runtime, score, stage, weights
from pgolf.checkpoint import lock
from pgolf.config import load_params
from pgolf.data import load_val
from pgolf.errors import PgolfError
from pgolf.io import atomic_dir, read_json, write_bytes, write_json
from pgolf.train import Trainer

RUN_FACTS = ("gpu", "gpu_count", "world_size", "params", "recur_passes", "swa_count", "resumed_from_step")  # not metrics


def check() -> None:
    """Before any rank starts: the model matches the tokenizer, and no other trainer uses the checkpoint."""
    m = load_params().model
    tok, where = read_json(paths.TOKENIZED / "manifest.json")["tokenizer"], paths.TOKENIZED / "tokenizer.model"
    if tok["vocab_size"] != m.vocab_size:
        raise PgolfError(f"{where}: vocab {tok['vocab_size']} but model.vocab_size is {m.vocab_size}")
    if tok.get("bos_id", m.bos_id) != m.bos_id:
        raise PgolfError(f"{where}: BOS id {tok['bos_id']} but model.bos_id is {m.bos_id}")
    lock(paths.CHECKPOINT, "a trainer,")


def write_curve(path, column: str, points: list[tuple[int, float]]) -> None:
    path.write_text(f"step\t{column}\n" + "".join(f"{s}\t{v:.6f}\n" for s, v in points))


def main() -> dict | None:
    params = load_params()
    mcfg, cfg = params.model, params.train
    rt = runtime.init()
    val_fn = None
    if cfg.val_every:
        val = load_val(paths.TOKENIZED, mcfg.vocab_size).head(cfg.val_tokens + 1)
        val_fn = lambda model: score.score(model, val, cfg.seq_len, device=rt.device, what="train val").bpb  # noqa: E731
    lines: list[str] = []

    def log(line: str) -> None:
        if rt.master:
            print(line, flush=True)
            lines.append(line)

    trainer = Trainer(mcfg, cfg, paths.TOKENIZED, rt, checkpoint=paths.CHECKPOINT, log=log, val_fn=val_fn)
    trainer.try_resume()
    result = trainer.run()
    if rt.world > 1:
        dist.barrier()
    if not rt.master:
        return None
    meta = weights.model_meta(mcfg, result.passes) | {"steps": result.metrics["steps"]}
    with atomic_dir(paths.TRAINED, "train/model") as tmp:
        weights.save_model(tmp / "raw.safetensors", result.raw, meta)
        weights.save_model(tmp / "ema.safetensors", result.ema, meta)
        if result.swa is not None:
            weights.save_model(tmp / "swa.safetensors", result.swa, meta)
    with atomic_dir(paths.TRAIN_PLOTS, "train/plots") as tmp:
        write_curve(tmp / "loss.tsv", "train_loss", result.losses)
        write_curve(tmp / "val.tsv", "val_bpb", result.vals)
    write_json(paths.TRAIN_RUN, {k: result.metrics.pop(k) for k in RUN_FACTS})
    write_bytes(paths.TRAIN_LOG, "".join(f"{line}\n" for line in lines).encode())
    shutil.rmtree(paths.CHECKPOINT, ignore_errors=True)  # the run is complete: nothing to resume
    return result.metrics


if __name__ == "__main__":
    stage.run_ranks(main, "train", lambda: load_params().train.nproc_per_node, check)
