#!/usr/bin/env bash
# One call on a 2-GPU machine (issue 7): the honesty check and the 2-GPU scaling of the baseline config.
#   GPU 0: the plain path (pre-optimization pgolf from .carry/snap/v0, compile off), 300 steps;
#   GPU 1, meanwhile: the optimized trainer (micro-batch = the whole 524,288-token step), 300 steps, seeds
#   1337 and 1338 (the noise);
#   then 20 steps on 2 GPUs (torchrun) and on 1 GPU, same global batch.
set -uo pipefail
source bench/device_setup.sh
R="bench/results"; B="bench/train_throughput.py --config baseline --steps 300 --log-every 10"
CUDA_VISIBLE_DEVICES=0 PYTHONPATH=.carry/snap/v0:/tmp/site python3 $B --no-compile --micro-batch-tokens 131072 \
  --tag honesty_plain > "$OUT/plain.log" 2>&1 &
(CUDA_VISIBLE_DEVICES=1 python3 $B --tag honesty_opt_1337 &&
 CUDA_VISIBLE_DEVICES=1 python3 $B --seed 1338 --tag honesty_opt_1338) > "$OUT/opt.log" 2>&1
wait
tail -n 3 "$OUT/plain.log" "$OUT/opt.log"
python3 bench/loss_curves.py $R/train_throughput_honesty_plain.json $R/train_throughput_honesty_opt_1337.json \
  $R/train_throughput_honesty_opt_1338.json
S="bench/train_throughput.py --config baseline --steps 32 --log-every 16"  # 524,288 tokens per step either way
python3 -m torch.distributed.run --standalone --nproc_per_node 2 $S --micro-batch-tokens 262144 --tag scale_w2 2>&1 | grep -v "^step " | tail -4
CUDA_VISIBLE_DEVICES=0 python3 $S --tag scale_w1 2>&1 | grep -v "^step " | tail -4
tar czf "$OUT/results.tgz" $R/train_throughput_honesty_*.json $R/train_throughput_scale_*.json $R/loss_curves.json
