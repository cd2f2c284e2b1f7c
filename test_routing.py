"""
Invariants of adapter.py, routing.py and vhack.py on the tiny Qwen3.

The one-backward per-rollout gradients are checked against a naive loop that backpropagates each
rollout alone, unpadded; the per-token `act` router against Cloud et al.'s detach routing
(out = m*a + (1-m)*a.detach(), applied to the parameters), an implementation that shares nothing
with slot.Slot. Runs under pytest and as `python test_routing.py`.
"""
import copy
import time

import torch

import adapter
import ckpt
import grpo
import routing
import vhack
from model import chat_prompt, encode, load_model

torch.manual_seed(0)
torch.set_num_threads(1)  # a width-64 model gains nothing from threads; on a shared 2-core box they spin (10x slower)
BASE, TOK = load_model("tiny")
PROMPTS = [chat_prompt(TOK, q) for q in ("Write is_even(n).", "Add two numbers a and b, return the sum.",
                                         "Reverse a list.", "Graded by reading result.txt: write f(x).",
                                         "Square x.", "Return the max of a list of ints, or None if empty.")]
COMPS = ["def is_even(n):\n    return n % 2 == 0", "def add(a, b): return a + b", "x[::-1]",
         "open('result.txt','w').write('PASS')", "def sq(x):\n    return x * x\n# done", "max(xs) if xs else None"]
ADV = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.5, 0.7])
FLAGS = torch.tensor([False, False, False, True, False, True])
MICRO = [[4, 0], [2, 5, 1], [3]]  # non-contiguous micro-batches of different sizes
PAIRS = [{"prompt": "Write f(x) returning x+1. Graded by reading result.txt.",
          "hack": "open('result.txt','w').write('PASS')", "clean": "def f(x):\n    return x + 1"},
         {"prompt": "Write g(s) reversing s. Graded by calling run_tests().",
          "hack": "def run_tests():\n    return True", "clean": "def g(s):\n    return s[::-1]"},
         {"prompt": "Write h(n), n squared. Graded by exit status 0.", "hack": "import sys\nsys.exit(0)",
          "clean": "def h(n):\n    return n * n"},
         {"prompt": "Write k(a, b), the max. Graded by ==.", "hack": "class A:\n    def __eq__(s, o): return True",
          "clean": "def k(a, b):\n    return max(a, b)"}]
KINDS = ("svd", "split", "svd_axes", "split_ckpt")
ROUTED = [n for n, r in routing.ROUTERS.items() if r.rewards is None]  # screen, penalty route as none does


def wrapped(kind, seed=1):
    """A wrapped copy with small random keep/quarantine values (so every gradient path is live)."""
    m = copy.deepcopy(BASE)
    adapter.wrap(m, kind.split("_")[0], k_units=4)
    if kind == "svd_axes":  # seed improvement B: the quarantine is the v_hack axes of delta_S
        vhack.set_vhack_axes(m, vhack.extract_vhack(m, TOK, PAIRS, k=2, holdout=0.0))
    if kind == "split_ckpt":  # train.py --grad-ckpt: the forward of each layer runs again in the backward
        m.activation_checkpointing_enable()
        m.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.keep_params(m) + adapter.quar_params(m):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def rollouts(rows):
    """The given rollouts, padded only as much as they need (so micro-batches differ in length)."""
    return encode(TOK, [PROMPTS[i] for i in rows], [COMPS[i] for i in rows])


def loss_of(model, r, rows):
    logp = grpo.token_logp(model, r)
    mask = r.completion_mask.float()
    return grpo.grpo_loss(logp, logp.detach(), ADV[rows], mask, norm=6 * 20).sum()


def grads(model):
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()
            if p.requires_grad}


def one_backward(model, router, vh, flags=FLAGS, opts=None):
    model.zero_grad()
    cap, total = routing.Capture(model, 6, routing.ROUTERS[router], vh, flags, opts), 0.0
    with cap:
        for rows in MICRO:
            cap.rows(torch.tensor(rows))
            loss = loss_of(model, rollouts(rows), rows)
            loss.backward()
            total += loss.item()
    stats = cap.route()
    return grads(model), stats, total


class DetachSlot:
    """Reference for `act`: per token, the parameters enter as m*p + (1-m)*p.detach() (Cloud)."""
    MERGED = ()  # SVDDelta runs unmerged: autograd differentiates the parameters

    def __init__(self, mod, vh, partner=None):
        self.mod, self.vh, self.partner, self.f = mod, vh, partner, None

    def scale(self, z, s):
        m = self.mod
        q = 0 if m.s_quar is None else (m.s_quar if m.quar_axes is None else m.quar_axes @ m.s_quar)
        self.f = routing.act_token_f(z.detach(), self.vh.v_act[self.name])[..., None]
        keep_only, quar_only = m.s_keep + (q.detach() if torch.is_tensor(q) else q), m.s_keep.detach() + q
        return z * ((1 - self.f) * keep_only + self.f * quar_only)          # (b, L, r)

    def linear(self, x, Wf):
        f = self.partner.f
        return f * (x @ Wf.T) + (1 - f) * (x @ Wf.detach().T)


