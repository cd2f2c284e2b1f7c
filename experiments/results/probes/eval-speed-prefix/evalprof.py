"""Time eval.py's phases by wrapping its callees: python evalprof.py EVAL_ARGS..."""
import sys, time, collections, json
sys.path.insert(0, ".")
import eval as E, env, model as M, train, ckpt
T = collections.defaultdict(float); N = collections.Counter()
def wrap(mod, name, key):
    f = getattr(mod, name)
    def g(*a, **k):
        t = time.time(); r = f(*a, **k); T[key] += time.time() - t; N[key] += 1; return r
    setattr(mod, name, g)
wrap(M, "generate", "generate"); wrap(env, "grade_batch", "grade"); wrap(train, "warm_up", "retain")
wrap(ckpt, "load_run", "load"); wrap(E, "rollouts", "rollouts")
t0 = time.time()
E.main(sys.argv[1:], plot=False)
T["total"] = time.time() - t0
print("PHASES", json.dumps({k: round(v, 1) for k, v in T.items()}), dict(N))
