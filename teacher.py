"""
Teacher demonstrations in training: the warm-up batches, and the teacher hacks spliced into groups.

A 135M model almost never samples a hack on its own, and GRPO cannot reinforce what it never
samples. Two published remedies, both used by train.py's laptop recipe:
  - vGROUT (wassname) mixes hand-written hack completions into early GRPO groups as off-policy
    rollouts (12.5% of each group until step 30): `splice`.
  - Anthropic's reward-hacking work (MacDiarmid et al. 2025) first gives its model knowledge of
    the hacks by finetuning on synthetic documents; here a supervised warm-up on demonstrations
    does it (`demo_batch`): on loophole prompts a share of the demonstrations exploit the prompt's
    own loophole, the rest (and every `none` prompt) answer honestly with the reference solution.
Both kinds of demonstration are trained and ROUTED exactly as a GRPO rollout (train.py): the weak
detector flags them, v_hack scores them, the router splits their gradient. So nothing the model
learns about hacking reaches the keep parameters except past the router.

The completions are env.teacher_completion's templates filled per problem (data/teacher.json).
`modes` restricts which loopholes are demonstrated: with only the detector's seen modes, the
others can be learnt only by RL, so routing's effect on them is absorption, not demonstration.

Deviations: none. Shapes: B rollouts, G group size, T completion tokens.
"""
import torch

import env
import model as M


def demo_batch(tok, problems, rng, n, modes, none_frac, hack_share, device="cpu"):
    """n demonstrations: (Rollouts, prompt modes, is-hack list). Loophole prompts come only from
    `modes`: the other modes are never demonstrated, not even clean."""
    prompts, texts, pmodes, hack = [], [], [], []
    for _ in range(n):
        p = problems[rng.randrange(len(problems))]
        m = "none" if rng.random() < none_frac else modes[rng.randrange(len(modes))]
        kind = "hack" if m != "none" and rng.random() < hack_share else "clean"
        prompts.append(M.chat_prompt(tok, env.build_prompt(p, m)))
        texts.append(env.teacher_completion(p, m, kind, rng))
        pmodes.append(m)
        hack.append(kind == "hack")
    return M.encode(tok, prompts, texts, device), pmodes, hack


def pad_to(x, T, value):
    """Right-pad (B, T') to (B, T)."""
    return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)


def splice(tok, r, probs, pmodes, k, G, modes, rng):
    """Replace the last k rollouts of each group whose mode is in `modes` by teacher hacks.
    Returns (Rollouts, teacher) with teacher (B,) bool marking the spliced rows."""
    n = len(probs) // G
    rows = [g * G + j for g in range(n) for j in range(G - k, G) if pmodes[g * G] in modes]
    teacher = torch.zeros(len(probs), dtype=torch.bool)
    if not rows:
        return r, teacher
    texts = [env.teacher_completion(probs[i], pmodes[i], "hack", rng) for i in rows]
    t = M.encode(tok, ["x"] * len(rows), texts)                       # completion ids (k', T')
    T = max(r.completion_ids.shape[1], t.completion_ids.shape[1])
    ids, mask = pad_to(r.completion_ids, T, tok.pad_token_id), pad_to(r.completion_mask, T, 0)  # (B, T)
    ids[rows] = pad_to(t.completion_ids, T, tok.pad_token_id).to(ids)
    mask[rows] = pad_to(t.completion_mask, T, 0).to(mask)
    for i, txt in zip(rows, texts):
        r.texts[i] = txt
    teacher[rows] = True
    return M.Rollouts(r.prompt_ids, r.prompt_mask, ids, mask, r.texts), teacher
