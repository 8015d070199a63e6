"""The whole run in one process group, as a challenge submission runs it: `torchrun --nproc_per_node=8 train_gpt.py`.

Train under the wallclock cap, pick the EMA/SWA/raw weights, calibrate, quantize to the byte budget, compress,
then score the blob on the validation split; or, with `eval <blob>`, only score an existing blob. The exported
train_gpt.py (export.py) holds this module, the library it uses and the run's params.

Data comes in the challenge's layout: DATA_PATH holds fineweb_{train,val}_NNNNNN.bin (default
./data/datasets/fineweb10B_<variant>), TOKENIZER_PATH the SentencePiece model (default
./data/tokenizers/fineweb_<vocab>_bpe.model, or tokenizer.model inside DATA_PATH where that exists).
"""

import hashlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import calibrate, evaluate, pack, quant, reorder, runtime, weights
from .config import Params, build, check_combinations, check_fields, model_budget
from .data import load_val, shard_paths
from .errors import PgolfError
from .train import Trainer


def params_from(raw: dict) -> Params:
    """The baked-in params, checked like params.yaml (data.* aside: the data comes in the challenge's layout)."""
    params = build(Params, raw)
    check_fields(params, skip=("data",))
    check_combinations(params)
    return params


def data_paths(params: Params) -> tuple[Path, Path]:
    variant = params.data.fineweb_variant
    data = Path(os.environ.get("DATA_PATH", f"./data/datasets/fineweb10B_{variant}"))
    if not shard_paths(data, "val", required=False):
        where = "DATA_PATH" if "DATA_PATH" in os.environ else "the default path; DATA_PATH sets another"
        raise PgolfError(f"{data}: no val_*.bin shards found ({where}; the exported README gives this run's)")
    local = data / "tokenizer.model"
    default = local if local.is_file() else Path(f"./data/tokenizers/fineweb_{params.model.vocab_size}_bpe.model")
    return data, Path(os.environ.get("TOKENIZER_PATH", default))


def log(rt: runtime.Runtime, line: str) -> None:
    if rt.master:
        print(line, flush=True)


def train_and_pack(params: Params, data: Path, rt: runtime.Runtime, blob_path: Path, budget: int | None) -> None:
    trainer = Trainer(params.model, params.train, data, rt, log=lambda s: log(rt, s))
    result = trainer.run()
    log(rt, f"train: {result.metrics['steps']} steps, {result.metrics['train_seconds']:.1f}s, "
            f"{result.metrics['ms_per_step']:.1f} ms/step")
    if rt.master:
        state = {"ema": result.ema, "swa": result.swa, "raw": result.raw}[params.ema.source]
        if state is None:
            raise PgolfError("ema.source: swa, but training kept no SWA weights (set train.swa: true)")
        meta = weights.model_meta(params.model, result.passes)
        model = weights.build_model(meta, state, rt.device, "trained weights")
        c = calibrate.calibrate(model, params.calibrate, data, rt.device)
        counted = result.metrics["train_seconds"] + (c.seconds if c.reads_training_data else 0.0)
        log(rt, f"calibrate: {c.tokens:,} tokens in {c.seconds:.2f}s; training time counted {counted:.1f}s")
        sizer = pack.Sizer(meta, params.compress)
        state, hessians = reorder.REORDERS[params.compress.reorder](state, c.hessians, c.shared, params.model)
        q, qm = quant.quantize(state, hessians, c.shared, params.quant, budget, sizer)
        if sizer.plan is None:
            sizer.plan = pack.plan_for(q, params.compress)
        blob, _ = pack.pack(q, meta, sizer.plan, streams=params.compress.streams)
        blob_path.write_bytes(blob)
        log(rt, f"quantize: {params.quant.method}, {len(blob):,} model bytes (offset {qm['clip_offset']}, "
                f"{qm['pruned_codes']} codes pruned)")
    if rt.world > 1:
        dist.barrier()


def score_blob(params: Params, data: Path, tokenizer: Path, rt: runtime.Runtime, blob_path: Path) -> dict:
    t0 = time.perf_counter()
    model = pack.load_model(blob_path, rt.device)
    val = load_val(data, model.cfg.vocab_size, tokenizer)
    s, record = evaluate.evaluate(model, val, params.eval, rt.device)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"val_bpb": round(s.bpb, 8), "val_loss": round(s.loss, 8), "eval_seconds": round(seconds, 3),
           "blob_sha256": hashlib.sha256(blob_path.read_bytes()).hexdigest(), **record}
    log(rt, f"final val_bpb {s.bpb:.8f} val_loss {s.loss:.8f} eval {seconds:.1f}s "
            f"({len(shard_paths(data, 'val'))} val shards, {s.tokens:,} targets, {s.bytes:,} bytes)")
    return out


def main(raw_params: dict, script_bytes: int, argv: list[str] | None = None) -> dict | None:
    """`[]`: train, quantize, compress, score. `["eval", BLOB]`: score an existing blob."""
    argv = sys.argv[1:] if argv is None else argv
    params = params_from(raw_params)
    data, tokenizer = data_paths(params)
    rt = runtime.init()
    try:
        if argv[:1] == ["eval"] and len(argv) == 2:
            return score_blob(params, data, tokenizer, rt, Path(argv[1]))
        if argv:
            raise PgolfError(f"usage: train_gpt.py [eval BLOB]; got {' '.join(argv)}")
        blob = Path(os.environ.get("BLOB_PATH", "final_model.blob"))
        train_and_pack(params, data, rt, blob, model_budget(params, script_bytes))
        return score_blob(params, data, tokenizer, rt, blob)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
