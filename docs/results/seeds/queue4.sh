#!/bin/bash
# Issue 25 item 3, fourth queue (eighteenth session): seeds 7 and 43 (and 42 again, on today's code) of the
# eleventh session's demo-schedule strategy comparison of personal steering (RESULTS.md "Which strategy's personal
# model steers best"): 1g1s / local / fedavg trained on configs/fortunes-id.toml's shipped schedule, then
# eval-personal at kappa 1 with the built-in 3 prompts and every method. One thread per worker; workers claim jobs
# by mkdir (start two to share them).
cd "${POCKETLM_ROOT:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}"
export OMP_NUM_THREADS=1
job() {  # seed strategy
  local out=runs/demo-s$1/$2 doc=docs/results/personal/demo-s$1
  mkdir -p "$doc" runs/claims4
  [ -f "$doc/eval_personal_$2_kappa1.json" ] && return 0
  mkdir "runs/claims4/$1-$2" 2>/dev/null || return 0  # another worker has it
  echo "$(date +%T) train s$1 $2"; t0=$(date +%s)
  nice -n 10 .venv/bin/pocketlm train -c configs/fortunes-id.toml --strategy "$2" --set max_eval_tokens=4096 \
    --set seed="$1" --set "out_dir=$out" --no-plots > "runs/demo-s$1-$2.log" 2>&1 \
    || { echo "FAILED train s$1 $2"; return 1; }
  cp "$out/history.json" "$doc/history_$2.json"
  echo "$(date +%T) eval s$1 $2 (trained in $(( $(date +%s) - t0 )) s)"; t0=$(date +%s)
  nice -n 10 .venv/bin/pocketlm eval-personal --run "$out" --kappa 1 --max-new-tokens 32 --threads 1 \
    --json "$doc/eval_personal_$2_kappa1.json" > "runs/demo-s$1-$2-eval.log" 2>&1 \
    || { echo "FAILED eval s$1 $2"; return 1; }
  echo "$(date +%T) done s$1 $2 $(( $(date +%s) - t0 )) s"
}
for s in 43 7 42; do for st in 1g1s local fedavg; do job $s $st; done; done