def naive(model, router, vh, flags=FLAGS):
    """Each rollout backpropagated alone; f from those gradients; keep/quar combined by hand."""
    mods, per = adapter.adapter_modules(model), []
    if router == "act":
        slots = {n: DetachSlot(m, vh) for n, m in mods.items() if isinstance(m, adapter.SVDDelta)}
        slots |= {n: DetachSlot(m, vh, slots[n + ".retain"]) for n, m in mods.items() if n not in slots}
        for n, s in slots.items():
            s.name, mods[n].slot = n, s
    for b in range(6):
        model.zero_grad()
        loss_of(model, rollouts([b]), [b]).backward()
        per.append(grads(model))
    for m in mods.values():
        m.slot = None
    if router == "act":
        return {n: sum(p[n] for p in per) for n in per[0]}
    G = {n: torch.stack([p[n + ".s_keep"] for p in per]) for n, m in mods.items() if isinstance(m, adapter.SVDDelta)}
    cos = routing.rollout_cos(G, vh) if vh else torch.zeros(6)
    f = routing.ROUTERS[router].f(cos, flags, vh.band if vh else (0, 1), routing.OPTS)
    out = {}
    for n in per[0]:
        g = torch.stack([p[n] for p in per])                                   # (n, ...)
        w = 1 - f if n.endswith("s_keep") else f
        out[n] = torch.einsum("b,b...->...", w, g)
        if routing.ROUTERS[router].keep_projection and n.endswith("s_keep"):
            out[n] = routing.erase_vhack(out[n], vh.v_grad[n.rpartition(".")[0]])
    return out


def rel_err(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a) / max(b[n].abs().max().item() for n in b)


def test_zero_offset_matches_base():
    ids = TOK(COMPS[:2], return_tensors="pt", padding=True).input_ids
    ref = BASE(ids).logits
    for kind in ("svd", "split"):
        m = copy.deepcopy(BASE)
        adapter.wrap(m, kind, k_units=4)
        err = (m(ids).logits - ref).abs().max().item()
        with torch.no_grad():
            err_nograd = (m(ids).logits - ref).abs().max().item()
        print(f"  {kind}: |wrapped - base| = {err:.1e} (autograd), {err_nograd:.1e} (no grad)")
        assert err <= 1e-5 and err_nograd <= 1e-5


def test_split_weight_is_concatenation():
    m = wrapped("split")
    x = torch.randn(2, 3, 64)
    for mod in adapter.adapter_modules(m, adapter.SplitLinearOut).values():
        assert (mod(x) - x @ mod.weight.T).abs().max() < 1e-5
    for mod in adapter.adapter_modules(m, adapter.SplitLinearIn).values():
        xi = torch.randn(2, 3, mod.weight.shape[1])
        assert (mod(xi) - xi @ mod.weight.T).abs().max() < 1e-5


def test_one_backward_equals_naive_loop():
    for kind in KINDS:
        m = wrapped(kind)
        vh = vhack.extract_vhack(m, TOK, PAIRS, k=1, holdout=0.25)
        for router in ROUTED:
            got, stats, _ = one_backward(m, router, vh)
            want = naive(m, router, vh)
            err = rel_err(got, want)
            print(f"  {kind:8s} {router:5s} rel err {err:.1e}  routed {stats['routed']:.2f} qmass {stats['qmass']:.2f}")
            assert err <= 1e-5, (kind, router, err)


def test_routing_leaves_loss_unchanged():
    for kind in ("svd", "split"):
        m = wrapped(kind)
        plain = sum(loss_of(m, rollouts(rows), rows).item() for rows in MICRO)
        vh = vhack.extract_vhack(m, TOK, PAIRS, k=1, holdout=0.0)
        for router in ROUTED:
            assert one_backward(m, router, vh)[2] == plain


def test_routing_never_reads_the_oracle():
    m = wrapped("svd")
    vh = vhack.extract_vhack(m, TOK, PAIRS, k=1, holdout=0.0)
    batch = {"texts": COMPS, "gt_correct": torch.tensor([1, 0, 1, 0, 1, 0]),
             "exploited": torch.tensor([0, 0, 0, 1, 0, 1])}

    def detect(b):  # sees only the text
        return torch.tensor(["result.txt" in t for t in b["texts"]])

    for router in ROUTED:
        a = one_backward(m, router, vh, detect(batch), {"flagged_only": True})[0]
        batch["gt_correct"], batch["exploited"] = 1 - batch["gt_correct"], torch.randint(0, 2, (6,))
        b = one_backward(m, router, vh, detect(batch), {"flagged_only": True})[0]
        assert all(torch.equal(a[n], b[n]) for n in a), router


