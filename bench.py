"""
Where a GRPO step's time and memory go, per phase and per router.

    python bench.py                        # SmolLM2, CPU: 16 rollouts x 200 tokens, every router (~7 min)
    python bench.py --quick                # 8 x 64, one round (~1 min);  --json: one JSON object
    python bench.py --model Qwen/Qwen3-4B  # CUDA when present: synchronised clocks, max_memory_allocated

train.rl_step's phases, clocked around the calls train.py makes: generate (M.generate, merged
weights re-merged after each update), grade (env.grade_batch), ref (token_logp, adapters_off),
fwd (token_logp with entropy + grpo_loss in routing.Capture), bwd (loss.backward(): the capture
hooks), route (Capture.route()), opt (optim.RoutedAdamW.step()). After a warm-up (one micro-batch), `--repeats`
rounds of: ref, every router's fwd..opt (interleaved, so drift hits all alike), generate + grade.
Timings are only as good as the machine is quiet: the CPU share other processes took is reported.

train_peak_fraction = the train phase's FLOPs (an analytic count, not the usual 6 N tok) / its
seconds / the matmul peak measured in the same process: both in flops.py, whose docstring derives the count.
gen_peak_fraction = 2 x matmul params x sampled tokens / generate's seconds (sums over rounds) / the same peak.

Deviations from train.py's step:
  1. The train phases run on FIXED teacher-forced rollouts (teacher demos concatenated and cut to
     exactly T tokens, random advantages, detector flags): every router does identical work.
     generate and grade run on sampled completions of the same prompts, at temperature 1 (train.py's
     default; recipes/laptop.json samples at 0.7).
  2. routed_update's loop restated with clocks between its calls (beta 0: the default),
     without its kl/logp/entropy sums and isfinite guards; one ref forward serves every router.
     Every row trains under the trained forward: label's deployed-keep micro-batches and the
     sampler forward of off-policy rows are not timed.
     `plain` (--routers ...,plain) is no router: autograd without Capture, the floor for capture.

Shapes: B rollouts = prompts * G, P prompt tokens, T completion tokens.
"""
import argparse
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

import torch

import adapter
import ckpt
import config
import detector
import env
import flops
import grpo
import model as M
import optim
import routing
import train
import vhack

PHASES = ("generate", "grade", "ref", "fwd", "bwd", "route", "opt")
TARGETS = {"backward_ratio": 1.15, "grade_fraction": 0.10, "startup_s": 15.0, "train_peak_fraction": 0.40,
           "gen_peak_fraction": 0.35}


def get_args(argv=None):
    p = ckpt.Parser(description=__doc__.split("\n\n")[0])
    # what to run
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or an HF id/path")
    p.add_argument("--device", default="auto")
    p.add_argument("--routers", default="none,label,act,grad,erase", help="comma list; `plain` = no capture")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing, as train.py --grad-ckpt")
    # size of the step (train.py: 2 prompts x 8, micro 8)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=200, help="T: completion tokens trained, max new generated")
    p.add_argument("--micro", type=int, default=8)
    # measurement
    p.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up (median)")
    p.add_argument("--quick", action="store_true", help="2 x 4 rollouts x 64 tokens, micro 4, 1 round")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--startup-probe", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    a = p.parse_args(argv)
    if a.quick:
        a.prompts, a.group_size, a.tokens, a.micro, a.repeats = 2, 4, 64, 4, 1
    if bad := [r for r in a.routers.split(",") if r not in routing.ROUTERS and r != "plain"]:
        ckpt.die(f"unknown router(s) {bad}; choose from {list(routing.ROUTERS) + ['plain']}")
    if min(a.prompts, a.tokens, a.micro, a.repeats) < 1 or a.group_size < 2:
        ckpt.die("--prompts, --tokens, --micro and --repeats must be >= 1, --group-size >= 2")
    return a


# ---------------------------------------------------------------- clocks, memory, the machine's load
@contextlib.contextmanager
def clock(t, key, device):
    """t[key] += wall seconds of the block (CUDA: synchronised on both sides)."""
    cuda = str(device).startswith("cuda")
    cuda and torch.cuda.synchronize()
    t0 = time.perf_counter()
    yield
    cuda and torch.cuda.synchronize()
    t[key] = t.get(key, 0.0) + time.perf_counter() - t0


