#!/usr/bin/env bash
# One device call: a preset on the carried docs corpus through `dvc repro` (train capped at TRAIN_S seconds; the
# challenge preset reads it as a FineWeb mirror made by `pgolf mirror`, the record preset as jsonl), then
# quantizer points on the same checkpoint with `dvc exp run`, each at the baseline's byte target and timed, then
# (TABLE) bench/quant_table.py's points in one process; (CODECS) bench/codec_table.py on the baseline's codes first.
# Prints the stage times, the audit line and the tables (pgolf compare, quant_table); writes $OUT/session.json,
# $OUT/quant_table.json and $OUT/codec_table.json.
#   PRESET=challenge TRAIN_S=120 SWEEP="gptq_cs:quant.method=gptq,quant.clip_rule=clip_search ..." \
#     TABLE="--eval=plain gptq_cs:method=gptq,clip_rule=clip_search ..." CODECS="zpaq zpaq_o1" bash bench/gpu_session.sh
# Expects .whl/ (dvc and what the image lacks, bench/device_wheels.sh; none: the environment has them) and
# .carry/docs.jsonl.zst, or for the record preset .carry/caseops_mirror/ (read as FineWeb's CaseOps export). Starts no
# sweep point or table after BUDGET_S seconds.
set -uo pipefail
START=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PRESET=${PRESET:-challenge}; TRAIN_S=${TRAIN_S:-120}; BUDGET_S=${BUDGET_S:-540}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/bin:/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
# `python` as the stages run it, logging each process's start and end to $OUT/proc.log (where the time of a
# `dvc exp run` goes: the stages' work, their start-up, DVC between them)
mkdir -p /tmp/bin && printf '#!/bin/sh\necho "$(date +%%s.%%N) start $*" >> %s/proc.log\n%s "$@"; rc=$?\necho "$(date +%%s.%%N) end $*" >> %s/proc.log\nexit $rc\n' \
  "$OUT" "$(command -v python3)" "$OUT" > /tmp/bin/python && chmod +x /tmp/bin/python
printf '#!/bin/sh\nexec python3 -m pgolf.cli "$@"\n' > /tmp/bin/pgolf && chmod +x /tmp/bin/pgolf
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
git init -q 2>/dev/null; git config user.email d@d; git config user.name d
printf '/.whl/\n/.carry/\n' >> .git/info/exclude
cp "presets/$PRESET.yaml" params.yaml
if [ "$PRESET" = challenge ]; then  # FineWeb's own path (data.source: fineweb) over a mirror of the docs corpus
  rm -rf /tmp/mirror; pgolf mirror .carry/docs.jsonl.zst --out /tmp/mirror --vocab 1024 --val-docs 150 \
    --shard-tokens 20000000 | tee "$OUT/mirror.txt" || exit 1
fi
python3 - "$PRESET" "$TRAIN_S" <<'PY'
import json, os, sys, yaml
preset, train_s = sys.argv[1], float(sys.argv[2])
p = yaml.safe_load(open("params.yaml"))
if preset == "challenge":
    stats = json.load(open("/tmp/mirror/datasets/manifest.json"))["datasets"][0]["stats"]
    p["data"] |= {"source": "fineweb", "fineweb_variant": "sp1024", "fineweb_mirror": "/tmp/mirror",
                  "train_shards": stats["files_train"]}
elif os.path.isdir(".carry/caseops_mirror"):  # the record's own CaseOps shards and tokenizer (`pgolf mirror --caseops`)
    stats = json.load(open(".carry/caseops_mirror/datasets/manifest.json"))["datasets"][0]["stats"]
    p["data"] |= {"source": "fineweb", "fineweb_variant": "sp8192_lossless_caps_caseops_v1_reserved",
                  "fineweb_mirror": ".carry/caseops_mirror", "caseops": True, "train_shards": stats["files_train"]}
else:  # the record preset's CaseOps from raw text, a tokenizer trained here
    p["data"] |= {"source": "jsonl", "paths": [".carry/docs.jsonl.zst"], "val_docs": 150, "shard_tokens": 20_000_000,
                  "tokenizer_train_chars": 20_000_000}
