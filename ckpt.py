"""
Checkpoints of a training run: adapter-only weights, arguments, v_hack, optimizer and RNG state.

A checkpoint is a folder OUT/ckpt written atomically (built as ckpt.tmp, then renamed), after
every step: the adapter is small (SmolLM2, 12 wrapped layers: 2 x 39,168 singular-value offsets),
so `--resume OUT` loses nothing that was logged. metrics.jsonl is cut back to the checkpoint's
step on resume, so a step logged after the last checkpoint is redone, never duplicated; with the
RNG states restored, a resumed CPU run ends with the same weights as an uninterrupted one.

  OUT/ckpt/adapter.safetensors  keep + quarantine parameters (adapter.adapter_state)
  OUT/ckpt/args.json            every argument of the run (eval.py rebuilds the model from it)
  OUT/ckpt/vhack.*              the extracted hack direction (routers act, grad, erase; --adapter vhack)
  OUT/ckpt/state.pt             step, optimizer moments, RNG states (not weights)

Deviations: none.
"""
import argparse
import copy
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import adapter
import model as M
import vhack

FORMAT = 1  # bump when the layout changes; eval.py refuses other formats
WRAP_KIND = {"svd": "svd", "split": "split", "vhack": "svd"}  # --adapter -> adapter.wrap kind (vhack: + axes)
RESUMABLE = {"steps", "device", "stop_after", "resume"}  # what --resume may change; the rest is the run's


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 (die), not the usage block (--help prints that)."""

    def error(self, message):
        die(message)


@torch.no_grad()
def load_adapter_state(model, sd):
    """Copy a checkpoint's adapter tensors into model (variant B's axes installed first)."""
    mods = adapter.adapter_modules(model)
    for name in {k.rpartition(".")[0] for k in sd if k.endswith(".quar_axes")} & set(mods):
        vhack.install_axes(mods[name], sd[f"{name}.quar_axes"])
    want = set(adapter.adapter_state(model))
    if want != set(sd):
        raise ValueError(f"adapter state mismatch: missing {sorted(want - set(sd))[:3]}, "
                         f"unexpected {sorted(set(sd) - want)[:3]}")
    for key, v in sd.items():
        getattr(mods[key.rpartition(".")[0]], key.rpartition(".")[2]).copy_(v)


def save_ckpt(a, model, opt, vh, step, rngs):
    tmp, final = os.path.join(a.out, "ckpt.tmp"), os.path.join(a.out, "ckpt")
    os.makedirs(tmp, exist_ok=True)
    state = {k: v.contiguous() for k, v in adapter.adapter_state(model).items()}
    save_file(state, os.path.join(tmp, "adapter.safetensors"))
    if vh is not None:
        vh.save(os.path.join(tmp, "vhack"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump({**vars(a), "format": FORMAT}, f, indent=1)
    torch.save({"step": step, "opt": opt.state_dict(), "rngs": rngs}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final + ".old", ignore_errors=True)  # left by a run killed after the next rename
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    if os.path.exists(final + ".old"):
        shutil.rmtree(final + ".old")


def ckpt_dir(out):
    """OUT/ckpt, or OUT/ckpt.old where a run was killed between save_ckpt's two renames."""
    d = os.path.join(out, "ckpt")
    return d + ".old" if not os.path.isdir(d) and os.path.isdir(d + ".old") else d


def load_ckpt(out, model):
    """Load the adapter (and variant B's axes) into model; returns (step, {opt, rngs}, v_hack or None)."""
    d = ckpt_dir(out)
    load_adapter_state(model, load_file(os.path.join(d, "adapter.safetensors")))
    st = torch.load(os.path.join(d, "state.pt"), weights_only=False, map_location="cpu")  # any device resumes
    vh = vhack.VHack.load(os.path.join(d, "vhack")) if os.path.exists(os.path.join(d, "vhack.json")) else None
    return st["step"], st, vh


def saved_args(out):
    """The arguments the run in out was started with, or None."""
    path = os.path.join(ckpt_dir(out), "args.json")
    if not os.path.exists(path):
        return None
    saved = json.load(open(path))
    if "wrap_layers" not in saved:  # older runs: "layers" meant --wrap-layers, nothing was trimmed, full rank
        saved.update(wrap_layers=saved.get("layers", 12), layers=0, rank=0)
    for k, v in (("eval_every", 0), ("eval_n", 32), ("config", None)):  # older runs had none of these
        saved.setdefault(k, v)
    return saved


def given_args(parser, argv):
    """The arguments named on the command line (not left at their defaults): {dest: value}."""
    quiet = copy.deepcopy(parser)
    quiet._defaults = {}  # a --config recipe's values are defaults (set_defaults), not given
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return vars(quiet.parse_args(argv))


