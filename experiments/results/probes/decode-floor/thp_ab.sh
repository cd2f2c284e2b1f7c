#!/bin/bash
# bench.py --routers none,grad --json, alternating without / with THP_MEM_ALLOC_ENABLE=1
cd /work/main
for i in 1 2; do
  for thp in 0 1; do
    if [ $thp = 1 ]; then export THP_MEM_ALLOC_ENABLE=1; else unset THP_MEM_ALLOC_ENABLE; fi
    .venv/bin/python bench.py --routers none,grad --json > runs/bench-thp$thp-$i.json 2>/dev/null
    python3 -c "
import json; d=json.load(open('runs/bench-thp$thp-$i.json'))
print('thp=$thp round $i', 'gen tok/s %.1f frac %.3f peak %.0f' % (d['gen_tok_s'], d['gen_peak_fraction'], d['peak_flop_s']/1e9),
      'step', {k: round(v, 1) for k, v in d['step_s'].items()}, 'train_frac %.2f' % d['train_peak_fraction'], 'rss', round(d['peak_rss_mb']))"
  done
done
