#!/usr/bin/env bash
# One device call: document-masked attention backends (bench/doc_attention.py), then the record's own script beside
# pgolf's record preset (bench/record_parity.py, the record side stopped after RECORD_S seconds; PARITY=0 skips it;
# CONCURRENT=1 runs both sides at once: losses and val bpb, no speed rows; PGOLF_SET="train.pack=span ...": pgolf's
# side with these preset changes; PGOLF_INIT=record: pgolf's side starts from the record's initial weights), then,
# with SPREAD="43 44 45", pgolf's side alone from each of those seeds at once (val bpb: a seed's spread), then, with
# QUANT=1, pgolf's checkpoint quantized with and without compress.reorder (bench/quantize_checkpoint.py; the files
# come back xz'd in pieces for bench/codec_table.py), then, with EVAL=1, pgolf's eval modes on the checkpoint its side
# trained (trained here first when the machine has none) (bench/eval_modes.py, no row started after EVAL_S seconds of
# its own; EVAL_ARGS: its further flags; EVAL_ONLY: its rows, ';'-separated), then each A/B of AB (';'-separated
# bench/train_throughput.py flags, "" the baseline) on the record preset and the mirror's shards, then, with SCALE=1
# on a 2-GPU machine, the record preset on 2 ranks and on 1 at the same global batch (scaling efficiency). Expects the
# record's folder in .carry/record/ (fetched from openai/parameter-golf, never committed) and a CaseOps mirror of the
# docs corpus in .carry/caseops_mirror/ (`pgolf mirror --caseops`). Writes under $OUT.
#   ATTENTION=0 CONCURRENT=1 PGOLF_ATTENTION=flex RECORD_S=570 bash bench/parity_session.sh
#   ATTENTION=0 SPEED_ONLY=1 PGOLF_ATTENTION=flex PGOLF_INIT=record RECORD_S=420 bash bench/parity_session.sh
#     (PGOLF_FIRST=1: pgolf's side first, the record's cold compiles last)
#     (SPEED_ONLY: the record script stopped at its last training step, its eval's compiles not waited for: no val
#     bpb on its side, and a fresh machine's parity call fits 600 s; BATCH=786432 STEPS=60 RECORD_S=370: a rank's
#     micro-batch on 8 GPUs, 98,304 tokens, instead of 24,576: 577 s on a fresh H200, the record's last step at 364 s)
#   PARITY=0 ATTENTION=0 EVAL=1 EVAL_S=400 EVAL_ARGS="--cuda-graphs --cheaper 96x2048 96x1024" bash bench/parity_session.sh
#   ATTENTION=0 PARITY=0 AB=";--pack span;--doc-attention varlen;--compile-mode cuda_graphs" bash bench/parity_session.sh
#   ATTENTION=0 PARITY=0 PGOLF_ATTENTION=flex SPREAD="43 44 45" bash bench/parity_session.sh
#   ATTENTION=0 PARITY=0 SCALE=1 bash bench/parity_session.sh       (kind nvidia-h200-x2)
#   ATTENTION=0 PARITY=0 CHECKS="bench/fused_ce_check.py" UPSTREAM=1 bash bench/parity_session.sh
#     (CHECKS: these scripts first; UPSTREAM=1: upstream's train_gpt.py, carried in .carry/upstream/, beside the
#     baseline config on a vocabulary-1024 mirror in .carry/sp1024_mirror/, bench/upstream_ratio.py)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" bench/results
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MIRROR=.carry/caseops_mirror
# pgolf's side alone (bench/record_parity.py --side pgolf), with the session's attention, init and preset changes
pgolf_side() {
  # shellcheck disable=SC2086
  python3 bench/record_parity.py --side pgolf --mirror $MIRROR --steps "${STEPS:-300}" --batch-tokens "${BATCH:-196608}" \
    --pgolf-attention "${PGOLF_ATTENTION:-varlen}" --pgolf-init "${PGOLF_INIT:-seed}" --record .carry/record/train_gpt.py \
    ${PGOLF_SET:+--set $PGOLF_SET} "$@"
}
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"
# the GPU's clocks, temperature, power and throttle reasons every 2 s: a call whose steps all run slow shows why
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active \
  --format=csv -l 2 > "$OUT/gpu_clocks.csv" 2>&1 &
SMI=$!  # not $! in the trap: by the exit it names the last job started (SPREAD's)
trap 'kill $SMI 2>/dev/null' EXIT
for check in ${CHECKS:-}; do echo "=== $check"; timeout 300 python3 "$check" 2>&1 | tail -12; done
[ "${ATTENTION:-1}" = 1 ] && python3 bench/doc_attention.py --mirror $MIRROR --out "$OUT/doc_attention.json" 2>&1 | tail -8
[ "${PARITY:-1}" = 1 ] && python3 bench/record_parity.py --record .carry/record/train_gpt.py --mirror $MIRROR \
  --steps "${STEPS:-300}" --batch-tokens "${BATCH:-196608}" --budget-s "${RECORD_S:-380}" --save bench/results/parity_ckpt.pt \
  --pgolf-attention "${PGOLF_ATTENTION:-varlen}" --pgolf-init "${PGOLF_INIT:-seed}" --out "$OUT/record_parity.json" \
  ${CONCURRENT:+--concurrent} ${SPEED_ONLY:+--speed-only} ${PGOLF_FIRST:+--pgolf-first} \
  ${PGOLF_SET:+--set $PGOLF_SET} 2>&1 | tail -40
