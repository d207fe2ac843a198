#!/bin/bash
# Issue 25 item 3: a job queue for seeds 43/44; run one or more workers (each 1 torch thread); a job is claimed by
# mkdir of its marker, so workers never run the same job; finished jobs have their JSON.
cd "${POCKETLM_ROOT:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}"
export OMP_NUM_THREADS=1
jobs() {
  # The strategies the paper's claim needs first (1g1s, 2g, 2s), then the private/shared baselines.
  for c in fortunes-id fortunes-ood agnews-id agnews-ood official/fortunes-ood official/agnews-ood; do
    for seed in 43 44; do for s in 1g1s 2g 2s; do echo "$c $seed $s"; done; done; done
  for c in fortunes-id fortunes-ood agnews-id agnews-ood official/fortunes-ood official/agnews-ood; do
    for seed in 43 44; do for s in local fedavg; do echo "$c $seed $s"; done; done; done
}
jobs | while read c seed s; do
  tag=$(echo "$c" | tr / -)-s$seed
  out=docs/results/seeds/$tag-$s.json
  [ -f "$out" ] && continue
  mkdir runs/seeds/claim-$tag-$s 2>/dev/null || continue
  echo "$(date +%T) w$1 start $tag $s"
  t0=$(date +%s)
  nice -n 10 .venv/bin/pocketlm compare -c configs/$c.toml --strategies $s \
    --set seed=$seed --set eval_round0=false --set eval_every=4 \
    --set "out_dir=runs/seeds/$tag/{strategy}" --json "$out" > runs/seeds/$tag-$s.log 2>&1 \
    || echo "FAILED $tag $s"
  echo "$(date +%T) w$1 done $tag $s $(( $(date +%s) - t0 )) s"
done
