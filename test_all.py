"""
The test suite: `python test_all.py` runs every test_* function of the test files below (and of
this file) and ends with 'N passed, M failed'; `pytest` collects the same files on its own.

This file holds the model-loading tests (model.py); each concept has its own test file:
  test_env.py      the environment and detector (env.py, detector.py, data/)
  test_data.py     LeetCode-format data and impossible problems (leetcode.py, impossible.py, problems.py)
  test_sandbox.py  the sandbox and the judges (sandbox.py, judges.py)
  test_sampler.py  the sampler against a plain full-recompute one (sampler.py)
  test_routing.py  adapters, routers and v_hack (adapter.py, routing.py, vhack.py)
  test_update.py   one routed update and its optimizer (train.routed_update, grpo.py, optim.py)
  test_train.py    the training loop, its arguments and the teacher (train.py, config.py, teacher.py, bench.py,
                   flops.py)
  test_eval.py     the deploy evaluation (eval.py)
  test_scale.py    Qwen3-4B's shapes on a CPU: trimmed layers, truncated bf16 delta_S, one routed step (model.py,
                   adapter.py, ckpt.py)
  test_dist.py     data parallel under torchrun: 2 gloo ranks update as 1 process on their rollouts (dist.py)
  experiments/test_results.py  the headline runs' tables and bookkeeping (experiments/results.py)

All tests run on CPU, offline, in a few minutes on 2 cores. They assert equivalences and
invariants, never merely that code runs.
"""
import importlib
import os
import subprocess
import sys
import time
import traceback

import torch

import model as M

TEST_FILES = ("test_env", "test_data", "test_sandbox", "test_sampler", "test_routing", "test_update", "test_train",
              "test_eval", "test_dist", "test_scale", "experiments/test_results",
              "experiments/test_compare")
_loaded = {}


def loaded(name):
    """Each model is loaded once per process; tests must not modify it."""
    if name not in _loaded:
        _loaded[name] = M.load_model(name)
    return _loaded[name]


def test_tokenizer_round_trip():
    text = "def is_even(n):\n    return n % 2 == 0  # héllo ✓\n"
    for name in ("tiny", "smollm2"):
        _, tok = loaded(name)
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_chat_prompt_renders():
    _, tok = loaded("smollm2")
    p = M.chat_prompt(tok, "Write f.")
    assert p.endswith("<|im_start|>user\nWrite f.<|im_end|>\n<|im_start|>assistant\n"), p
    _, tok = loaded("tiny")  # Qwen3 template: thinking off = an empty think block
    p = M.chat_prompt(tok, "Write f.")
    assert p == "<|im_start|>user\nWrite f.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", p


def test_greedy_generation_is_deterministic():
    for name in ("tiny", "smollm2"):
        model, tok = loaded(name)
        prompts = [M.chat_prompt(tok, "Write is_even(n) in Python."), M.chat_prompt(tok, "Hi")]
        a = M.generate(model, tok, prompts, max_new_tokens=12, greedy=True)
        b = M.generate(model, tok, prompts, max_new_tokens=12, greedy=True)
        assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
        # left padding must not change a prompt's continuation: batched == alone
        c = M.generate(model, tok, prompts[1:], max_new_tokens=12, greedy=True)
        assert a.texts[1] == c.texts[0], (a.texts[1], c.texts[0])


def test_sampling_mask_keeps_the_stop_token():
    model, tok = loaded("smollm2")
    r = M.generate(model, tok, [M.chat_prompt(tok, "Say hi.")] * 2, max_new_tokens=64, greedy=True)
    stops = M.stop_ids(tok)
    for ids, mask in zip(r.completion_ids, r.completion_mask):
        n = int(mask.sum())
        if n < ids.shape[0] or ids[n - 1].item() in stops:  # finished: last counted token is the stop
            assert ids[n - 1].item() in stops and mask[:n].all() and not mask[n:].any()


def test_cached_smollm2_equals_gguf():
    cached, tok = loaded("smollm2")
    gguf, _ = M.load_smollm2_gguf()
    ids = tok([M.chat_prompt(tok, "Write is_even(n).")], return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = cached(ids).logits, gguf(ids).logits
    print(f"  cached vs GGUF max |dlogit| = {(a - b).abs().max().item():.1e}")
    assert torch.equal(a, b)


def test_unreachable_hub_id_is_one_line_exit_2():
    code = "import model; model.load_model('no-such-org/no-such-model-xyz')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--config recipes/laptop.json" in lines[0], p.stderr


def run_all(mods=None):
    """Tiny runner: every test_* function of mods (default: here and TEST_FILES); prints 'N passed, M failed'.
    A test file run as a script runs its own: run_all([sys.modules[__name__]])."""
    if mods is None:
        mods = [sys.modules[__name__]] + [importlib.import_module(name.replace("/", ".")) for name in TEST_FILES
                                          if os.path.exists(name + ".py")]
    passed = failed = 0
    t_all = time.time()
    for mod in mods:
        for name, fn in [(n, f) for n, f in vars(mod).items() if n.startswith("test_") and callable(f)]:
            t0 = time.time()
            try:
                fn()
                passed += 1
                print(f"ok    {mod.__name__}.{name} ({time.time() - t0:.1f}s)", flush=True)
            except Exception:
                failed += 1
                print(f"FAIL  {mod.__name__}.{name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
    print(f"total {time.time() - t_all:.0f}s")
    print(f"{passed} passed, {failed} failed")
    return failed


if __name__ == "__main__":
    sys.exit(1 if run_all() else 0)
