#!/usr/bin/env bash
# One device call for issue 7: install the carried wheels, tokenize the carried docs corpus (BPE 1024), then
# run bench/train_throughput.py once per argument string and print every result as one table.
# Usage on the device: bash bench/throughput_session.sh "--config baseline --micro-batch-tokens 131072" ...
# An argument may start with VAR=value words: environment for that run only (PYTHONPATH=.carry/snap/v1:/tmp/site
# runs an older pgolf). Each run is cut off where SESSION_BUDGET_S seconds run out, so the results always come back.
# CHECKS="bench/attention_check.py bench/fused_qk_check.py" runs those scripts first (their tails are printed).
set -uo pipefail
start=$(date +%s)
source bench/device_setup.sh
i=0
for check in ${CHECKS:-}; do echo "=== $check"; python3 "$check" 2>&1 | tail -30; done
for run in "$@"; do
  i=$((i + 1)); t0=$(date +%s)
  left=$(( ${SESSION_BUDGET_S:-480} - (t0 - start) ))
  [ "$left" -gt 30 ] || { echo "=== run $i skipped: out of time: $run"; continue; }
  echo "=== run $i (at most ${left}s): $run"
  read -ra words <<< "$run"; envs=()
  while [[ ${#words[@]} -gt 0 && ${words[0]} == *=* && ${words[0]} != -* ]]; do envs+=("${words[0]}"); words=("${words[@]:1}"); done
  timeout "$left" env "${envs[@]}" python3 bench/train_throughput.py "${words[@]}" 2>&1 | tee "$OUT/run$i.log" | grep -v "^step \|%  " | tail -40
  echo "=== run $i took $(( $(date +%s) - t0 ))s"
done
tar czf "$OUT/results.tgz" bench/results/*.json -C "$OUT" $(cd "$OUT" && ls run*.log tokenize.log) && rm -f "$OUT"/run*.log
ls -d /tmp/ind_* >/dev/null 2>&1 && tar czf "$OUT/inductor.tgz" $(find /tmp/ind_* -name "*.py")  # TORCHINDUCTOR_CACHE_DIR=/tmp/ind_<tag>
python3 - <<'PY'
import glob, json
print("| tag | compile | micro | ms/step | tokens/s | MFU | peak GiB | compile s | graphs | breaks | final loss |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob("bench/results/train_throughput_*.json")):
    r = json.load(open(f))
    if "graph_breaks" not in r:
        continue
    print(f"| {f.split('train_throughput_')[1][:-5]} | {r['compile']} | {r['micro_batch_tokens']} | {r['ms_per_step']} | "
          f"{r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['peak_memory_gib']} | {r['compile_seconds']} | "
          f"{r['unique_graphs']} | {r['graph_breaks']} | {r['final_loss']:.4f} |")
PY
