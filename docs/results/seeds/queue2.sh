#!/bin/bash
# Issue 25 item 3, second queue (fifteenth session): seeds 43/44 for the last strategy columns, Centralized of the
# four clean tables (and their pretrained column: the seed re-draws the test split) and the router_steps=8 AG News table (1g1s, 2g). Same claim-by-mkdir workers as queue.sh.
cd "${POCKETLM_ROOT:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}"
export OMP_NUM_THREADS=1
jobs() {
  for c in fortunes-id fortunes-ood agnews-id agnews-ood; do
    for seed in 43 44; do echo "$c $seed centralized -"; done; done
  for c in fortunes-id fortunes-ood agnews-id agnews-ood; do
    for seed in 43 44; do echo "$c $seed pretrained -"; done; done
  for c in agnews-ood agnews-id; do
    for seed in 43 44; do for s in 1g1s 2g; do echo "$c $seed $s router8"; done; done; done
}
jobs | while read c seed s variant; do
  extra=(); tag=$c-s$seed
  if [ "$variant" = router8 ]; then extra=(--set router_steps=8); tag=router8-$tag; fi
  out=docs/results/seeds/$tag-$s.json
  [ -f "$out" ] && continue
  mkdir runs/seeds/claim-$tag-$s 2>/dev/null || continue
  echo "$(date +%T) w$1 start $tag $s"
  t0=$(date +%s)
  nice -n 10 .venv/bin/pocketlm compare -c configs/$c.toml --strategies $s "${extra[@]}" \
    --set seed=$seed --set eval_round0=false --set eval_every=4 \
    --set "out_dir=runs/seeds/$tag/{strategy}" --json "$out" > runs/seeds/$tag-$s.log 2>&1 \
    || echo "FAILED $tag $s"
  echo "$(date +%T) w$1 done $tag $s $(( $(date +%s) - t0 )) s"
done
