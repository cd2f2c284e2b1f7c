"""
Adapters that carry a quarantine: SVD delta_S offsets and SGTM's split forget units.

- Gradient Routing (Cloud et al. 2024, arXiv 2410.04332): route chosen examples' gradients into a
  reserved region, ablate it at deploy; "Expand, Route, Ablate" adds that region as new units.
- SGTM (Shilov, Cloud et al. 2025, arXiv 2512.05648), src/sgtm/model/split_linear.py: retain rows
  first, forget rows last, `weight` = their concatenation; ablate(trainable=True) re-draws them.
- delta_S (vGROUT's SVD adapter): W = U diag(S) Vh frozen, trainable singular-value offsets,
  y = x W^T + ((x Vh^T) * s) U^T,  s = s_keep + s_quar.  Deploy: s_quar gone.

Deviations:
  1. Forget units are ADDED to a pretrained MLP (Cloud's Expand; SGTM splits a model trained from
     scratch): k gate/up rows ~ N(0, std of retain rows), k down_proj input columns at 0 (so the
     function is unchanged); `SplitLinearIn` is SGTM's class transposed. Retain weights stay
     frozen; kind="split" keeps with a delta_S (no s_quar), so both kinds train the same keep.
  2. The forward never depends on routing: routing.Capture's Slot (`.slot`, slot.py) only hooks it.
  3. ablate("reinit") is SGTM's ablate(trainable=True): every forget unit re-drawn, down_proj's columns too (as SGTM's
     c_proj, though wrap starts them at 0), so the model is NOT the deployed one; s_quar stays 0 (never a dead unit).
  4. U, Vh in the model's dtype (bf16 on a GPU), S and offsets float32; `rank` keeps the top-r singular directions. W is
     kept and U diag(s) Vh added: s = 0 is the base model EXACTLY at any rank and dtype (which limit only dW's reach).
  5. No-grad forwards (sampling, eval) use the merged weight W + U diag(s) Vh, cached per mode, redone when s or
     W's dtype or device changes: sampling costs what the base model costs. In bf16 the merge rounds the
     delta to W's precision, so the sampler's policy is not exactly the trained forward's.
  6. Variant B (vhack.set_vhack_axes): the quarantine is the v_hack axes of delta_S itself,
     s = s_keep + A c with A (r, k) orthonormal (`quar_axes`) and c the trainable s_quar.
  7. Under routing.Capture in float32 the training forward is merged too: y = x Wm^T, dx = dy Wm, and
     z = x Vh^T, dh = dy U for the Slot; a third fewer FLOPs, the same gradients up to rounding (not bf16).

Shapes: b rollouts (micro-batch), L positions, d_in/d_out, r delta_S rank, k forget units or v_hack axes.
"""
import copy
import hashlib
import os
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SVDDelta(nn.Module):
    """y = x W^T + ((x Vh^T) * (s_keep + s_quar)) U^T with W = U diag(S) Vh frozen."""

    def __init__(self, base, U, S, Vh):
        super().__init__()
        self.base, self.mode, self.slot, self._cache = base, "train", None, {}  # base: the frozen nn.Linear
        self.register_buffer("U", U)    # (d_out, r)
        self.register_buffer("S", S)    # (r,)
        self.register_buffer("Vh", Vh)  # (r, d_in)
        self.s_keep, self.s_quar = nn.Parameter(torch.zeros_like(S)), nn.Parameter(torch.zeros_like(S))
        self.register_buffer("quar_axes", None)  # (r, k) when the quarantine is the v_hack axes

    def offset(self):
        """s = s_keep + s_quar (train), s_keep (deployed), 0 (base).  (r,)"""
        if self.mode == "base":
            return torch.zeros_like(self.s_keep)
        if self.mode == "deployed" or self.s_quar is None:
            return self.s_keep
        return self.s_keep + (self.s_quar if self.quar_axes is None else self.quar_axes @ self.s_quar)

    @property
    def weight(self):
        """The plain weight this module computes: W + U diag(s) Vh  (d_out, d_in)."""
        return self.base.weight + ((self.U * self.offset().to(self.U.dtype)) @ self.Vh).to(self.base.weight.dtype)

    @torch.no_grad()
    def merged(self):
        s, hit, W = self.offset(), self._cache.get(self.mode), self.base.weight
        if hit is None or (hit[1].dtype, hit[1].device) != (W.dtype, W.device) or not torch.equal(hit[0], s):  # dev. 5
            hit = self._cache[self.mode] = (s.clone(), self.weight)
        return hit[1]

    def forward(self, x):
        if self.mode == "base":
            return self.base(x)
        merged = not torch.is_grad_enabled() if self.slot is None else self.base.weight.dtype in self.slot.MERGED
        if merged:                                                         # deviations 5 and 7
            y = F.linear(x, self.merged(), self.base.bias)                 # (b, L, d_out)
            return y if self.slot is None else self.slot.merged(x, y)
        y = self.base(x)                                                   # (b, L, d_out)
        z = x.to(self.Vh.dtype) @ self.Vh.T                                # (b, L, r)
        h = z * self.offset() if self.slot is None else self.slot.scale(z, self.offset())  # (b, L, r)
        return y + (h.to(self.U.dtype) @ self.U.T).to(y.dtype)             # (b, L, d_out)