def peak_mb(device, reset=False):
    """Peaks since the last reset, MB: (RSS high-water mark VmHWM, CUDA max_memory_allocated or None)."""
    cuda = str(device).startswith("cuda")
    if reset:
        cuda and torch.cuda.reset_peak_memory_stats()
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: VmHWM := the current RSS
    st = open("/proc/self/status").read() if os.path.exists("/proc/self/status") else ""  # Linux only
    rss = int(m.group(1)) / 1024 if (m := re.search(r"VmHWM:\s+(\d+)", st)) else float("nan")
    return rss, torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def cpu_s():
    """(busy CPU-seconds of the machine: /proc/stat's all but idle and iowait; of this process and children)."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:8]] if os.path.exists("/proc/stat") else [0] * 7
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK"), sum(os.times()[:4])


# ---------------------------------------------------------------- one step, phase by phase
def fixed_batch(a, tok, probs, pmodes, device):
    """B teacher-forced rollouts of exactly T completion tokens (demos concatenated, cut; no padding)."""
    rng, n = random.Random(0), a.tokens // 20 + 2  # demos are 35-60 tokens: enough to cut T from
    texts = ["\n".join(env.teacher_completion(p, m if m != "none" else env.MODES[i % 4], ("clean", "hack")[(i + j) % 2],
                                              rng) for j in range(n)) for i, (p, m) in enumerate(zip(probs, pmodes))]
    r = M.encode(tok, [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in zip(probs, pmodes)], texts, device)
    assert r.completion_mask.sum(1).min() > a.tokens                              # no padding in (B, T)
    ids = r.completion_ids[:, :a.tokens]                                          # (B, T)
    r = M.Rollouts(r.prompt_ids, r.prompt_mask, ids, torch.ones_like(ids), tok.batch_decode(ids))
    flags = torch.tensor(detector.WeakDetector().flags(r.texts), dtype=torch.bool)
    rewards = torch.randn(len(probs), generator=torch.Generator().manual_seed(0))  # every group active
    return r, grpo.group_advantages(rewards, a.group_size).to(device), flags


def ref_phase(a, model, r, device):
    """The k3 reference, as train.routed_update computes it -> ([(b, T)] per micro-batch, seconds)."""
    t = {}
    with clock(t, "ref", device), torch.no_grad(), adapter.adapters_off(model):
        ref = [grpo.token_logp(model, train.subset(r, rows)) for rows in torch.arange(len(r.texts)).split(a.micro)]
    return ref, t["ref"]


def train_phases(a, model, opt, r, adv, flags, vh, ref, router, device):
    """train.routed_update's calls after the reference (beta 0), clocked -> {phase: s}."""
    t, B = {}, len(r.texts)
    mbs, norm = torch.arange(B).split(a.micro), a.prompts * a.group_size * a.tokens  # Dr.GRPO norm
    opt.zero_grad(set_to_none=True)
    cap = None if router == "plain" else routing.Capture(model, n_rollouts=B, router=routing.ROUTERS[router],
                                                         vhack=vh, flags=flags)
    with cap or contextlib.nullcontext():
        for j, rows in enumerate(mbs):
            with clock(t, "fwd", device):
                cap and cap.rows(rows)
                sub = train.subset(r, rows)
                logp, ent = grpo.token_logp(model, sub, 1.0, with_entropy=True)    # (b, T)
                mask = sub.completion_mask.float()
                loss = grpo.grpo_loss(logp, logp.detach(), adv[rows], mask, norm, ref[j], 0.0).sum()
            with clock(t, "bwd", device):
                loss.backward()
    with clock(t, "route", device):
        cap and cap.route()
    with clock(t, "opt", device):
        opt.step()
    return t


def phase_flops(a, model, r):
    """flops.train_flops of train_phases' micro-batches, each padded to its own prompt -> (linear, attention)."""
    subs = [train.subset(r, rows) for rows in torch.arange(len(r.texts)).split(a.micro)]
    per = [flops.train_flops(model, len(s.texts), s.prompt_ids.shape[1], a.tokens) for s in subs]
    return tuple(map(sum, zip(*per)))


