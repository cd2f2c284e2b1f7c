#!/bin/bash
# bench.py --routers none,grad --json alternating ABBAAB: A = main at 5159d8e (/work/main), B = a git worktree of
# 5159d8e with postops_sampler.diff applied (WT); run from anywhere:  WT=/path/to/worktree bash postops_bench_ab.sh
for v in A B B A A B; do
  d=/work/main; [ $v = B ] && d=$WT
  (cd $d && /work/main/.venv/bin/python bench.py --routers none,grad --json 2>/dev/null) | python3 -c "
import json,sys; d=json.load(sys.stdin); print('$v', round(d['gen_tok_s'],1), round(d['gen_peak_fraction'],3), round(d['peak_flop_s']/1e9), {k: round(v,1) for k,v in d['step_s'].items()}, d['targets_met'])"
done
