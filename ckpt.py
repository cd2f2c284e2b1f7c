"""
Checkpoints of a training run: adapter-only weights, arguments, v_hack, optimizer and RNG state.

A checkpoint is a folder OUT/ckpt written atomically (built as ckpt.tmp, then renamed), after
every step: the adapter is small (SmolLM2 with 12 wrapped layers: ~60k singular-value offsets),
so `--resume OUT` loses nothing that was logged. metrics.jsonl is cut back to the checkpoint's
step on resume, so a step logged after the last checkpoint is redone, never duplicated; with the
RNG states restored, a resumed CPU run ends with the same weights as an uninterrupted one.

  OUT/ckpt/adapter.safetensors  keep + quarantine parameters (adapter.adapter_state)
  OUT/ckpt/args.json            every argument of the run (eval.py rebuilds the model from it)
  OUT/ckpt/vhack.*              the extracted hack direction (routers act, grad, erase)
  OUT/ckpt/state.pt             step, optimizer moments, RNG states (not weights)

Deviations: none.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import adapter
import routing

FORMAT = 1  # bump when the layout changes; eval.py refuses other formats
# what runs saved before these arguments existed did
OLD_DEFAULTS = {"optim": "adamw", "keep_forward": "train", "off_policy": "ignore", "dual_clip": 0.0, "quar_kl": 0.0, "kl_every": 1,
                "teach_modes": "all", "vhack_every": 0}


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def save_ckpt(a, model, opt, vh, step, rngs):
    tmp, final = os.path.join(a.out, "ckpt.tmp"), os.path.join(a.out, "ckpt")
    os.makedirs(tmp, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.adapter_state(model).items()}, os.path.join(tmp, "adapter.safetensors"))
    if vh is not None:
        vh.save(os.path.join(tmp, "vhack"))
    with open(os.path.join(tmp, "args.json"), "w") as f:
        json.dump({**vars(a), "format": FORMAT}, f, indent=1)
    torch.save({"step": step, "opt": opt.state_dict(), "rngs": rngs}, os.path.join(tmp, "state.pt"))
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    if os.path.exists(final + ".old"):
        shutil.rmtree(final + ".old")


def load_ckpt(a, model, opt):
    d = os.path.join(a.out, "ckpt")
    if not os.path.isdir(d) and os.path.isdir(d + ".old"):  # killed between the two renames
        d += ".old"
    adapter.load_adapter_state(model, load_file(os.path.join(d, "adapter.safetensors")))
    st = torch.load(os.path.join(d, "state.pt"), weights_only=False)
    opt.load_state_dict(st["opt"])
    vh = routing.VHack.load(os.path.join(d, "vhack")) if os.path.exists(os.path.join(d, "vhack.json")) else None
    return st["step"], st["rngs"], vh


def saved_args(out):
    """The arguments the run in out was started with (OLD_DEFAULTS filling what older runs lack), or None."""
    path = os.path.join(out, "ckpt", "args.json")
    return {**OLD_DEFAULTS, **json.load(open(path))} if os.path.exists(path) else None


def resume_args(a):
    """--resume OUT: the saved arguments win (a resumed run is the same run), except --stop-after."""
    saved = saved_args(a.resume)
    if saved is None:
        die(f"--resume {a.resume}: no checkpoint there (expected {os.path.join(a.resume, 'ckpt', 'args.json')})")
    if a.model != saved["model"] and a.model != "smollm2":
        die(f"--resume {a.resume} was trained with --model {saved['model']}, not {a.model}")
    return argparse.Namespace(**{**saved, "resume": a.resume, "out": a.resume, "stop_after": a.stop_after})


def truncate_log(path, next_step):
    """Keep exactly the logged steps < next_step: a step logged after the last checkpoint is redone."""
    if not os.path.exists(path):
        return
    lines = [ln for ln in open(path) if ln.strip() and json.loads(ln)["step"] < next_step]
    with open(path, "w") as f:
        f.writelines(lines)


def rng_states(rng, gen):
    return {"py": rng.getstate(), "torch": torch.get_rng_state(), "gen": gen.get_state(), "np": np.random.get_state()}




def build(a, device):
    """Load the base model and wrap it as the run's arguments say (train.py and eval.py share this)."""
    import model as M
    model, tok = M.load_model(a.model, device)
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers - a.layers, n_layers)) if 0 < a.layers < n_layers else None
    try:
        adapter.wrap(model, kind=a.adapter, targets=tuple(a.targets.split(",")), layers=layers,
                     k_units=a.k_units, model_id=a.model, cache_dir=M.CACHE)
    except ValueError as e:
        die(str(e))
    return model, tok


def load_run(out, device="cpu"):
    """A finished or partial run as eval.py needs it: (args, wrapped model with trained adapter, tok, vhack)."""
    d = os.path.join(out, "ckpt")
    path = os.path.join(d, "args.json")
    if not os.path.exists(path):
        die(f"{out}: no checkpoint ({path} missing); train with: python train.py --out {out}")
    saved = {**OLD_DEFAULTS, **json.load(open(path))}
    if saved.get("format") != FORMAT:
        die(f"{out}: checkpoint format {saved.get('format')} is not {FORMAT}; retrain it with this version")
    a = argparse.Namespace(**saved)
    model, tok = build(a, device)
    try:
        adapter.load_adapter_state(model, load_file(os.path.join(d, "adapter.safetensors")))
    except (RuntimeError, KeyError, ValueError) as e:
        die(f"{out}: adapter weights do not fit --model {a.model} ({type(e).__name__})")
    vh = routing.VHack.load(os.path.join(d, "vhack")) if os.path.exists(os.path.join(d, "vhack.json")) else None
    return a, model, tok, vh
