"""
Data parallel GRPO past one GPU: plain torch.distributed under torchrun, as nanochat's chat_rl.py, not DDP.

    torchrun --nproc_per_node N train.py --router grad --model Qwen/Qwen3-4B --prompts 64

Every rank holds the model and adapter and runs the same step (train.rl_step); W ranks, rank k:
  1. draws the SAME prompts (the shared `rng`, seeded alike on every rank);
  2. generates only its share of the groups, whole GRPO groups so the group advantage stays local: the k-th
     of W equal runs of --prompts / W groups (--prompts % W == 0), with its own generator, seed * W + k;
  3. all-gathers the rollouts (token ids and texts), so every rank holds the step's whole batch: the teacher
     splice, the weak detector (its own rng, one draw per completion) and the group advantages then run
     identically on every rank, and every random stream stays in step;
  4. grades only its rows (the sandbox) and all-gathers the grades;
  5. forwards and backwards only its active rows; routing.Capture holds their per-rollout gradients;
  6. before the router's f, sums cos_b and `seen` over the ranks (shared_f): placebo's shift, which makes
     the step's mean f equal --share, is taken over every rank's rollouts, and each f_b is the 1-process one;
  7. after Capture.route() sums the routed keep and quarantine .grad over the ranks (reduce_update). Stock
     DDP reduces in the backward, before routing; here each rank routes its own rows, and since the split
     keep = sum_b (1 - f_b) g_b, quar = sum_b f_b g_b (routing.py) is linear in g given f, the sum over ranks
     is the 1-process gradient. Dr.GRPO's normaliser prompts * G * max_new_tokens is already the global one;
  8. steps the same optimizer on the same gradient: the adapters stay identical with nothing broadcast.
v_hack is extracted once, by rank 0 (which alone writes its cache), and sent to every rank (from_rank0).
The logged metrics are the whole step's: grades are gathered, per-rollout routing (cos, f, |keep|^2,
|quar|^2) and the update's token sums are summed over the ranks, qmass is taken from the summed .grad.
Rank 0 writes the logs, samples and checkpoints (the other ranks' log paths are os.devnull, their stdout
is silenced) and shows the bar. With one process (WORLD_SIZE unset) every function here is the identity.

How it scales. Generation, grading and the train forward/backward (the whole cost of a step) split W
ways, B / W rollouts per rank; every rank still holds the whole model. Per step the ranks exchange:
  - the routed gradients, one all-reduce of S = trainable adapter parameters x 4 bytes x 2 (keep and
    quarantine), delta_S having min(d_out, d_in) entries per wrapped linear (--rank r: r):
      SmolLM2-135M, last 12 layers (q, o, gate, up, down 576; k, v 192): 39,168 per side, S = 313 kB;
      Qwen3-4B, all 36 layers (q, o, gate, up, down 2560; k, v 1024): 534,528 per side, S = 4.3 MB;
    a ring all-reduce sends and receives 2 (W - 1) / W x S per rank (--adapter split adds its forget
    units, k_units x d per MLP linear, to the quarantine side);
  - the rollouts' token ids and masks (2 B (P + T) x 8 bytes gathered, P prompt and T completion tokens),
    texts and grades, and 4 B + 8 numbers of routing statistics: kilobytes.
Deviations from a 1-process run (the update itself equals it to float tolerance, test_dist.py):
  1. the sampling streams: rank k draws from its own generator, so a W-process run samples other
     completions than a 1-process run of the same seed (prompts, splice and detector draws are the same);
  2. a run resumes with as many processes as it was started with (each rank's generator is checkpointed).

Shapes: W ranks, n = B rollouts in the step (every rank indexes the whole batch), N adapter parameters.
"""
import atexit
import dataclasses
import datetime
import io
import os
import sys

import torch
import torch.distributed as td

import ckpt
import model as M

RANK, WORLD, COMM = 0, 1, "cpu"  # this process, the number of processes, the device collectives run on


def init(device, prompts):
    """Under torchrun: one process group (nccl on cuda:LOCAL_RANK, else gloo on the CPU); returns the device."""
    global RANK, WORLD, COMM
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world == 1:
        return device
    if prompts % world:  # each rank generates whole groups
        if rank == 0:
            ckpt.die(f"--prompts {prompts} must be a multiple of the {world} processes (torchrun --nproc_per_node)")
        sys.exit(2)
    if device.startswith("cuda"):
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(device)
    # the other ranks wait at the next step's gather while rank 0 evaluates (--eval-every): a long timeout
    td.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(hours=2))
    atexit.register(td.destroy_process_group)
    RANK, WORLD, COMM = rank, world, device
    if RANK > 0:  # one voice: rank 0 prints; errors still reach stderr
        sys.stdout = open(os.devnull, "w")
    return device


def seed(s):
    """The seed of this rank's sampling generator: s on one process; distinct per (s, rank) for a given W."""
    return s * WORLD + RANK


def shard(n, G):
    """This rank's rows of an n-row batch in groups of G: a slice of whole groups (all of them on one process)."""
    per = n // G // WORLD * G
    return slice(RANK * per, (RANK + 1) * per)


def local(active, n, G):
    """The active rows (indices into the n-row batch) that this rank trains."""
    if WORLD == 1:
        return active
    rows = shard(n, G)
    return active[(active >= rows.start) & (active < rows.stop)]


def gather(xs):
    """Every rank's list, concatenated in rank order."""
    if WORLD == 1:
        return xs
    parts = [None] * WORLD
    td.all_gather_object(parts, list(xs))
    return [x for p in parts for x in p]


