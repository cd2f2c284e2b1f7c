"""eval.py in-process, its callees timed: python evalprof.py EVAL_ARGS..."""
import sys, time, collections, json
sys.path.insert(0, ".")
import eval as E, env, model as M, ckpt
T = collections.defaultdict(float)
def wrap(mod, name, key):
    f = getattr(mod, name)
    def g(*a, **k):
        t = time.time(); r = f(*a, **k); T[key] += time.time() - t; return r
    setattr(mod, name, g)
wrap(M, "generate", "generate"); wrap(env, "grade_batch", "grade"); wrap(ckpt, "load_run", "load")
wrap(env, "load_problems", "problems")
t0 = time.time()
import plots
wrap(plots, "all_plots", "plots")
E.main(sys.argv[1:])
T["total"] = time.time() - t0
print("PHASES", json.dumps({k: round(v, 1) for k, v in T.items()}))