if [ -n "${SPREAD:-}" ]; then
  # pgolf's side alone from each seed of SPREAD, all at once: the spread a different initial draw makes
  for seed in $SPREAD; do
    pgolf_side --seed "$seed" > "$OUT/spread_$seed.log" 2>&1 &
  done
  wait
  python3 - "$OUT" $SPREAD <<'PY'
import json, sys
for seed in sys.argv[2:]:
    out = open(f"{sys.argv[1]}/spread_{seed}.log").read()
    if "PGOLF_RESULT " not in out:
        print(f"seed {seed}: failed ({out.strip().splitlines()[-1] if out.strip() else 'no output'})")
        continue
    r = json.loads(out.split("PGOLF_RESULT ", 1)[1].splitlines()[0])
    print(f"seed {seed}: val bpb raw {r['val_bpb_raw']:.4f} on every target, {r['val_bpb_raw_record_targets']:.4f} on "
          f"the record's; train loss at the end {r['trace'][-1][2]:.4f}")
PY
fi
if [ "${QUANT:-0}" = 1 ] && [ -s bench/results/parity_ckpt.pt ]; then
  python3 bench/quantize_checkpoint.py --checkpoint bench/results/parity_ckpt.pt --mirror $MIRROR \
    --out-dir /tmp/quantized 2>&1 | grep -v "batch/s\]"
  tar -C /tmp/quantized -cf - . | xz -T0 -6 | split -b 15M - "$OUT/quantized.tar.xz."
fi
if [ "${EVAL:-0}" = 1 ] && [ ! -s bench/results/parity_ckpt.pt ]; then
  # a fresh machine (one goes back after 30 s idle, even between calls issued at once): pgolf's side alone trains it
  pgolf_side --save bench/results/parity_ckpt.pt 2>&1 | grep -v "^PGOLF_RESULT" | tail -3
fi
if [ "${EVAL:-0}" = 1 ] && [ -s bench/results/parity_ckpt.pt ]; then
  # logged to a file first: a call cut by its limit still returns the rows finished
  only=()  # EVAL_ONLY: ';'-separated row names (they hold spaces and commas)
  [ -n "${EVAL_ONLY:-}" ] && { IFS=';' read -ra rows <<< "$EVAL_ONLY"; only=(--only "${rows[@]}"); }
  # shellcheck disable=SC2086
  python3 bench/eval_modes.py --checkpoint bench/results/parity_ckpt.pt --mirror $MIRROR --budget-s "${EVAL_S:-150}" \
    --out "$OUT/eval_modes.json" --record-log .carry/record/train_seed42.log ${EVAL_ARGS:-} "${only[@]}" \
    > "$OUT/eval_modes.log" 2>&1
  grep -v "it/s\]\|batch/s\]\|win/s\]" "$OUT/eval_modes.log" | tail -20
fi
if [ -n "${AB:-}" ]; then
  DATA=$(dirname "$(ls $MIRROR/datasets/datasets/*/fineweb_train_000000.bin)")
  IFS=';' read -ra RUNS <<< "$AB"
  for flags in "${RUNS[@]}"; do
    tag=record_$(echo "${flags:-baseline}" | tr -cd 'a-z0-9_')
    # shellcheck disable=SC2086
    python3 bench/train_throughput.py --config presets/record.yaml --data "$DATA" --steps "${AB_STEPS:-40}" \
      --tag "$tag" $flags 2>&1 | tail -3
    cp "bench/results/train_throughput_$tag.json" "$OUT/" 2>/dev/null
  done
fi
if [ "${SCALE:-0}" = 1 ]; then
  DATA=$(dirname "$(ls $MIRROR/datasets/datasets/*/fineweb_train_000000.bin)")
  S="bench/train_throughput.py --config presets/record.yaml --data $DATA --steps ${AB_STEPS:-40}"
  # shellcheck disable=SC2086
  python3 -m torch.distributed.run --standalone --nproc_per_node 2 $S --tag record_scale_w2 2>&1 | tail -3
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=0 python3 $S --tag record_scale_w1 2>&1 | tail -3
  cp bench/results/train_throughput_record_scale_w*.json "$OUT/" 2>/dev/null
  python3 -c "import json; w1, w2 = (json.load(open(f'bench/results/train_throughput_record_scale_w{n}.json'))['tokens_per_s']
for n in (1, 2)); print(f'scaling efficiency on 2 GPUs: {w2 / (2 * w1):.1%} ({w2:,.0f} vs 2 x {w1:,.0f} tokens/s)')"
fi
if [ "${UPSTREAM:-0}" = 1 ]; then
  python3 bench/upstream_ratio.py --upstream .carry/upstream/train_gpt.py --mirror .carry/sp1024_mirror \
    --steps "${UPSTREAM_STEPS:-60}" --out "$OUT/upstream_ratio.json" 2>&1 | tail -8
fi
