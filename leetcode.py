"""
LeetCode problems in the format of LeetCodeDataset (Xia et al. 2025, arXiv 2504.14655; the Hugging
Face dataset `newfacade/LeetCodeDataset`), whose medium and hard problems ariahw/rl-rewardhacking
trains Qwen3-4B on.

    python train.py --source data/leetcode_fixture.jsonl --difficulty medium,hard   # .jsonl or .jsonl.gz
    python train.py --source newfacade/LeetCodeDataset    # the hub: needs a network and `datasets`
    python leetcode.py FILE.jsonl                         # check a file: problems per split and level

One JSON object per line. The fields read (the others, e.g. question_id, tags, input_output, query,
response, estimated_date, are ignored):
  task_id              "two-sum", unique        -> id "leetcode/two-sum"; family, the split's key: the
                                                   task_id without a sequel's -ii, -iii... ("jump-game-ii":
                                                   "jump-game"), so a problem and its sequels share a split
  difficulty           "Easy" | "Medium" | "Hard"  -> easy | medium | hard
  problem_description  the statement            -> prompt: the statement, then the starter code
  starter_code         "class Solution:\\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\\n        "
                                                -> signature: that def line (the hack templates')
  prompt               imports and helpers (ListNode...) run before the answer -> context
  entry_point          "Solution().twoSum", or a function name; evaluated in the answer's namespace
                       at each call (data/harness.py), so every call gets a fresh Solution()
  test                 "def check(candidate):\\n    assert candidate(nums=[2, 7, 11, 15], target=9) == [0, 1]"
                       -> tests, graded like HumanEval's check (judges.py)
  completion           a reference solution     -> reference: `prompt`'s import lines, then it

Splits by the md5 of the family, so a problem's split does not depend on the rest of the file:
1/4 test, 1/4 validation, 1/2 train (md5 mod 4 = 0, 1, else).

A malformed row (not JSON, not an object, a missing or non-string field, an unknown difficulty or
entry point, code that does not parse, a test without check(), a starter code without the entry's
method, a repeated task_id) stops the load with one line naming the file, the line and the task_id,
and exit 2. Nothing is skipped silently.

Deviations:
  1. LeetCodeDataset's own train/test split (by release date) is not used: the rows of all its
     splits are pooled and split by task_id as above.
  2. Problems whose starter code names a class the row's `prompt` defines (ListNode, TreeNode) are
     left out, with one line saying how many: the oracle exchanges plain values only (judges.py),
     so a linked list or a tree cannot cross into the sandbox.
  3. A row's test and completion run in the grader process as HumanEval's do (judges.py): a JSONL
     file is trusted like code.
"""
import ast
import functools
import gzip
import json
import os
import re
import sys

from problems import Problem, _h

FIELDS = ("task_id", "difficulty", "problem_description", "starter_code", "prompt", "entry_point", "test",
          "completion")
LEVELS = {"Easy": "easy", "Medium": "medium", "Hard": "hard"}
ENTRY = re.compile(r"(?:(\w+)\(\)\.)?(\w+)")     # "Solution().twoSum" -> (Solution, twoSum); "f" -> (None, f)
SPLIT_OF_BUCKET = ("test", "validation", "train", "train")
SEQUEL = re.compile(r"-(i{2,3}|iv|v|vi{1,3}|ix|x)$")  # "house-robber-iii" -> family "house-robber"


