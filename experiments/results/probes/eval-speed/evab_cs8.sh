#!/bin/bash
# eval.py --coherence-steps 8 against 55d221f, alternating old/new/old, wall seconds, one checkpoint (runs/evalspeed).
# Needs `git worktree add /tmp/old55 55d221f`. Run from the repository root:
#   bash experiments/results/probes/eval-speed/evab_cs8.sh > experiments/results/probes/eval-speed/evab_cs8.out
set -e
py=$PWD/.venv/bin/python
run() {  # which copy
  if [ "$1" = old ]; then
    $py experiments/results/probes/eval-speed/mk_old.py runs/evalspeed runs/ev-old > /dev/null
    t0=$(date +%s.%N); (cd /tmp/old55 && $py eval.py --ckpt /work/main/runs/ev-old --coherence-steps 8 > /dev/null 2>&1)
  else
    rm -rf runs/ev-new && cp -r runs/evalspeed runs/ev-new
    t0=$(date +%s.%N); $py eval.py --ckpt runs/ev-new --n 16 --coherence-steps 8 > /dev/null 2>&1
  fi
  echo "$1 $(echo "$(date +%s.%N) - $t0" | bc) s  $(date -u +%H:%M)"
}
echo "# at $(git rev-parse --short HEAD), $(date -u)"
run old; run new; run old
