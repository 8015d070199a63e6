# Sourced by the device sessions: carried wheels, the docs corpus tokenized by the real tokenize stage.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" bench/results
[ -d /tmp/site/dvc ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
python3 - <<'PY'
import yaml
p = yaml.safe_load(open("params.yaml"))
p["data"] = {"source": "jsonl", "paths": [".carry/docs.jsonl.zst"], "vocab_size": 1024, "val_docs": 150,
             "tokenizer_train_chars": 20_000_000, "shard_tokens": 20_000_000}
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
[ -s "$OUT/tokenize.log" ] && return  # sourced twice in one call: done already
python3 -m stages.tokenize > "$OUT/tokenize.log" 2>&1 || { cat "$OUT/tokenize.log"; exit 1; }