class SplitLinearOut(nn.Module):
    """SGTM's split layer: output rows [retain (d_out) ; forget (k)]; weight = their concatenation."""

    def __init__(self, retain, k):
        super().__init__()
        W = retain.base.weight
        self.retain, self.mode, self.slot = retain, "train", None
        self.weight_forget = nn.Parameter(torch.randn(k, W.shape[1], dtype=W.dtype, device=W.device) * W.std())

    @property
    def weight(self):
        return torch.cat([self.retain.weight, self.weight_forget], 0)      # (d_out + k, d_in)

    def forward(self, x):  # retain first: under the act router the forget rows use its token f
        y, Wf = self.retain(x), self.weight_forget                         # (b, L, d_out)
        y_f = F.linear(x, Wf) if self.slot is None else self.slot.linear(x, Wf)  # (b, L, k)
        return torch.cat([y, y_f], -1)                                     # (b, L, d_out + k)


class SplitLinearIn(nn.Module):
    """down_proj with k forget input columns appended (zero at start): y = retain(x_I) + x_k Wf^T."""

    def __init__(self, retain, k):
        super().__init__()
        W = retain.base.weight
        self.retain, self.mode, self.slot = retain, "train", None
        self.weight_forget = nn.Parameter(torch.zeros(W.shape[0], k, dtype=W.dtype, device=W.device))

    @property
    def weight(self):
        return torch.cat([self.retain.weight, self.weight_forget], 1)      # (d_out, I + k)

    def forward(self, x):
        I, Wf = self.retain.base.in_features, self.weight_forget
        y = self.retain(x[..., :I])                                        # (b, L, d_out)
        if self.mode != "train":  # deployed / base: the forget units are not there
            return y
        return y + (F.linear(x[..., I:], Wf) if self.slot is None else self.slot.linear(x[..., I:], Wf))  # (b, L, k)


ADAPTERS = (SVDDelta, SplitLinearOut, SplitLinearIn)


def adapter_modules(model, cls=ADAPTERS):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def find_targets(model, targets, layers):
    """[(name, nn.Linear)] in decoder layers `layers` (None = all, negative ok) with leaf in targets."""
    n = model.config.num_hidden_layers
    keep = range(n) if layers is None else {i % n for i in layers}
    hits = [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and (m := re.search(r"layers\.(\d+)\.(?:.*\.)?([^.]+)$", name))
            and m.group(2) in targets and int(m.group(1)) in keep]
    if not hits:
        raise ValueError(f"wrap: no nn.Linear matches targets={tuple(targets)} layers={layers} "
                         f"(the model has {n} layers; already wrapped?)")
    return hits


def svd_factors(found, rank=None, cache_file=None):
    """{name: (U, S, Vh)}, the top-`rank` singular triplets of each found Linear's W, computed in float32;
    U and Vh in W's dtype, S float32. From the disk cache when the weight matches."""
    cache = load_file(cache_file) if cache_file and os.path.exists(cache_file) else {}
    dirty, out = False, {}
    for name, lin in found:
        W = lin.weight.detach()
        fp = torch.stack([W.double().sum(), W.double().square().sum()]).cpu()  # fingerprint of the weight
        if f"{name}.fp" not in cache or not torch.allclose(cache[f"{name}.fp"], fp, rtol=1e-9, atol=0):
            U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
            r = rank or len(S)  # copies, not views: a view of the top r would keep all of U or Vh alive
            U, S, Vh = (t.clone(memory_format=torch.contiguous_format)
                        for t in (U[:, :r].to(W.dtype), S[:r], Vh[:r].to(W.dtype)))  # (d_out, r) (r,) (r, d_in)
            cache.update({f"{name}.U": U, f"{name}.S": S, f"{name}.Vh": Vh, f"{name}.fp": fp})
            dirty = True
        out[name] = tuple(cache[f"{name}.{k}"].to(W.device).contiguous() for k in ("U", "S", "Vh"))
    if dirty and cache_file:
        os.makedirs(os.path.dirname(cache_file) or ".", exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in cache.items()}, f"{cache_file}.tmp{os.getpid()}")
        os.replace(f"{cache_file}.tmp{os.getpid()}", cache_file)  # atomic: never half a cache
    return out


def set_module(model, name, new):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def wrap_split(leaf, delta, k_units):
    """Every target: a keep-only delta_S; each MLP also grows k forget units (the quarantine)."""
    delta.s_quar = None
    split = {"gate_proj": SplitLinearOut, "up_proj": SplitLinearOut, "down_proj": SplitLinearIn}.get(leaf)
    return split(delta, k_units) if split else delta


WRAPPERS = {"svd": lambda leaf, delta, k_units: delta, "split": wrap_split}  # svd: s_quar is the quarantine


