"""Where every stage's artifacts live, relative to the repository root (the directory DVC runs in)."""

from pathlib import Path

ARTIFACTS = Path("artifacts")
CHECKED = ARTIFACTS / "check" / "ok.json"  # written when params.yaml is valid; every stage depends on it
TOKENIZED = ARTIFACTS / "tokenize" / "data"  # shards, tokenizer.model, manifest.json
TRAINED = ARTIFACTS / "train" / "model"  # raw, ema [, swa] weights and the run's config
TRAIN_PLOTS = ARTIFACTS / "train" / "plots"  # loss.tsv, val.tsv
TRAIN_RUN = ARTIFACTS / "train" / "run.json"  # hardware and run facts the audit reads
TRAIN_LOG = ARTIFACTS / "train" / "train.log"
CHECKPOINT = ARTIFACTS / "train" / "checkpoint"  # resumable state of an unfinished run; not a stage out
PICKED = ARTIFACTS / "ema" / "model.safetensors"  # the weights quantization starts from
HESSIANS = ARTIFACTS / "calibrate" / "hessians.safetensors"
QUANTIZED = ARTIFACTS / "quantize" / "quantized.safetensors"
PACK_CACHE = ARTIFACTS / "cache" / "chunks"  # compressed chunks quantize and compress share; not a stage out
BLOB = ARTIFACTS / "compress" / "model.blob"  # the model bytes that count
BLOB_INFO = ARTIFACTS / "compress" / "model.json"  # its sha256, streams and codec plan
EVAL_EVIDENCE = ARTIFACTS / "eval" / "evidence.json"  # coverage, hardware, inputs, test-time training record
EVAL_LOG = ARTIFACTS / "eval" / "eval.log"
AUDIT = ARTIFACTS / "audit" / "audit.json"
POINT = ARTIFACTS / "audit" / "point.json"  # one (total bytes, bpb) point for the plots
EXPORT = ARTIFACTS / "export"  # the submission folder


def metrics(stage: str) -> Path:
    return ARTIFACTS / stage / "metrics.json"
