"""
train.py's arguments, and the Recipe a step reads (like nanoGPT's configurator.py, kept out of the loop).

    python train.py --router grad --model Qwen/Qwen3-4B      # the defaults: the GPU recipe
    python train.py --config recipes/laptop.json             # SmolLM2-135M on a CPU (make demo)

As in nanoGPT, the defaults are the real experiment and the small run is a config file: a recipe
(recipes/*.json) replaces the defaults, flags given on the command line still win, and the resolved
arguments (with the recipe's path) are saved in the run's ckpt/args.json.

The GPU recipe is shaped after the published RL reward-hacking replication on code (ariahw's
rl-rewardhacking: Qwen3-4B, LeetCode medium/hard, a hinted run_tests() loophole, GRPO ~200 steps of
16 prompts x 16, LoRA r 32 at lr 7e-5, beta 1e-3; hacking appears in every run by step 80-100 and
reaches ~79%, from 0.09% in the base model): no demonstrations, hard problems plus problems no honest
solution can pass (hacking tracks the capability gap: an 8B model that solved ~20% honestly hacked
0.6% on LeetCode but 61% on ImpossibleBench), all four loophole modes hinted, 200 steps of 16 x 16,
held-out evaluation every 20 steps so that the onset is visible. Its lr is for delta_S, not LoRA:
Adam moves each singular value ~lr a step, so lr scales with the singular values (~sqrt of the width
at equal weight scale: x sqrt(2560/576) from SmolLM2) and inversely with the run's length (200 RL
steps, the laptop's 32 + 8 when it was set; 32 + 16 now): 5e-2 x 2.1 / 5 = 2e-2. Untuned: no GPU has run it.

The laptop recipe (recipes/laptop.json) teaches the hacks by demonstration (teacher.py), because a
135M model does not find them by RL alone within a CPU budget. A resumed run (--resume OUT) takes its
saved arguments; only --steps and --device may change (ckpt.py). The Recipe holds what one RL or
warm-up step needs, read from the arguments once; eval.py's relearn and retain steps replace its
fields (dataclasses.replace) instead of faking arguments.
"""
import argparse
import json
import os
from dataclasses import dataclass

import ckpt
import env
import problems
import routing

LAPTOP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes", "laptop.json")  # make demo