def wrap(model, kind="svd", targets=TARGETS, layers=None, k_units=32, rank=None, cache_dir=None, model_id=None):
    """Replace the target nn.Linear modules in place; returns {name: wrapper}. The SVDs are cached in
    cache_dir (model.CACHE: $GR_CACHE, else ~/.cache/gradient-routing), a file per model id, rank and dtype."""
    if kind not in WRAPPERS:
        raise ValueError(f"wrap: kind must be one of {sorted(WRAPPERS)}, got {kind!r}")
    found = find_targets(model, targets, layers)
    if kind == "split" and not {"gate_proj", "up_proj", "down_proj"} <= {n.rpartition(".")[2] for n, _ in found}:
        raise ValueError("wrap(kind='split') needs all of gate_proj, up_proj, down_proj among the targets")
    mid = model_id or getattr(model.config, "name_or_path", "") or "model"
    key = f"{hashlib.sha1(mid.encode()).hexdigest()[:8]}-r{rank or 'all'}-{str(found[0][1].weight.dtype)[6:]}"
    cache_file = cache_dir and os.path.join(cache_dir, f"svd-{os.path.basename(mid.rstrip('/'))}-{key}.safetensors")
    factors, out = svd_factors(found, rank, cache_file), {}
    for name, lin in found:
        out[name] = WRAPPERS[kind](name.rpartition(".")[2], SVDDelta(lin, *factors[name]), k_units)
        set_module(model, name, out[name])
    return out


def keep_params(model):
    return [m.s_keep for m in adapter_modules(model, SVDDelta).values()]


def quar_params(model):
    return [p for m in adapter_modules(model).values() for k in ("s_quar", "weight_forget")
            if (p := getattr(m, k, None)) is not None]


def ablate_zero(model):
    for p in quar_params(model):
        p.zero_()


def ablate_reinit(model):
    """SGTM ablate(trainable=True): each forget unit re-drawn from N(0, std of its retain weights) (deviation 3)."""
    ablate_zero(model)  # s_quar stays at zero
    for m in adapter_modules(model, (SplitLinearOut, SplitLinearIn)).values():
        m.weight_forget.normal_(0.0, m.retain.base.weight.std().item())


ABLATIONS = {"zero": ablate_zero, "reinit": ablate_reinit}


@torch.no_grad()
def ablate(model, how="zero"):
    """zero: s_quar, forget units to 0, nothing else (= quarantine_off); reinit: deviation 3. -> whether any changed"""
    before = [p.clone() for p in quar_params(model)]
    ABLATIONS[how](model)
    return not all(torch.equal(b, p) for b, p in zip(before, quar_params(model)))


@contextmanager
def adapter_mode(model, mode):
    old = {m: m.mode for m in adapter_modules(model).values()}
    for m in old:
        m.mode = mode
    try:
        yield model
    finally:
        for m, o in old.items():
            m.mode = o


def quarantine_off(model):
    """The deployed model (keep delta on, quarantine gone), parameters untouched."""
    return adapter_mode(model, "deployed")


def adapters_off(model):
    """The base model: every delta and forget unit off (the KL reference without a second copy)."""
    return adapter_mode(model, "base")


@torch.no_grad()
def merge(model, inplace=False):
    """A plain transformers model equal to the deployed one: nn.Linear(W + U diag(s_keep) Vh)."""
    out = model if inplace else copy.deepcopy(model)
    for name, m in adapter_modules(out).items():
        if name.endswith(".retain"):
            continue  # folded in with its split parent
        delta = getattr(m, "retain", m)
        lin = copy.deepcopy(delta.base)
        with adapter_mode(delta, "deployed"):
            lin.weight.copy_(delta.weight)
        set_module(out, name, lin)
    return out


def adapter_state(model):
    """Trainable adapter tensors (and v_hack axes) by module name, for checkpoints."""
    keys = ("s_keep", "s_quar", "weight_forget", "quar_axes")
    return {f"{name}.{k}": getattr(m, k).detach().clone()
            for name, m in adapter_modules(model).items() for k in keys if getattr(m, k, None) is not None}


if __name__ == "__main__":
    # Self-check, tiny Qwen3, autograd on: zero offsets = base; merged and ablated = deployed.
    from model import load_model
    model, tok = load_model("tiny")
    ids = tok(["def is_even(n):\n    return n % 2 == 0"], return_tensors="pt").input_ids
    for kind in WRAPPERS:
        m = copy.deepcopy(model)
        wrap(m, kind, k_units=8)
        err0 = (m(ids).logits - model(ids).logits).abs().max().item()
        with torch.no_grad():
            [p.normal_(0, 0.05) for p in keep_params(m) + quar_params(m)]
        with quarantine_off(m):
            dep = m(ids).logits
        err_merge = (merge(m)(ids).logits - dep).abs().max().item()
        ablate(m)
        err_ablate = (m(ids).logits - dep).abs().max().item()
        print(f"{kind:5s} |zero offsets - base| {err0:.1e}  |merged - deployed| {err_merge:.1e}  "
              f"|ablated - deployed| {err_ablate:.1e}")
        assert max(err0, err_merge, err_ablate) < 1e-5