def gather_rollouts(r, pad):
    """Every rank's rollouts in rank order: the step's whole batch, prompts left padded and completions right
    padded to the longest (positions come from the masks, grpo.token_logp)."""
    if WORLD == 1:
        return r
    parts = gather([M.Rollouts(r.prompt_ids.cpu(), r.prompt_mask.cpu(), r.completion_ids.cpu(),
                               r.completion_mask.cpu(), r.texts)])
    return M.cat_rollouts(parts, pad, r.prompt_ids.device)


def from_rank0(fn, *args, **kw):
    """fn(*args, **kw) computed by rank 0 and sent to every rank with its tensors on the CPU."""
    if WORLD == 1:
        return fn(*args, **kw)
    buf = [None]
    if RANK == 0:
        b = io.BytesIO()
        torch.save(fn(*args, **kw), b)
        buf = [b.getvalue()]
    td.broadcast_object_list(buf, src=0)
    return torch.load(io.BytesIO(buf[0]), map_location="cpu", weights_only=False)


def rank0_file(path):
    """Where this rank writes a log: path on rank 0, os.devnull on the others."""
    return path if RANK == 0 else os.devnull


def _sum(x):
    """x summed over the ranks, back on x's device in x's dtype (sent as float64: exact for a row held by one)."""
    y = x.detach().to(COMM, torch.float64)
    td.all_reduce(y)
    return y.to(x.device, x.dtype)


def _rows(x, mine):
    """A per-rollout vector whose rows each rank computed for its own rollouts (mine), put together.  (n,)"""
    return _sum(torch.where(mine.to(x.device), x, torch.zeros_like(x)))


def shared_f(f):
    """The router's f over every rank's rollouts: cos_b of each rank's rows and `seen`, summed over the ranks."""
    def f_all(cos, flags, band, opts):
        return f(_rows(cos, opts["seen"]), flags, band, {**opts, "seen": _sum(opts["seen"])})
    return f_all


def recipe(rc):
    """The Recipe with its router's f shared over the ranks (the Recipe itself on one process)."""
    if WORLD == 1:
        return rc
    return dataclasses.replace(rc, router=dataclasses.replace(rc.router, f=shared_f(rc.router.f)))


def reduce_update(opt, cap, stats, sums, finite):
    """After cap.route(), before opt.step(): the routed keep and quarantine .grad summed over the ranks, and
    the step's statistics over every rank's rollouts (stats and sums updated in place). Returns finite: no
    rank saw a non-finite loss. opt's groups are optim.make_optimizer's: keep first, then the quarantine."""
    if WORLD == 1:
        return finite
    params = [p for g in opt.param_groups for p in g["params"]]
    has = [float(p.grad is not None) for p in params] + [float(not finite)]
    flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params]
                     + [torch.tensor(has, device=params[0].device)]).to(COMM)  # (N + #params + 1,)
    td.all_reduce(flat)
    for p, g, h in zip(params, flat.split([p.numel() for p in params] + [len(has)])[:-1], flat[-len(has):]):
        p.grad = g.view_as(p).to(p.device, p.dtype).clone() if h > 0 else None  # cat made it float32
    seen, ro = _sum(cap.seen), stats["rollout"]
    if cap.vh is not None:
        ro["cos"] = _rows(cap.cos, cap.seen).cpu()                                 # (n,)
    ro["keep2"], ro["quar2"] = _sum(ro["keep2"]), _sum(ro["quar2"])               # (n,)
    tok = [s.tok.sum(0).cpu() for s in cap.slots.values() if s.tok is not None]  # act: routed, carrying
    routed = _sum(sum(tok, torch.zeros(2))) if cap.router.token else None
    stats["routed"] = (cap.f[seen].mean() if routed is None else routed[0] / routed[1]).item()
    cos_mean = ro["cos"][seen].mean().item()
    stats["cos_mean"] = None if cos_mean != cos_mean else cos_mean                 # NaN: no v_hack
    keep2, quar2 = (sum(p.grad.square().sum().item() for p in g["params"] if p.grad is not None)
                    for g in opt.param_groups[:2])
    stats["qmass"] = quar2 / max(keep2 + quar2, 1e-30)
    sums.update(zip(sums, _sum(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    return bool(flat[-1] == 0)


def save_ckpt(a, model, opt, vh, step, rng, gen, det):
    """ckpt.save_ckpt by rank 0, with every rank's sampling generator and detector state (--resume restores each)."""
    rngs = ckpt.rng_states(rng, gen, det.rng)
    if WORLD > 1:
        rngs["gen_ranks"], rngs["det_ranks"] = map(list, zip(*gather([(gen.get_state(), det.rng.getstate())])))
    if RANK == 0:
        ckpt.save_ckpt(a, model, opt, vh, step, rngs)


def set_rng_states(rngs, rng, gen, det):
    """ckpt.set_rng_states, then this rank's own generator and detector; the run's number of processes is required."""
    n = len(rngs.get("gen_ranks", [None]))
    if n != WORLD:
        ckpt.die(f"--resume: the run was checkpointed by {n} process(es); resume it with as many "
                 f"(torchrun --nproc_per_node {n}), not {WORLD}")
    ckpt.set_rng_states(rngs, rng, gen, det.rng)
    if WORLD > 1:
        gen.set_state(rngs["gen_ranks"][RANK])
        if "det_ranks" in rngs:
            det.rng.setstate(rngs["det_ranks"][RANK])
