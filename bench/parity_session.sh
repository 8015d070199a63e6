#!/usr/bin/env bash
# One device call: document-masked attention backends (bench/doc_attention.py), then the record's own script beside
# pgolf's record preset (bench/record_parity.py, the record side stopped after RECORD_S seconds), then, with EVAL=1,
# pgolf's eval modes on the checkpoint its side trained (bench/eval_modes.py, no row started after EVAL_S seconds of
# its own). Expects the record's folder in .carry/record/ (fetched from openai/parameter-golf, never committed) and
# a CaseOps mirror of the docs corpus in .carry/caseops_mirror/ (`pgolf mirror --caseops`). Writes under $OUT.
#   RECORD_S=380 EVAL=1 EVAL_S=150 bash bench/parity_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" bench/results
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MIRROR=.carry/caseops_mirror
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"
[ "${ATTENTION:-1}" = 1 ] && python3 bench/doc_attention.py --mirror $MIRROR --out "$OUT/doc_attention.json" 2>&1 | tail -8
python3 bench/record_parity.py --record .carry/record/train_gpt.py --mirror $MIRROR --steps "${STEPS:-300}" \
  --batch-tokens 196608 --budget-s "${RECORD_S:-380}" --save bench/results/parity_ckpt.pt \
  --out "$OUT/record_parity.json" 2>&1 | tail -40
if [ "${EVAL:-0}" = 1 ] && [ -s bench/results/parity_ckpt.pt ]; then
  python3 bench/eval_modes.py --checkpoint bench/results/parity_ckpt.pt --mirror $MIRROR --budget-s "${EVAL_S:-150}" \
    --out "$OUT/eval_modes.json" 2>&1 | grep -v "it/s\]\|batch/s\]" | tail -20
fi