def resume_args(a, given):
    """--resume OUT: the run continues with its saved arguments, to --steps if given (as nanoGPT's resume
    continues to max_iters). Any other argument that differs from the run's is an error."""
    saved = saved_args(a.resume)
    if saved is None:
        die(f"--resume {a.resume}: no checkpoint there (expected {os.path.join(a.resume, 'ckpt', 'args.json')})")
    other = [k for k, v in given.items() if k not in RESUMABLE and saved.get(k) != v]
    if other:
        die(f"--resume {a.resume} continues the run as it was started; only --steps and --device can change "
            f"(got --{other[0].replace('_', '-')} {given[other[0]]}, the run has {saved.get(other[0])})")
    saved.pop("format", None)
    keep = {k: v for k, v in given.items() if k in RESUMABLE}
    return argparse.Namespace(**{**saved, "stop_after": None, **keep, "out": a.resume})


def truncate_log(path, next_step):
    """Keep exactly the logged steps < next_step: a step logged after the last checkpoint is redone."""
    if not os.path.exists(path):
        return
    lines = [ln for ln in open(path) if ln.strip() and json.loads(ln)["step"] < next_step]
    with open(path, "w") as f:
        f.writelines(lines)


def start_logs(out, start, resume):
    """The step logs as the checkpoint of step `start` left them (a step logged after it is redone): metrics
    and samples keep the steps < start, heldout (evaluated after a checkpoint) those <= start. A new run in
    an old --out starts them empty."""
    os.makedirs(out, exist_ok=True)
    for name, keep in (("metrics.jsonl", start), ("samples.jsonl", start), ("heldout.jsonl", start + 1)):
        truncate_log(os.path.join(out, name), keep if resume else 0)
    open(os.path.join(out, "metrics.jsonl"), "a").close()  # --steps 0 (the warm-up only) leaves it empty


def rng_states(rng, gen, det_rng):
    """Every random stream a step draws from: the batch's (python), the weak detector's, torch's, the
    sampling generator, numpy's."""
    return {"py": rng.getstate(), "det": det_rng.getstate(), "torch": torch.get_rng_state(),
            "gen": gen.get_state(), "np": np.random.get_state()}


def set_rng_states(rngs, rng, gen, det_rng):
    rng.setstate(rngs["py"])
    torch.set_rng_state(rngs["torch"])
    if rngs["gen"].numel() == gen.get_state().numel():  # else resumed on another device type: the seed's stream
        gen.set_state(rngs["gen"])
    np.random.set_state(rngs["np"])
    if "det" in rngs:  # checkpoints from before it was saved: the detector's stream from its seed
        det_rng.setstate(rngs["det"])


def raise_interrupt(*_):
    """SIGTERM handler: stop as Ctrl-C does (the step in progress is redone on --resume)."""
    raise KeyboardInterrupt


def build(a, device):
    """Load the base model and wrap it as the run's arguments say (train.py and eval.py share this)."""
    model, tok = M.load_model(a.model, device, a.layers)
    n_layers = model.config.num_hidden_layers  # after --layers trimmed it
    layers = list(range(n_layers - a.wrap_layers, n_layers)) if 0 < a.wrap_layers < n_layers else None
    try:
        adapter.wrap(model, kind=WRAP_KIND[a.adapter], targets=tuple(a.targets.split(",")), layers=layers,
                     k_units=a.k_units, rank=a.rank or None, model_id=a.model, cache_dir=M.CACHE)
    except ValueError as e:
        die(str(e))
    return model, tok


def load_run(out, device="cpu"):
    """A finished or partial run as eval.py needs it: (args, wrapped model with trained adapter, tok, vhack)."""
    d = os.path.join(out, "ckpt")
    path = os.path.join(d, "args.json")
    if not os.path.exists(path):
        die(f"{out}: no checkpoint ({path} missing); train with: python train.py --out {out}")
    saved = saved_args(out)
    if saved.get("format") != FORMAT:
        die(f"{out}: checkpoint format {saved.get('format')} is not {FORMAT}; retrain it with this version")
    a = argparse.Namespace(**saved)
    model, tok = build(a, device)
    try:
        load_adapter_state(model, load_file(os.path.join(d, "adapter.safetensors")))
    except (RuntimeError, KeyError, ValueError) as e:
        die(f"{out}: adapter weights do not fit --model {a.model} ({type(e).__name__})")
    vh = vhack.VHack.load(os.path.join(d, "vhack")) if os.path.exists(os.path.join(d, "vhack.json")) else None
    return a, model, tok, vh