# ---------------------------------------------------------------- the benchmark
def startup(a, device):
    """Second-run start-up (caches warm), a fresh process: load + SVD wrap, v_hack, the rest (imports...)."""
    t0 = time.perf_counter()
    argv = ["--startup-probe", "--model", a.model, "--device", str(device), "--routers", a.routers]
    out = subprocess.run([sys.executable, os.path.abspath(__file__)] + argv + ["--grad-ckpt"] * a.grad_ckpt,
                         capture_output=True, text=True)
    if out.returncode:
        ckpt.die(f"start-up probe failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    inside, total = json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t0
    return {"total": total, "other": total - inside["load_wrap"] - inside["v_hack"], **inside}


def setup(a, device):
    """Model, v_hack, optimizer and prompts, built as train.py builds them; clocks of the first two."""
    ta, t = config.get_args(["--config", config.LAPTOP, "--model", a.model, "--prompts", str(a.prompts),
                             "--group-size", str(a.group_size)]), {}
    with clock(t, "load_wrap", device):
        model, tok = ckpt.build(ta, device)
    with clock(t, "v_hack", device):  # train.py's arguments, so train.py's cache entry
        vh = vhack.extract_vhack(model, tok, detector.load_pairs(), k=1, seed=0, cache_dir=M.CACHE) \
            if any(routing.ROUTERS[r].needs_vhack for r in a.routers.split(",") if r != "plain") else None
    if a.grad_ckpt:  # as train.py: checkpointing runs in train mode only
        model.activation_checkpointing_enable()
        model.train()
    opt = optim.make_optimizer(model, ta.lr, ta.lr_quar)
    probs, pmodes = train.sample_batch(env.load_problems("simple", "train"), random.Random(0), config.recipe(ta))
    return model, tok, vh, opt, probs, pmodes, t


def measure(a, device):
    """Warm-up, then `repeats` rounds -> ({router or 'generate': {phase: median s}}, peaks, shape)."""
    (busy0, own0), wall0 = cpu_s(), time.perf_counter()
    model, tok, vh, opt, probs, pmodes, _ = setup(a, device)
    routers, gen = a.routers.split(","), torch.Generator(device=device).manual_seed(0)
    prompts = [M.chat_prompt(tok, env.build_prompt(p, m)) for p, m in zip(probs, pmodes)]
    r, adv, flags = fixed_batch(a, tok, probs, pmodes, device)
    M.generate(model, tok, prompts[:2], 4, generator=gen)                         # warm-up
    rw = train.subset(r, w := torch.arange(min(a.micro, len(probs))))             # one micro-batch
    train_phases(a, model, opt, rw, adv[w], flags[w], vh, ref_phase(a, model, rw, device)[0], routers[0], device)
    runs, mems, n_gen = {k: [] for k in routers + ["generate"]}, {k: [] for k in routers + ["generate"]}, []
    for i in range(a.repeats):
        ref, t_ref = ref_phase(a, model, r, device)
        for k in routers[i % len(routers):] + routers[:i % len(routers)]:  # each router leads a round in turn
            peak_mb(device, reset=True)
            runs[k].append({"ref": t_ref, **train_phases(a, model, opt, r, adv, flags, vh, ref, k, device)})
            mems[k].append(peak_mb(device))
        t, _ = {}, peak_mb(device, reset=True)  # after the updates: generate re-merges, as in training
        with clock(t, "generate", device), torch.no_grad():
            g = M.generate(model, tok, prompts, a.tokens, 1.0, generator=gen)
        with clock(t, "grade", device):
            env.grade_batch(probs, g.texts, pmodes)
        runs["generate"].append(t), mems["generate"].append(peak_mb(device)), n_gen.append(int(g.completion_mask.sum()))
    times = {k: {p: statistics.median(x[p] for x in v) for p in v[0]} for k, v in runs.items()}
    mem = {k: (max(m[0] for m in v), v[0][1] and max(m[1] for m in v)) for k, v in mems.items()}
    B, P, (busy, own) = r.completion_ids.shape[0], r.prompt_ids.shape[1], cpu_s()
    emb = model.get_input_embeddings().weight   # a lookup, no matmul: counted once if the lm_head is tied to it
    shape = {"B": B, "P": P, "T": a.tokens, "gen_tokens": statistics.median(n_gen), "dtype": str(model.dtype)[6:],
             "gen_tok_s": sum(n_gen) / sum(t["generate"] for t in runs["generate"]),  # over all rounds, not medians
             "flops": sum(phase_flops(a, model, r)),
             "params": model.num_parameters() - (0 if model.get_output_embeddings().weight is emb else emb.numel()),
             "peak_flop_s": flops.matmul_peak(device, model.dtype),
             "others_cpu_frac": (busy - busy0 - own + own0) / (time.perf_counter() - wall0) / os.cpu_count()}
    return times, mem, shape


def summarise(a, device, times, mem, shape, start):
    """One JSON-able dict: per-router phases and step, the headline ratios, the targets."""
    routers, g = a.routers.split(","), times.pop("generate")
    base, main = ("none" if "none" in routers else None), ("grad" if "grad" in routers else routers[0])
    train_s = {k: sum(v[p] for p in PHASES[2:]) for k, v in times.items()}       # s per router
    step_s = {k: g["generate"] + g["grade"] + v for k, v in train_s.items()}
    frac = {k: shape["flops"] / v / shape["peak_flop_s"] for k, v in train_s.items()}
    res = {"model": a.model, "device": str(device), "threads": torch.get_num_threads(), **shape, "repeats": a.repeats,
           "main_router": main, "phases_s": {k: {**g, **v} for k, v in times.items()}, "step_s": step_s,
           "backward_ratio": {k: v["bwd"] / times[base]["bwd"] if base else None for k, v in times.items()},
           "grade_fraction": g["grade"] / step_s[main], "grade_per_s": shape["B"] / g["grade"],
           "startup_s": start["total"], "startup": start,
           "train_peak_fraction": frac[main], "train_peak_fraction_by_router": frac,
           "gen_peak_fraction": 2 * shape["params"] * shape["gen_tok_s"] / shape["peak_flop_s"],
           "train_tok_s": shape["B"] * shape["T"] / train_s[main],
           "peak_rss_mb": max(m[0] for m in mem.values()), "peak_rss_mb_by_phase": {k: m[0] for k, m in mem.items()},
           "peak_cuda_mb_by_phase": {k: m[1] for k, m in mem.items()} if str(device).startswith("cuda") else None}
    worst = max([v for k, v in res["backward_ratio"].items() if k != "plain"] or [1.0]) if base else None
    res["targets_met"] = {"backward_ratio": None if base is None else worst <= TARGETS["backward_ratio"],
                          "grade_fraction": res["grade_fraction"] <= TARGETS["grade_fraction"],
                          "startup_s": start["total"] <= TARGETS["startup_s"],
                          "train_peak_fraction": frac[main] >= TARGETS["train_peak_fraction"],
                          "gen_peak_fraction": res["gen_peak_fraction"] >= TARGETS["gen_peak_fraction"]}
    return res


def table(s):
    """The fixed-width report for people."""
    mb, st, bwd = s["peak_cuda_mb_by_phase"] or s["peak_rss_mb_by_phase"], s["startup"], s["backward_ratio"]
    L = [f"bench: {s['model']} on {s['device']} ({s['threads']} threads, {s['dtype']}), {s['B']} rollouts x {s['T']} "
         f"tokens (prompt {s['P']}), median of {s['repeats']}; seconds per step",
         f"{'router':8s}" + "".join(f"{p:>9s}" for p in PHASES) + f"{'step':>8s}{'bwd/none':>9s}{'%peak':>7s}"
         f"{'CUDA MB' if s['peak_cuda_mb_by_phase'] else 'RSS MB':>8s}"]
    L += [f"{k:8s}" + "".join(f"{ph[p]:9.2f}" for p in PHASES) + f"{s['step_s'][k]:8.1f}{bwd[k] or float('nan'):9.2f}"
          f"{100 * s['train_peak_fraction_by_router'][k]:6.0f}%{mb[k]:8.0f}" for k, ph in s["phases_s"].items()]
    L.append(f"generate {s['gen_tok_s']:.1f} tok/s ({s['gen_tokens']:.0f} sampled, "
             f"{100 * s['gen_peak_fraction']:.0f}% of the peak at 2 x params a token, peak {mb['generate']:.0f} MB) | "
             f"train {s['train_tok_s']:.1f} tok/s ({s['main_router']}) | grade {s['grade_per_s']:.1f} "
             f"completions/s, {100 * s['grade_fraction']:.1f}% of the step")
    L.append(f"train phase {s['flops'] / 1e12:.2f} TFLOP (flops.py's count) at {s['main_router']}'s speed = "
             f"{100 * s['train_peak_fraction']:.0f}% of the matmul peak, {s['peak_flop_s'] / 1e9:.0f} GFLOP/s")
    L.append(f"start-up, second run, fresh process: {st['total']:.1f} s = load & wrap {st['load_wrap']:.1f} + v_hack "
             f"{st['v_hack']:.1f} + interpreter, imports, problems {st['other']:.1f}")
    warn = " (timings unreliable)" if s["others_cpu_frac"] > 0.1 else ""
    L.append(f"peak RSS {s['peak_rss_mb']:.0f} MB | other processes took {100 * s['others_cpu_frac']:.0f}% of the "
             f"CPUs{warn} | targets: " + ", ".join(f"{k} {'-' if ok is None else 'ok' if ok else 'MISSED'}"
                                                   for k, ok in s["targets_met"].items()))
    return "\n".join(L)


def main(argv=None):
    a = get_args(argv)
    device = M.pick_device(a.device)
    if a.startup_probe:  # in the fresh process of startup(): what train.py does before its first step
        return print(json.dumps(setup(a, device)[-1]))
    res = summarise(a, device, *measure(a, device), startup(a, device))
    print(json.dumps(res) if a.json else table(res))


if __name__ == "__main__":
    main()