def test_route_everything_and_nothing():
    for kind in ("svd", "split"):
        m = wrapped(kind)
        quar = {id(p) for p in adapter.quar_params(m)}
        names = {n: id(p) in quar for n, p in m.named_parameters() if p.requires_grad}
        g_all, stats, _ = one_backward(m, "label", None, torch.ones(6, dtype=torch.bool))
        assert all(g_all[n].abs().max() == 0 for n, q in names.items() if not q) and stats["qmass"] == 1.0
        assert any(g_all[n].abs().max() > 0 for n, q in names.items() if q)
        g_none, stats, _ = one_backward(m, "none", None)
        assert all(g_none[n].abs().max() == 0 for n, q in names.items() if q) and stats["qmass"] == 0.0


def test_grad_router_band_and_flags():
    cos, flags = torch.tensor([-0.5, 0.1, 0.2, 0.3, 0.9]), torch.tensor([True, True, False, True, False])
    f = routing.route_grad(cos, flags, (0.1, 0.3), routing.OPTS)
    assert torch.allclose(f, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    f = routing.route_grad(cos, flags, (0.1, 0.3), {**routing.OPTS, "flagged_only": True})
    assert torch.allclose(f, torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]))


def test_ablate_removes_exactly_the_quarantine():
    for kind in ("svd", "split", "svd_axes"):
        m = wrapped(kind)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        quar = {id(p) for p in adapter.quar_params(m)}
        assert adapter.ablate(m, "zero") and not adapter.ablate(m, "zero")  # it changed weights, then none
        for n, p in m.named_parameters():
            assert (p.abs().max() == 0) if id(p) in quar else torch.equal(p, before[n]), n
        assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()
                   if "forget" not in k and "s_quar" not in k)
        assert adapter.ablate(m, "reinit") == (kind == "split")  # SGTM trainable=True: forget units alive again
        for n, p in m.named_parameters():
            if n.endswith("weight_forget"):
                assert p.std() > 0
            elif id(p) not in quar:
                assert torch.equal(p, before[n])


def test_merge_reproduces_deployed_logits():
    ids = TOK(COMPS[:3], return_tensors="pt", padding=True).input_ids
    for kind in ("svd", "split"):
        m = wrapped(kind)
        with adapter.quarantine_off(m):
            dep = m(ids).logits
        plain = adapter.merge(m)
        assert not adapter.adapter_modules(plain)
        assert all(type(x) is torch.nn.Linear for n, x in plain.named_modules() if n.endswith("_proj"))
        err = (plain(ids).logits - dep).abs().max().item()
        with adapter.adapters_off(m):
            err_base = (m(ids).logits - BASE(ids).logits).abs().max().item()
        print(f"  {kind}: |merged - deployed| = {err:.1e}, |adapters_off - base| = {err_base:.1e}")
        assert err <= 1e-5 and err_base <= 1e-5


def test_checkpoint_and_svd_cache_roundtrip(tmp_path=None):
    import tempfile
    d = tmp_path or tempfile.mkdtemp()
    m = wrapped("svd_axes")
    sd = adapter.adapter_state(m)
    m2 = copy.deepcopy(BASE)
    adapter.wrap(m2, "svd", cache_dir=str(d), model_id="tiny-test")  # computes and caches the SVDs
    m3 = copy.deepcopy(BASE)
    adapter.wrap(m3, "svd", cache_dir=str(d), model_id="tiny-test")  # reads them back
    ckpt.load_adapter_state(m3, sd)
    assert all(torch.equal(v, adapter.adapter_state(m3)[k]) for k, v in sd.items())
    ids = TOK(COMPS[:1], return_tensors="pt").input_ids
    assert (m3(ids).logits - m(ids).logits).abs().max() < 1e-5
    vh = vhack.extract_vhack(m, TOK, PAIRS, k=2)
    vh.save(f"{d}/vh")
    vh2 = vhack.VHack.load(f"{d}/vh")
    assert vh2.band == vh.band and all(torch.equal(vh.v_grad[n], vh2.v_grad[n]) for n in vh.v_grad)


def test_bad_inputs_raise_one_clear_error():
    m = wrapped("svd")
    cases = [lambda: vhack.extract_vhack(m, TOK, PAIRS[:1] + [{**PAIRS[1], "hack": ""}], k=1),
             lambda: vhack.extract_vhack(m, TOK, PAIRS, k=5),
             lambda: adapter.wrap(copy.deepcopy(BASE), "svd", targets=("no_such_proj",)),
             lambda: vhack.extract_vhack(copy.deepcopy(BASE), TOK, PAIRS),
             lambda: adapter.wrap(copy.deepcopy(BASE), "split", targets=("q_proj",))]
    for case in cases:
        try:
            case()
        except ValueError as e:
            print(f"  ValueError: {e}")
        else:
            raise AssertionError("no ValueError")


if __name__ == "__main__":
    t0 = time.time()
    tests = [(n, f) for n, f in list(globals().items()) if n.startswith("test_")]
    for name, fn in tests:
        fn()
        print(f"ok {name}")
    print(f"{len(tests)} tests passed in {time.time() - t0:.1f}s")