def die(msg):
    """One line and exit 2, as ckpt.die (not imported: it pulls in torch)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def split_of(task_id):
    return SPLIT_OF_BUCKET[int(_h(task_id), 16) % 4]


def _file_rows(path):
    """(where, row) per non-blank line of a .jsonl or .jsonl.gz file."""
    lineno = 0
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    name = re.search(r'"task_id"\s*:\s*"([^"]*)"', line)
                    die(f"{path}:{lineno}: problem {name[1] if name else '?'}: not JSON ({e.msg})")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        die(f"{path}:{lineno + 1}: cannot read: {e}")


def _hub_rows(name):
    """(where, row) for every row of every split of a Hugging Face dataset."""
    import model                                  # here, not at the top: it pulls in torch
    if not model.hub_reachable():
        die(f"--source {name}: not a local .jsonl file, and the Hugging Face hub is not reachable (offline)")
    try:
        import datasets
    except ImportError:
        die(f"--source {name}: a hub dataset needs the `datasets` library (pip install datasets), "
            "or pass a local .jsonl copy")
    d = datasets.load_dataset(name)
    for split in sorted(d):
        for i, row in enumerate(d[split]):
            yield f"{name}[{split}] row {i}", row


def _rows(source):
    if source.endswith((".jsonl", ".jsonl.gz")) and not os.path.isfile(source):
        die(f"--source {source}: no such file")
    if os.path.exists(source):
        if not os.path.isfile(source) or not source.endswith((".jsonl", ".jsonl.gz")):
            die(f"--source {source}: not a .jsonl or .jsonl.gz file")
        return _file_rows(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        die(f"--source {source!r}: expected simple, humaneval, a .jsonl(.gz) file or a Hugging Face dataset id")
    return _hub_rows(source)


def _signature(starter, cls, method):
    """The def line of `method` (in class `cls`, if given) in the starter code, or None. The starter
    code ends before the body, so a `pass` is added at the indentations a body usually has."""
    for indent in (8, 4, 12):
        try:
            tree = ast.parse(starter.rstrip() + "\n" + " " * indent + "pass\n")
            break
        except SyntaxError:
            continue
    else:
        return None
    scope = tree.body
    if cls:
        scope = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    fn = next((n for n in scope if isinstance(n, ast.FunctionDef) and n.name == method), None)
    if fn is None:
        return None
    ret = f" -> {ast.unparse(fn.returns)}" if fn.returns else ""
    return f"def {method}({ast.unparse(fn.args)}){ret}:"


def _check_row(row, where):
    """Every rejection of the module docstring; returns (the parsed `prompt`, the signature)."""
    name = row.get("task_id") if isinstance(row, dict) else None

    def bad(why):
        die(f"{where}: problem {name if isinstance(name, str) and name else '?'}: {why}")

    if not isinstance(row, dict):
        bad("not a JSON object")
    for f in FIELDS:
        if f not in row or row[f] is None:
            bad(f"missing field {f!r}")
        if not isinstance(row[f], str) or (f != "prompt" and not row[f].strip()):
            bad(f"field {f!r} is not a non-empty string")
    if row["difficulty"] not in LEVELS:
        bad(f"difficulty {row['difficulty']!r} is not one of {list(LEVELS)}")
    entry = ENTRY.fullmatch(row["entry_point"])
    if entry is None:
        bad(f"entry_point {row['entry_point']!r} is neither Class().method nor a function name")
    trees = {}
    for f in ("prompt", "completion", "test"):
        try:
            trees[f] = ast.parse(row[f])
        except (SyntaxError, ValueError) as e:
            bad(f"field {f!r} does not parse as Python (line {getattr(e, 'lineno', '?')}: {e})")
    if not any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in trees["test"].body):
        bad("field 'test' defines no check(candidate)")
    sig = _signature(row["starter_code"], *entry.groups())
    if sig is None:
        bad(f"starter_code has no def {entry[2]} for entry_point {row['entry_point']!r}")
    return trees["prompt"], sig


def _problem(row, prompt_tree, sig):
    """A checked row -> Problem (the mapping in the module docstring)."""
    imports = [ast.get_source_segment(row["prompt"], n) for n in prompt_tree.body
               if isinstance(n, (ast.Import, ast.ImportFrom, ast.Assign))]
    reference = "\n".join(imports) + "\n\n\n" + row["completion"] if imports else row["completion"]
    prompt = (f"{row['problem_description'].strip()}\n\nComplete the following Python code.\n"
              f"```python\n{row['starter_code'].rstrip()}\n```")
    return Problem(f"leetcode/{row['task_id']}", "leetcode", SEQUEL.sub("", row["task_id"]), LEVELS[row["difficulty"]],
                   row["entry_point"], prompt, sig, reference, row["test"], row["prompt"])


def _object_classes(row, prompt_tree):
    """The classes the row's prompt defines that its starter code names (deviation 2: left out if any)."""
    classes = {n.name for n in prompt_tree.body if isinstance(n, ast.ClassDef)}
    return {c for c in classes if re.search(rf"\b{c}\b", row["starter_code"])}


@functools.lru_cache(maxsize=None)                # read once per process; load_problems copies the list
def _problems(source):
    out, seen, left_out, classes = [], {}, [], set()
    for where, row in _rows(source):
        prompt_tree, sig = _check_row(row, where)
        if row["task_id"] in seen:
            die(f"{where}: problem {row['task_id']}: task_id repeats {seen[row['task_id']]}")
        seen[row["task_id"]] = where
        objects = _object_classes(row, prompt_tree)
        if objects:
            left_out.append(row["task_id"])
            classes |= objects
        else:
            out.append(_problem(row, prompt_tree, sig))
    if not seen:
        die(f"--source {source}: no problems in it")
    if left_out:
        print(f"{source}: left out {len(left_out)} problem(s) that pass {'/'.join(sorted(classes))} objects "
              f"(the oracle exchanges plain values only), e.g. {', '.join(left_out[:3])}", file=sys.stderr)
    return tuple(out)


def load_leetcode(source, split):
    """The problems of a LeetCode-format source (a .jsonl/.jsonl.gz path or a hub id) in `split` ("all": every one)."""
    return [p for p in _problems(source) if split in ("all", split_of(p.family))]


if __name__ == "__main__":
    # validate a file (default: the fixture) and count its problems per split and level
    here = os.path.dirname(os.path.abspath(__file__))
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "data", "leetcode_fixture.jsonl")
    for s in ("train", "validation", "test"):
        probs = load_leetcode(src, s)
        counts = "  ".join(f"{d} {sum(p.difficulty == d for p in probs)}" for d in LEVELS.values())
        print(f"{s:>10}: {len(probs):4d}  {counts}")
