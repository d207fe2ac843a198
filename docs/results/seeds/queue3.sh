#!/bin/bash
# Issue 25 item 3, third queue (seventeenth session): a third seed (43) of the 4x personal-steering schedule
# (RESULTS.md "A 4x longer schedule" had seeds 42 and 7 for 1g1s / local, seed 42 only for fedavg), fedavg on
# seed 7, then the kappa sweep of each trained model. One thread per worker; workers claim jobs by mkdir (start
# several to share them). Run queue2.sh first for the router_steps=8 AG News id seed 44.
cd "${POCKETLM_ROOT:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}"
export OMP_NUM_THREADS=1
train() {  # seed strategy
  local out=runs/long-s$1/$2 doc=docs/results/personal/long-s$1
  mkdir -p "$doc"
  [ -f "$doc/history_$2.json" ] && return 0
  mkdir -p runs/claims3 && mkdir "runs/claims3/train-$1-$2" 2>/dev/null || return 1  # another worker has it
  echo "$(date +%T) train s$1 $2"; t0=$(date +%s)
  nice -n 10 .venv/bin/pocketlm train -c configs/fortunes-id.toml --strategy "$2" --set rounds=8 --set local_steps=8 \
    --set eval_every=4 --set max_eval_tokens=4096 --set seed="$1" --set "out_dir=$out" --no-plots \
    > "runs/long-s$1-$2.log" 2>&1 || { echo "FAILED train s$1 $2"; return 1; }
  cp "$out/history.json" "$doc/history_$2.json"
  echo "$(date +%T) done train s$1 $2 $(( $(date +%s) - t0 )) s"
}
sweep() {  # seed strategy
  local doc=docs/results/personal/long-s$1
  [ -f "$doc/eval_personal_$2_sweep.json" ] && return 0
  mkdir -p runs/claims3 && mkdir "runs/claims3/sweep-$1-$2" 2>/dev/null || return 0
  echo "$(date +%T) sweep s$1 $2"; t0=$(date +%s)
  nice -n 10 .venv/bin/pocketlm eval-personal --run "runs/long-s$1/$2" --prompts configs/prompts-neutral.txt \
    --methods cloud,cloud_prompted,weights,both,specialist --kappa 0.5,1,2,3 --max-new-tokens 32 --threads 1 \
    --json "$doc/eval_personal_$2_sweep.json" --plot "$doc/sweep_$2.png" > "runs/long-s$1-$2-sweep.log" 2>&1 \
    || { echo "FAILED sweep s$1 $2"; return 1; }
  echo "$(date +%T) done sweep s$1 $2 $(( $(date +%s) - t0 )) s"
}
mkdir -p runs
for s in 1g1s local fedavg; do train 43 $s && sweep 43 $s; done
train 7 fedavg && sweep 7 fedavg
