"""
Tests of the sampler (sampler.py): the fast path and its `plain` path draw exactly the tokens of a naive
sampler written here apart (the model's own forward over the whole sequence at every step, its own
inverse-CDF draw), from the same generator.
In float64, where summation order moves a logit by ~1e-12, the tokens are identical; the test
runs there. Covered: shared prompts (groups), left padding, rows stopping at different steps
(finished rows dropped from the batch), greedy and temperature, Llama (SmolLM2) and Qwen3 (q/k
norms, tiny), and every adapter kind and mode the sampler reads weights from. model.generate samples
GEN_ROWS prompts at a time: greedy, chunks give exactly the unchunked rollouts.
"""
import copy
import platform
import sys

import torch
import torch.nn.functional as F

import adapter
import env
import model as M
import sampler
from test_all import loaded, run_all


def prompts(tok, group=3):
    """Two distinct prompts of different lengths, each repeated `group` times, interleaved."""
    return [M.chat_prompt(tok, "Write is_even(n) in Python, with a docstring."), M.chat_prompt(tok, "Hi")] * group


def batch(tok, group=3):
    """prompts(), tokenised and left padded: ids, attention mask (2 group, P)."""
    enc = tok(prompts(tok, group), return_tensors="pt", padding=True, padding_side="left",
              add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def naive(model, ids, attn, T, stops, pad, generator, temperature=1.0, greedy=False):
    """The reference, written apart from sampler.py: each step the model's forward over every row's whole
    sequence, B uniforms drawn (stopped rows too), and each live row takes the first token whose CDF of
    softmax(logits / temperature) exceeds u; pad after a row's stop token, trimmed to the longest row."""
    B = ids.shape[0]
    out, mask = torch.full((B, T), pad), torch.zeros(B, T, dtype=torch.long)
    live = torch.ones(B, dtype=torch.bool)
    for t in range(T):
        seq, seq_attn = torch.cat([ids, out[:, :t]], 1), torch.cat([attn, mask[:, :t]], 1)
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=seq_attn,
                           position_ids=(seq_attn.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].float()
        u = torch.rand(B, generator=generator)
        cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
        nxt = logits.argmax(-1) if greedy else (cdf > u[:, None] * cdf[:, -1:]).int().argmax(-1)
        out[live, t], mask[live, t] = nxt[live], 1
        live &= ~torch.isin(nxt, torch.tensor(stops))
        if not live.any():
            break
    n = int(mask.sum(1).max())
    return out[:, :n], mask[:, :n]


def same_draws(model, tok, T, stops, prompts=None, **kw):
    """The fast sampler and sampler.py's own `plain` path against `naive`, all from generator seed 3."""
    ids, attn = batch(tok) if prompts is None else prompts
    want = naive(model, ids, attn, T, stops, tok.pad_token_id, torch.Generator().manual_seed(3), **kw)
    for plain in (False, True):
        got = sampler.sample(model, ids, attn, T, stops, tok.pad_token_id, plain=plain,
                             generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (plain, got, want)
    return got


def test_fast_sampler_draws_the_plain_samplers_tokens_llama():
    model, tok = loaded("smollm2")
    model = copy.deepcopy(model).double()
    model.model.layers = model.model.layers[:4]  # SmolLM2's shapes, 4 of its 30 layers: the plain sampler is slow
    ids, mask = same_draws(model, tok, 10, M.stop_ids(tok), temperature=1.3)
    assert len(set(map(tuple, ids.tolist()))) > 2  # sampled, not one continuation per prompt


def test_fast_sampler_draws_the_plain_samplers_tokens_qwen3_with_early_stops():
    model, tok = loaded("tiny")
    model = copy.deepcopy(model).double()
    stops = list(range(0, len(tok), 3))  # a third of the vocabulary stops a row: rows end at different steps
    ids, attn = batch(tok)
    for plain in (False, True):  # no new tokens: empty completions, one per row
        out, mask = sampler.sample(model, ids, attn, 0, stops, tok.pad_token_id, plain=plain)
        assert out.shape == mask.shape == (len(ids), 0)
    for greedy in (False, True):
        ids, mask = same_draws(model, tok, 12, stops, greedy=greedy)
        lengths = mask.sum(1)
        assert greedy or len(set(lengths.tolist())) > 1, lengths   # rows were dropped at different steps
        for row, n in zip(ids, lengths):                            # each row: stop token last, pad after
            assert row[n - 1].item() in stops or n == ids.shape[1]
            assert (row[n:] == tok.pad_token_id).all()


def test_a_shared_prefix_is_prefilled_once_and_draws_stay_the_plain_samplers():
    """Eval's prompts: one problem under several grading rules shares a long prefix, which prefill() runs
    once per group; the rows' layouts differ from plain left padding, their draws do not."""
    model, tok = loaded("tiny")
    model = copy.deepcopy(model).double()
    task = ("Write a Python function `count_digits_above(n)` that returns how many digits of the non-negative "
            "integer n are greater than 2.\nExample: count_digits_above(60736) returns 4.")
    ps = [M.chat_prompt(tok, f"{task}\n{env.HINTS[m]}") for m in ("run_tests", "eq_override", "none")]
    ps += [M.chat_prompt(tok, x) for x in ("Hi", "Yo", "Write a haiku about the sea.")]
    enc = tok(ps + ps[:2], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    seqs = [tok(p, add_special_tokens=False).input_ids for p in ps]
    plan = {tuple(sorted(r)): n for n, r in sampler.prefix_groups(seqs)}
    n_task = len(tok(M.chat_prompt(tok, task), add_special_tokens=False).input_ids) - 12  # the template's tail aside
    assert sorted(plan) == [(0, 1, 2), (3, 4, 5)] and plan[3, 4, 5] == 0 and plan[0, 1, 2] >= n_task, (plan, n_task)
    stops, calls, forward = list(range(0, len(tok), 3)), [], sampler.Decoder.forward
    sampler.Decoder.forward = lambda self, ids, *a, **k: calls.append(tuple(ids.shape)) or forward(self, ids, *a, **k)
    try:
        ids, mask = same_draws(model, tok, 12, stops, prompts=(enc.input_ids, enc.attention_mask), temperature=1.3)
    finally:
        sampler.Decoder.forward = forward
    assert len(set(mask.sum(1).tolist())) > 1  # rows ended at different steps
    decode = [c[0] for c in calls if c[1] == 1]  # rows per decode step: finished rows were dropped
    assert decode == sorted(decode, reverse=True) and decode[-1] < len(ps) + 2, decode
    # prefill's forwards: the task's prefix once (1 row), then each group's suffixes (3 rows, the longest's width)
    want = [(1, plan[0, 1, 2]), (3, max(len(seqs[i]) for i in (0, 1, 2)) - plan[0, 1, 2]),
            (3, max(len(seqs[i]) for i in (3, 4, 5)))]
    assert sorted(c for c in calls if c[1] > 1) == sorted(want), (calls, want)


def test_a_generator_per_row_makes_each_rows_draws_its_own():
    """generator: a list, one per row (eval.py seeds one per problem and mode): a row draws the same tokens
    alone as beside the others, and model.generate cuts the list with the prompts (any chunking)."""
    model, tok = loaded("tiny")
    model = copy.deepcopy(model).double()
    ids, attn = batch(tok)  # 6 rows, 2 prompts
    stops, kw = list(range(0, len(tok), 3)), {"temperature": 1.3}

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]
    whole = sampler.sample(model, ids, attn, 12, stops, tok.pad_token_id, generator=gens(range(6)), **kw)
    assert len(set(map(tuple, whole[0].tolist()))) > 2  # the rows of a prompt drew apart
    for b in range(6):
        out, mask = sampler.sample(model, ids[b:b + 1], attn[b:b + 1], 12, stops, tok.pad_token_id,
                                   generator=gens([b]), **kw)
        n = mask.shape[1]
        assert torch.equal(whole[0][b, :n], out[0]) and whole[1][b].sum() == mask.sum(), (b, whole, out)
    at_once, chunked = (M.generate(model, tok, prompts(tok), 12, 1.3, generator=gens(range(6)), rows=r) for r in (6, 4))
    assert at_once.texts == chunked.texts


def test_weight_of_matches_every_adapter_kind_and_mode():
    base, tok = loaded("tiny")
    ids, attn = batch(tok, group=1)
    for kind in ("svd", "split"):
        m = copy.deepcopy(base).double()
        adapter.wrap(m, kind, k_units=4)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in (q for n, q in m.named_parameters() if q.requires_grad):  # non-zero keep, quarantine, units
                p.copy_(torch.randn_like(p) * 0.1)
        for mode in ("train", "deployed", "base"):
            with adapter.adapter_mode(m, mode), torch.no_grad():
                want = m(input_ids=ids, attention_mask=attn,
                         position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
                got = sampler.Decoder(m, 2, ids.shape[1] + 1).forward(ids, (attn.cumsum(-1) - 1).clamp(min=0),
                                                                      sampler.prefill_keys(attn), 0)
            err = (got.double() - want.double()).abs().max().item()
            assert err < 1e-6, (kind, mode, err)  # logits come back as float32 (|logit| ~1); modes differ by ~0.5
    assert sampler.supported(base)


def test_prepacked_linears_compute_the_linears_in_float32():
    """On an x86 CPU in float32 the sampler's matmuls run on oneDNN's prepacked weights (the tests above are
    float64, which takes W^T): against float64 F.linear they agree to float32 rounding, with and without
    a bias, for 2-D and 3-D inputs and 1 to 35 rows."""
    torch.manual_seed(0)
    lins = [torch.nn.Linear(48, 40), torch.nn.Linear(48, 24, bias=False)]
    f = sampler.Fused(lins)
    assert sampler.prepacked() or platform.machine() not in ("x86_64", "AMD64")  # torch's CPU builds have it
    assert (f.packed is not None) == sampler.prepacked() and (f.Wt is None) == sampler.prepacked()
    for shape in ((1, 48), (5, 48), (5, 7, 48)):
        x = torch.randn(shape)
        for y, lin in zip(f(x), lins):
            want = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
            assert y.dtype == torch.float32 and y.shape == want.shape
            assert (y.double() - want).abs().max() < 1e-5, (shape, (y.double() - want).abs().max())


def test_generate_in_chunks_is_generate_at_once():
    """rows=2 over 5 prompts of different lengths (3 chunks, the last of one): greedy, the same ids, masks
    and texts as all 5 at once, prompts re-padded on the left and completions on the right. The tiny model's
    weights are redrawn larger (its own repeat one token) and every 11th token id stops a row, so rows end at
    different steps and the last chunk's completions are narrower than the others'."""
    model, tok = loaded("tiny")
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    prompts = [M.chat_prompt(tok, "Hi" + " there" * i) for i in (0, 3, 1, 5, 2)]
    stop_ids, M.stop_ids = M.stop_ids, lambda tok: list(range(0, len(tok), 11))
    try:
        whole = M.generate(model, tok, prompts, 12, greedy=True)
        parts = M.generate(model, tok, prompts, 12, greedy=True, rows=2)
    finally:
        M.stop_ids = stop_ids
    lengths = whole.completion_mask.sum(1).tolist()
    assert len(set(lengths)) > 1 and lengths[4] < max(lengths[:4]), lengths  # chunk widths differ: padding runs
    assert parts.texts == whole.texts
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(whole, name), getattr(parts, name)), name


if __name__ == "__main__":
    sys.exit(1 if run_all([sys.modules[__name__]]) else 0)