p["train"] |= {"max_seconds": train_s, "checkpoint_every_s": 0, "compile_warmup_steps": 12}
p["audit"] |= {"train_budget_s": train_s}  # the strict audit holds training + calibration to the cap itself
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
PY
git add -A >/dev/null && git commit -qm "$PRESET on the docs corpus" >/dev/null
t0=$(date +%s)
dvc repro 2>&1 | grep -v "it/s]\|win/s]\|batch/s]" | tee "$OUT/repro.log" | grep -v "^step [0-9]*[1-9][0-9]/\|^WARNING"
echo "dvc repro took $(( $(date +%s) - t0 ))s"
for s in tokenize train ema calibrate quantize compress eval audit; do
  printf '%-9s ' "$s"; python3 -c "import json,sys; m=json.load(open('artifacts/$s/metrics.json')); m.pop('k', None); print(json.dumps(m))" 2>/dev/null || echo "-"
done | tee "$OUT/stages.txt"
cat artifacts/train/run.json artifacts/compress/model.json 2>/dev/null | python3 -c "import sys; print(sys.stdin.read()[:3000])"
git add -A >/dev/null; git commit -qm baseline >/dev/null
[ -z "${CODECS:-}" ] || python3 bench/codec_table.py --out="$OUT/codec_table.json" $CODECS
TARGET=$(python3 -c "import json; print(json.load(open('artifacts/quantize/metrics.json'))['target_bytes'])")
echo "sweep at quant.target_bytes=$TARGET"
: > "$OUT/sweep.txt"
for point in ${SWEEP:-}; do
  name=${point%%:*}; sets=${point#*:}
  [ $(( $(date +%s) - START )) -lt "$BUDGET_S" ] || { echo "skipped $name: out of time" | tee -a "$OUT/sweep.txt"; continue; }
  args=(-S "quant.target_bytes=$TARGET"); IFS=, read -ra kv <<< "$sets"; for x in "${kv[@]}"; do args+=(-S "$x"); done
  t1=$(date +%s.%N); echo "$t1 exp $name" >> "$OUT/proc.log"
  dvc exp run -n "$name" "${args[@]}" > "$OUT/exp_$name.log" 2>&1; rc=$?
  echo "$(date +%s.%N) exp done" >> "$OUT/proc.log"
  wall=$(python3 -c "import time; print(round(time.time() - $t1, 1))")
  echo "$name rc=$rc wall=${wall}s $(grep -o "Running stage '[a-z]*'" "$OUT/exp_$name.log" | tr '\n' ' ')" | tee -a "$OUT/sweep.txt"
  tail -2 "$OUT/exp_$name.log" | head -1
done
pgolf compare | tee "$OUT/compare.md"
if [ -n "${TABLE:-}" ]; then
  if [ $(( $(date +%s) - START )) -lt "$BUDGET_S" ]; then
    python3 bench/quant_table.py --target="$TARGET" --out="$OUT/quant_table.json" $TABLE 2>&1 | grep -v "it/s]\|win/s]"
  else
    echo "skipped the quantizer table: out of time"
  fi
fi
dvc exp show --json > "$OUT/exps.json" 2>/dev/null
python3 - "$OUT" "$PRESET" "$TRAIN_S" <<'PY'
import json, sys
out, preset, train_s = sys.argv[1:]
stages = {}
for s in ("tokenize", "train", "ema", "calibrate", "quantize", "compress", "eval", "audit"):
    try:
        stages[s] = {k: v for k, v in json.load(open(f"artifacts/{s}/metrics.json")).items() if k != "k"}
    except FileNotFoundError:
        pass
json.dump({"preset": preset, "train_s": float(train_s), "stages": stages,
           "sweep": open(f"{out}/sweep.txt").read().splitlines()}, open(f"{out}/session.json", "w"), indent=1)
PY
python3 - "$OUT/proc.log" <<'PY'
import sys
lines = [l.split(" ", 1) for l in open(sys.argv[1]).read().splitlines()]
t0 = float(lines[0][0])
for t, what in lines:
    print(f"{float(t) - t0:8.2f} {what[:60]}")
PY
echo "session took $(( $(date +%s) - START ))s"
