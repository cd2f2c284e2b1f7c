"""One retain (warm-up) step of eval.py --coherence-steps, timed: its token_logp forward and the whole step.
    python retprof.py RUN_DIR"""
import sys, time, random, dataclasses, torch
sys.path.insert(0, ".")
import ckpt, config, routing, env, train, detector, adapter
run, model, tok, vh = ckpt.load_run(sys.argv[1], "cpu")
rc = dataclasses.replace(config.recipe(run), router=routing.ROUTERS["none"], none_frac=1.0, hack_share=0.0)
det = detector.WeakDetector(seen=tuple(run.seen.split(",")), tpr=1.0, fpr=0.0, seed=0)
problems = env.load_problems(run.source, "train", difficulty=run.difficulty)
opt = torch.optim.AdamW(adapter.keep_params(model), lr=run.lr, weight_decay=0.0)
rng = random.Random(0)
import grpo
orig_tl = grpo.token_logp
tt = {"tl": 0.0}
def tl(*a, **k):
    t = time.perf_counter(); r = orig_tl(*a, **k); tt["tl"] += time.perf_counter() - t; return r
grpo.token_logp = tl
for s in range(3):
    tt["tl"] = 0
    t0 = time.perf_counter()
    m = train.warmup_step(model, tok, opt, det, None, problems, rng, rc)
    print(s, f"step {time.perf_counter()-t0:.2f}s  token_logp {tt['tl']:.2f}s", {k: m[k] for k in ("nll", "t")})
import teacher
r, *_ = teacher.demo_batch(tok, problems, rng, rc.prompts * rc.group_size, rc.teach_modes, rc.none_frac, rc.hack_share)
print("demo shape P", r.prompt_ids.shape, "T", r.completion_ids.shape, "tokens", int(r.completion_mask.sum()), int(r.prompt_mask.sum()))
print("micro", rc.micro if hasattr(rc, "micro") else None, rc)
