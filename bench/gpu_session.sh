#!/usr/bin/env bash
# One device call: install carried wheels, run the challenge preset on the docs corpus through
# `dvc repro` (train capped at $TRAIN_S seconds), then a quantizer sweep with `dvc exp run`.
# Usage on the device: bash bench/gpu_session.sh   (expects .whl/ and .carry/docs.jsonl.zst)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TRAIN_S=${TRAIN_S:-120}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PATH=/tmp/bin:/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
START=$(date +%s)
mkdir -p /tmp/bin && rm -f /tmp/bin/python && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/bin/python && chmod +x /tmp/bin/python
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
[ -d .git ] || git init -q
mkdir -p .git/info && printf '/.whl/\n/.carry/\n' >> .git/info/exclude
git add -A >/dev/null && git -c user.email=d@d -c user.name=d commit -qm device >/dev/null
git config user.email d@d; git config user.name d
[ -d .dvc ] || dvc init -q
cp presets/challenge.yaml params.yaml
python3 - "$TRAIN_S" <<'PY'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["data"] = {"source": "jsonl", "paths": [".carry/docs.jsonl.zst"], "vocab_size": 1024, "val_docs": 150,
             "tokenizer_train_chars": 20_000_000, "shard_tokens": 20_000_000}
p["train"]["max_seconds"] = float(sys.argv[1])
p["train"]["checkpoint_every_s"] = 0
p["train"]["compile_warmup_steps"] = 12
p["compress"] = {"codec": "lzma", "layout": "int8"}  # one codec keeps each sweep point short
p["train"]["qat_threshold"] = float(__import__("os").environ.get("QAT", p["train"]["qat_threshold"]))
p["eval"]["stride"] = int(__import__("os").environ.get("STRIDE", p["eval"]["stride"]))
p["audit"]["strict"] = __import__("os").environ.get("STRICT", "true") == "true"  # false: over-size points still land as experiments
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
git add -A >/dev/null; git commit -qm "device params" >/dev/null
t0=$(date +%s)
dvc repro 2>&1 | grep -v "it/s]\|win/s]\|batch/s]" | tee "$OUT/repro.log" | grep -v "^step [0-9]*[1-9]00 " ; rc=${PIPESTATUS[0]}
echo "dvc repro rc=$rc in $(( $(date +%s) - t0 ))s"
for s in tokenize train ema calibrate quantize compress eval audit; do echo "== $s"; cat artifacts/$s/metrics.json 2>/dev/null | tr -d '\n '; echo; done | tee "$OUT/metrics.txt"
git add -A >/dev/null; git commit -qm baseline >/dev/null
# each point names all it changes: `dvc exp run` leaves its params in the workspace
B6="-S quant.bits.attn=6 -S quant.bits.mlp=6"
for exp in "quant.method=rtn $B6" "quant.method=clip_search $B6" "quant.method=sdclip $B6" "quant.method=gptq -S quant.bits.attn=5 -S quant.bits.mlp=5"; do
  t1=$(date +%s)
  [ $(( t1 - START )) -lt ${SWEEP_UNTIL_S:-470} ] || { echo "skipping [$exp]: out of time"; continue; }
  dvc exp run -S $exp 2>&1 | grep -E "Running stage|didn't change|skipping|ERROR|audit:" | tr '\n' ';'
  echo; echo "exp [$exp] took $(( $(date +%s) - t1 ))s" | tee -a "$OUT/sweep.log"
done
dvc exp show --json > "$OUT/exps.json" 2>/dev/null
dvc plots show --json > /dev/null 2>&1 && echo "dvc plots show ok"
cp artifacts/train/live/plots/metrics/train_loss.tsv "$OUT/" 2>/dev/null
