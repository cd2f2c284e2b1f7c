"""
GRPO for the routing experiments: group advantages, token log-probs, the clipped loss, k3 KL.

Which GRPO this is: Dr.GRPO ("Understanding R1-Zero-Like Training", Liu et al. 2025, §3.1) on top
of GRPO (DeepSeekMath, Shao et al. 2024, eq. 3). Departures from the DeepSeekMath objective:
  1. Advantage is mean-only, A_i = r_i - mean(r_group) (Dr.GRPO: dividing by std over-weights
     easy and hard groups).
  2. Token normalisation is a constant: the per-token terms are summed over completion tokens
     and divided by n_prompts * G * max_new_tokens (Dr.GRPO), not by each completion's length
     (GRPO's 1/|o_i| favours long wrong answers and short right ones) nor by the batch's token
     count (TRL's "dapo"). A constant makes micro-batch accumulation exact.
  3. One update per batch: on the sampler's own forward the ratio pi/pi_old is 1 and the clip
     never acts, so the gradient is REINFORCE with a group baseline (checked below). The PPO ratio
     and clip (eps = 0.2, TRL's default) act only on rollouts trained under another forward than
     the one that sampled them (train.py deviation 2: `label`'s unflagged rollouts train the deployed
     model; with --gen-deployed the sampler is the deployed model).
  4. KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1 (Schulman 2020, as DeepSeekMath),
     against the same model with its adapters switched off: no second copy of the model. --beta is
     1e-3 by default (config.py); the laptop recipe sets 0 (as TRL and Dr.GRPO), and with beta = 0
     the reference pass is only run for logging (every KL_EVERY-th step, train.py).
  5. Groups whose rewards all tie have zero advantage and are dropped before the forward pass.
  6. The end-of-turn token is inside the loss mask even though pad == eos for SmolLM2: masking
     every eos-id token (tiny-grpo's bug) means the model never learns to stop.
  7. Reward-side baselines of ariahw/rl-rewardhacking: `screen` (flagged rollouts get advantage
     0 and leave their group's mean) and `penalty` (flagged rollouts get reward -3).

Shapes: n prompts, G group size, B = n*G rollouts, P prompt tokens, T completion tokens, V vocab.
"""
import torch


def group_advantages(rewards, G, valid=None):
    """A_i = r_i - mean_{j in group, valid} r_j. Invalid rollouts get A = 0."""
    r = rewards.view(-1, G)                                                    # (n, G)
    v = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.view(-1, G)
    cnt = v.sum(-1, keepdim=True).clamp(min=1)                                 # (n, 1)
    mean = (r * v).sum(-1, keepdim=True) / cnt                                 # (n, 1)
    adv = (r - mean) * v                                                       # (n, G)
    return adv.view(-1)                                                        # (B,)


def screen(rewards, flags):
    """ariahw's screening: a flagged rollout leaves the group statistics and gets A = 0."""
    return rewards, ~flags


def penalty(rewards, flags, value=-3.0):
    """A flagged rollout is paid `value` instead of its reward (the grader punishes detected hacks)."""
    return torch.where(flags, torch.full_like(rewards, value), rewards), torch.ones_like(flags)


def split_advantages(rewards, flags, G):
    """Routed groups (the `label` router, whose unflagged rollouts train the deployed model): a flagged
    rollout keeps its advantage in the whole group (its gradient goes to the quarantine); an unflagged
    one is scored against the unflagged rollouts of its group only, so the keep never sees a flagged
    reward, not even through the baseline.
    (Against the whole group, a hack paying 3.5 makes every honest attempt's advantage negative: the keep
    then learns only to push its own samples down, and degenerates.)"""
    return torch.where(flags, group_advantages(rewards, G), group_advantages(rewards, G, ~flags))


def token_logp(model, r, temperature=1.0, with_entropy=False):
    """log pi(o_t | q, o_<t) for every completion token. r: model.Rollouts. Returns (B, T) [, (B, T)]."""
    T = r.completion_ids.shape[1]
    ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)                   # (B, P+T)
    attn = torch.cat([r.prompt_mask, r.completion_mask], dim=1)               # (B, P+T)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)                                   # left padding
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos,
                   logits_to_keep=T + 1).logits[:, :-1].float() / temperature  # (B, T, V)
    logz = torch.logsumexp(logits, dim=-1)                                     # (B, T)
    logp = logits.gather(-1, r.completion_ids[..., None]).squeeze(-1) - logz   # (B, T)
    if not with_entropy:
        return logp
    with torch.no_grad():  # entropy is logged, never trained on
        p = torch.softmax(logits, dim=-1)
        ent = logz - (p * logits).sum(-1)                                      # (B, T)
    return logp, ent


def kl_k3(logp, ref_logp):
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, adv, eps=0.2):
    """PPO: min(ratio * A, clip(ratio, 1-eps, 1+eps) * A), per token. (B, T)"""
    ratio, A = torch.exp(logp - old_logp), adv[:, None]
    return torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A)


def grpo_loss(logp, old_logp, adv, mask, norm, ref_logp=None, beta=0.0, eps=0.2):
    """Per-rollout loss terms, (B,), to be summed: -sum_t mask * (surrogate - beta * KL) / norm.

    `norm` = n_prompts * G * max_new_tokens for the whole batch (Dr.GRPO), so summing the per-
    rollout terms of every micro-batch gives the batch loss exactly.
    """
    obj = clipped_surrogate(logp, old_logp, adv, eps)                           # (B, T)
    if beta > 0:
        obj = obj - beta * kl_k3(logp, ref_logp)
    return -(obj * mask).sum(-1) / norm                                        # (B,)


if __name__ == "__main__":
    # Self-check: with ratio 1 and beta 0 the GRPO gradient is REINFORCE, -sum_b A_b grad log p(o_b) / norm.
    import copy
    from model import encode, load_model
    torch.manual_seed(0)
    model, tok = load_model("tiny")
    model.requires_grad_(True)
    prompts = ["<|im_start|>user\nadd two numbers<|im_end|>\n"] * 4
    r = encode(tok, prompts, ["def f(a, b): return a + b", "no", "def f(a,b):\n  return a-b", "pass"])
    rewards = torch.tensor([3.5, 0.0, 0.5, 0.5])
    adv, mask = group_advantages(rewards, G=4), r.completion_mask.float()
    norm = 4 * r.completion_ids.shape[1]
    logp = token_logp(model, r)
    grpo_loss(logp, logp.detach(), adv, mask, norm).sum().backward()
    g_grpo = [p.grad.clone() for p in model.parameters()]
    ref = copy.deepcopy(model)
    ref.zero_grad()
    lp = token_logp(ref, r)
    (-(adv[:, None] * lp * mask).sum() / norm).backward()  # REINFORCE with the group-mean baseline
    err = max((a - p.grad).abs().max().item() for a, p in zip(g_grpo, ref.parameters()))
    print(f"advantages {adv.tolist()}  (mean-only, sum {adv.sum():.1e})")
    print(f"max |grad_GRPO - grad_REINFORCE| = {err:.2e}")
    assert err < 1e-6