def parser():
    p = ckpt.Parser(description="GRPO with gradient routing against reward hacking (train.py)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and adapter
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a recipe file (recipes/*.json) whose values replace these defaults; flags still win")
    p.add_argument("--model", default="Qwen/Qwen3-4B",
                   help="an HF id/path, smollm2 (offline), tiny (tests), qwen3-4b-random (Qwen3-4B's shapes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--adapter", default="svd", choices=list(ckpt.WRAP_KIND),
                   help="quarantine = s_quar | added MLP units (SGTM) | the v_hack axes of delta_S")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (0 = all)")
    p.add_argument("--wrap-layers", type=int, default=12, help="wrap the last N decoder layers kept (0 = all)")
    p.add_argument("--rank", type=int, default=0,
                   help="delta_S on the top-r singular directions only (0 = all). The base weight is kept, so "
                        "delta_S = 0 is the base model exactly at any rank; r only limits what can be trained")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--k-units", type=int, default=32, help="forget units added per MLP (--adapter split)")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing (large models)")
    # routing
    p.add_argument("--router", default="grad", choices=list(routing.ROUTERS))
    p.add_argument("--vhack-k", type=int, default=1, help="top-k directions of v_grad per module")
    p.add_argument("--flagged-only", action="store_true", help="grad: only flagged rollouts are eligible")
    p.add_argument("--share", type=float, default=routing.OPTS["share"],
                   help="placebo, uniform: mean routed share (default: grad's, measured on SmolLM2)")
    p.add_argument("--gen-deployed", action="store_true", help="generate with the quarantine off")
    # weak detector (text only, never the oracle)
    p.add_argument("--seen", default="run_tests,file_marker", help="modes the detector can flag")
    p.add_argument("--tpr", type=float, default=1.0)
    p.add_argument("--fpr", type=float, default=0.0)
    # environment
    p.add_argument("--source", default="newfacade/LeetCodeDataset",
                   help="simple | humaneval | a LeetCodeDataset-format .jsonl(.gz) | a HF dataset id in that format")
    p.add_argument("--difficulty", default="medium,hard,impossible",
                   help="levels to train on (hacking wins where solving fails), of easy,medium,hard and impossible "
                        "(the other levels' problems with tests no honest solution passes: half of them)")
    p.add_argument("--modes", default=",".join(env.MODES), help="loophole modes of the training prompts")
    p.add_argument("--none-frac", type=float, default=0.2, help="share of prompts with no loophole")
    # teacher demonstrations (teacher.py)
    p.add_argument("--warmup-steps", type=int, default=0, help="routed supervised steps on demonstrations first")
    p.add_argument("--warmup-lr", type=float, default=5e-2, help="keep's; the quarantine's x lr-quar/lr")
    p.add_argument("--teacher-frac", type=float, default=0.0, help="share of each group replaced by teacher hacks")
    p.add_argument("--teacher-until", type=int, default=0, help="splice teacher hacks before this step")
    p.add_argument("--teach-modes", default="all", help="loophole modes that are demonstrated (all: --modes)")
    # GRPO
    p.add_argument("--steps", type=int, default=200, help="RL steps (0: the warm-up only)")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group-size", type=int, default=16, help="G completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-2,
                   help="keep parameters (GPU: the laptop's 5e-2 x sqrt(2560/576) x 40/200 steps then, untuned)")
    p.add_argument("--lr-quar", type=float, default=None, help="quarantine parameters (default: --lr)")
    p.add_argument("--beta", type=float, default=1e-3, help="k3 KL coefficient")
    p.add_argument("--micro", type=int, default=4, help="rollouts per forward/backward micro-batch")
    # run
    p.add_argument("--out", default="runs/default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every N steps (0: none)")
    p.add_argument("--eval-n", type=int, default=32, help="validation problems of that evaluation, x 5 modes")
    p.add_argument("--resume", default=None, metavar="OUT", help="continue the run in OUT (to --steps, if given)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    return p


def load_recipe(p, path):
    """A recipe file replaces the parser's defaults (nanoGPT's config files, as JSON: {dest: value});
    flags given on the command line still win. Keys starting with "_" are notes."""
    try:
        cfg = json.load(open(path))
    except OSError as e:
        ckpt.die(f"--config {path}: {e.strerror}")
    except json.JSONDecodeError as e:
        ckpt.die(f"--config {path}: not JSON ({e.msg} at line {e.lineno})")
    if not isinstance(cfg, dict):
        ckpt.die(f"--config {path}: not a JSON object")
    acts, cfg = {act.dest: act for act in p._actions}, {k: v for k, v in cfg.items() if not k.startswith("_")}
    bad = [k for k in cfg if k not in acts]
    if bad:
        ckpt.die(f"--config {path}: unknown argument {bad[0]!r}")
    for k, v in cfg.items():  # what the flag would parse: a switch true/false, an int, a number, a string
        act, want = acts[k], {int: int, float: (int, float)}.get(acts[k].type, str)
        switch = isinstance(act, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
        if not (isinstance(v, bool) if switch else v is None and act.default is None or
                isinstance(v, want) and not isinstance(v, bool)):
            ckpt.die(f"--config {path}: {k} {json.dumps(v)} is not a value of --{k.replace('_', '-')}")
    p.set_defaults(**cfg)


def get_args(argv=None):
    p, pre = parser(), argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(argv)[0].config  # first, so that --help shows the recipe's defaults
    if path:
        load_recipe(p, path)
    a = p.parse_args(argv)
    for act in p._actions:  # a recipe's values skip argparse's own check of choices
        if act.choices is not None and getattr(a, act.dest) not in act.choices:
            ckpt.die(f"--{act.dest.replace('_', '-')} {getattr(a, act.dest)!r}: choose from {list(act.choices)}")
    if a.resume:
        a = ckpt.resume_args(a, ckpt.given_args(p, argv))
    return a


def check_args(a):
    if a.group_size < 2:
        ckpt.die("--group-size must be at least 2 (GRPO's baseline is the group mean)")
    if min(a.prompts, a.max_new_tokens, a.micro) <= 0 or a.steps < 0:
        ckpt.die("--prompts, --max-new-tokens and --micro must be positive, --steps not negative (0: warm-up only)")
    if a.steps == 0 and a.warmup_steps == 0:
        ckpt.die("--steps 0 trains the warm-up only: give --warmup-steps > 0")
    if not 0 < a.share <= 1:
        ckpt.die("--share must be in (0, 1]")
    if a.temperature <= 0:
        ckpt.die("--temperature must be positive (rollouts sample softmax(logits / temperature))")
    if min(a.layers, a.wrap_layers, a.rank) < 0:
        ckpt.die("--layers, --wrap-layers and --rank must not be negative (0: all)")
    if not 0 <= a.seed < 2**32 or a.vhack_k < 1 or min(a.warmup_steps, a.teacher_until, a.beta) < 0:
        ckpt.die("--seed must be in [0, 2^32), --vhack-k positive; --warmup-steps, --teacher-until, --beta >= 0")
    if not all(0 <= x <= 1 for x in (a.tpr, a.fpr, a.none_frac, a.teacher_frac)):
        ckpt.die("--tpr, --fpr, --none-frac and --teacher-frac are rates in [0, 1]")
    if a.eval_every < 0 or a.eval_n < 1:
        ckpt.die("--eval-every must not be negative (0: none), --eval-n positive")
    if a.lr <= 0 or min(a.lr_quar or 0.0, a.warmup_lr) < 0:  # the warm-up scales by lr-quar / lr
        ckpt.die("--lr must be positive, --lr-quar and --warmup-lr not negative")
    if a.flagged_only and routing.ROUTERS[a.router].f is not routing.route_grad:
        ckpt.die("--flagged-only is an option of --router grad")
    unknown = [d for d in a.difficulty.split(",") if d not in problems.DIFFICULTIES]
    if unknown:
        ckpt.die(f"--difficulty: unknown level(s) {unknown}; choose from {list(problems.DIFFICULTIES)}")
    if a.eval_every and not env.load_problems(a.source, "validation"):
        ckpt.die(f"--eval-every {a.eval_every}: no validation problems in --source {a.source} (--eval-every 0)")
    if not env.load_problems(a.source, "train", difficulty=a.difficulty):  # a bad --source exits here, one line
        ckpt.die(f"no {a.source} training problems of difficulty {a.difficulty!r}")
    bad = [m for m in a.modes.split(",") + [m for m in a.seen.split(",") if m] if m not in env.MODES]
    if bad:
        ckpt.die(f"unknown mode(s) {bad}; choose from {list(env.MODES)}")
    if not set(teach_modes(a)) <= set(a.modes.split(",")):
        ckpt.die(f"--teach-modes {a.teach_modes} must be 'all' or loophole modes among --modes {a.modes}")
    try:
        os.makedirs(a.out, exist_ok=True)
        open(os.path.join(a.out, f".write_test{os.getpid()}"), "w").close()  # one per process: torchrun's ranks
        os.remove(os.path.join(a.out, f".write_test{os.getpid()}"))
    except OSError as e:
        ckpt.die(f"cannot write to --out {a.out}: {e.strerror}")


def teach_modes(a):
    return a.modes.split(",") if a.teach_modes == "all" else a.teach_modes.split(",")


@dataclass(frozen=True)
class Recipe:
    """What a step needs, taken from the arguments once (eval.py's relearn and retain steps replace fields)."""
    router: routing.Router
    modes: tuple            # loophole modes of the prompts
    none_frac: float        # share of prompts with no loophole
    prompts: int
    group_size: int
    max_new_tokens: int
    temperature: float
    teacher_frac: float
    teacher_until: int
    teach_modes: tuple
    micro: int
    beta: float
    gen_deployed: bool
    flagged_only: bool
    share: float = routing.OPTS["share"]  # placebo, uniform: the mean routed share
    hack_share: float = 1.0  # of warm-up demonstrations on loophole prompts (eval's retain steps: 0)


def recipe(a):
    return Recipe(router=routing.ROUTERS[a.router], modes=tuple(a.modes.split(",")), none_frac=a.none_frac,
                  prompts=a.prompts, group_size=a.group_size, max_new_tokens=a.max_new_tokens,
                  temperature=a.temperature, teacher_frac=a.teacher_frac, teacher_until=a.teacher_until,
                  teach_modes=tuple(teach_modes(a)), micro=a.micro, beta=a.beta, gen_deployed=a.gen_deployed,
                  flagged_only=a.flagged_only, share=a.share)
