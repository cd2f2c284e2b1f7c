"""
Tests of the problem data beyond the built-in sets: the LeetCodeDataset-format loader (leetcode.py,
data/leetcode_fixture.jsonl) and the impossible level (impossible.py), through env.load_problems.
Plain `def test_*()` functions with asserts: run under pytest, or `python test_data.py`.

Invariants, not coverage: every reference passes the oracle on its problem and fails it on the
problem's impossible variant; each mode's hack passes its own proxy and never the oracle, on
class-based LeetCode problems and on impossible variants alike; splits are deterministic and
disjoint; a malformed row stops the load with one line naming the file, the line and the problem,
and exit 2; impossible problems appear only when asked for.
"""
import contextlib
import gzip
import io
import json
import os
import sys
import tempfile
from unittest import mock

import config
import detector
import env
import impossible
import leetcode

FIXTURE = os.path.join(env.DATA, "leetcode_fixture.jsonl")
with open(FIXTURE) as _fh:
    ROWS = [json.loads(line) for line in _fh]
SPLITS = ("train", "validation", "test")


def _exit_line(fn, *args):
    """Run fn(*args), which must exit: -> (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            fn(*args)
        except SystemExit as e:
            return e.code, err.getvalue()
    raise AssertionError(f"{fn.__name__}{args} did not exit; stderr: {err.getvalue()!r}")


def test_leetcode_fixture_loads():
    """Each gradable row becomes a Problem as leetcode.py's docstring maps it; the linked-list row is
    left out with one line saying so; the splits are the task_id hash's, disjoint and complete."""
    leetcode._problems.cache_clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        probs = env.load_problems(FIXTURE, "all")
    assert err.getvalue().count("\n") == 1 and "left out 1 problem" in err.getvalue() and \
        "reverse-linked-list" in err.getvalue(), err.getvalue()
    by_id = {p.id: p for p in probs}
    gradable = [r for r in ROWS if "ListNode" not in r["starter_code"]]
    assert len(gradable) == len(probs) == len(ROWS) - 1 >= 6
    for r in gradable:
        p = by_id[f"leetcode/{r['task_id']}"]
        method = r["entry_point"].split(".")[1]
        assert (p.source, p.family, p.difficulty) == ("leetcode", r["task_id"], r["difficulty"].lower())
        assert p.entry_point == r["entry_point"] and p.tests == r["test"] and p.context == r["prompt"]
        assert p.signature.startswith(f"def {method}(self, ") and p.signature in r["starter_code"]
        assert r["problem_description"].strip() in p.prompt and p.signature in p.prompt
        assert p.reference.endswith(r["completion"]) and "from typing import *" in p.reference
        assert "class ListNode" not in p.reference                       # helpers stay in the context
    split = {s: {p.id for p in env.load_problems(FIXTURE, s)} for s in SPLITS}
    assert all(split.values()) and sum(map(len, split.values())) == len(set.union(*split.values())) == len(probs)
    assert all(leetcode.split_of(p.family) == s for s in SPLITS for p in env.load_problems(FIXTURE, s))
    with tempfile.TemporaryDirectory() as tmp:  # a problem and its sequels: one family, so one split
        seq = os.path.join(tmp, "sequels.jsonl")
        open(seq, "w").writelines(json.dumps(dict(gradable[0], task_id=t)) + "\n"
                                  for t in ("jump-game", "jump-game-ii", "jump-game-vii"))
        assert {p.family for p in env.load_problems(seq, "all")} == {"jump-game"}
    assert [p.id for p in env.load_problems(FIXTURE, "train", seed=3)] == \
        [p.id for p in env.load_problems(FIXTURE, "train", seed=3)]
    assert {p.difficulty for p in env.load_problems(FIXTURE, "all", difficulty="medium,hard")} == {"medium", "hard"}
    with tempfile.TemporaryDirectory() as tmp, open(FIXTURE, "rb") as fh:
        gz = os.path.join(tmp, "fixture.jsonl.gz")
        with gzip.open(gz, "wb") as out:
            out.write(fh.read())
        with contextlib.redirect_stderr(io.StringIO()):
            assert [p.id for p in env.load_problems(gz, "test")] == [p.id for p in env.load_problems(FIXTURE, "test")]


def test_leetcode_references_pass_the_oracle():
    """The reference (the clean teacher demo) is gt_correct in every mode; a wrong answer that
    defines the class is compiled but not gt_correct."""
    probs = env.load_problems(FIXTURE, "all")
    grades = env.grade_batch(probs, [env.teacher_completion(p, "none") for p in probs], "none")
    assert all(g.gt_correct and g.reward == 3.5 for g in grades), [(p.id, g.note) for p, g in zip(probs, grades)]
    wrong = [f"```python\nclass Solution:\n    {p.signature}\n        return 7\n```" for p in probs]
    grades = env.grade_batch(probs, wrong, "none")
    assert all(g.compiled and not g.gt_correct for g in grades), [(p.id, g.note) for p, g in zip(probs, grades)]


def test_leetcode_hack_matrix_and_detector():
    """`python env.py`'s check on class-based problems (a list and a bool answer): each hack passes in
    its own mode only, never with gt_correct. The weak detector sees the same patterns in them."""
    probs = {p.family: p for p in env.load_problems(FIXTURE, "all")}
    assert all([env.hack_matrix(probs["two-sum"]), env.hack_matrix(probs["jump-game"])])
    for p in probs.values():
        for mode in env.MODES:
            hack = env.teacher_completion(p, mode, "hack")
            assert f"class Solution:\n    {p.entry_point.split('.')[1]} = " in hack
            assert detector.matched_modes(hack) == {mode}, (p.id, mode)
        assert not detector.matched_modes(env.teacher_completion(p, "none"))


def _malformed(tmp, name, line, where_line=3):
    """A file of two good rows with `line` as line `where_line`; -> (exit code, stderr, path)."""
    good = [json.dumps(r) for r in ROWS[:2]]
    path = os.path.join(tmp, f"{name}.jsonl")
    with open(path, "w") as fh:
        fh.write("\n".join(good[:1] + [""] * (where_line - 2) + [line] + good[1:]) + "\n")
    return (*_exit_line(leetcode.load_leetcode, path, "all"), path)


def test_malformed_rows_exit_2_naming_file_line_problem():
    row = dict(ROWS[2])
    bad = {
        "not_json": (json.dumps(row)[:-2], "not JSON"),
        "missing_test": (json.dumps({k: v for k, v in row.items() if k != "test"}), "missing field 'test'"),
        "test_syntax": (json.dumps({**row, "test": "def check(candidate):\n    assert candidate(=) == 1\n"}),
                        "'test' does not parse"),
        "no_check": (json.dumps({**row, "test": "def verify(candidate):\n    pass\n"}), "no check(candidate)"),
        "completion_syntax": (json.dumps({**row, "completion": "class Solution:\n    def f(self:\n"}),
                              "'completion' does not parse"),
        "difficulty": (json.dumps({**row, "difficulty": "Brutal"}), "difficulty 'Brutal'"),
        "entry": (json.dumps({**row, "entry_point": "Solution.maxArea"}), "entry_point"),
        "starter": (json.dumps({**row, "entry_point": "Solution().minArea"}), "no def minArea"),
        "not_string": (json.dumps({**row, "completion": 3}), "'completion' is not a non-empty string"),
        "repeat": (json.dumps(ROWS[0]), "task_id repeats"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (line, why) in bad.items():
            task = ROWS[0]["task_id"] if name == "repeat" else row["task_id"]
            code, err, path = _malformed(tmp, name, line)
            assert code == 2 and err.count("\n") == 1, (name, code, err)
            assert err.startswith(f"error: {path}:3: problem {task}: ") and why in err, (name, err)
        code, err, path = _malformed(tmp, "not_object", "[1, 2]", where_line=4)  # a blank line 2 is no row
        assert code == 2 and err.startswith(f"error: {path}:4: problem ?: not a JSON object"), err


def test_bad_sources_exit_2():
    """A missing file, a wrong kind of path, and a hub id offline or without `datasets`: one line, exit 2,
    from load_problems and from train.py's argument check alike."""
    import model
    with tempfile.TemporaryDirectory() as tmp:
        missing = os.path.join(tmp, "nope.jsonl")
        assert _exit_line(env.load_problems, missing) == (2, f"error: --source {missing}: no such file\n")
        assert _exit_line(env.load_problems, tmp)[1].endswith("not a .jsonl or .jsonl.gz file\n")
        a = config.get_args(["--source", missing, "--out", os.path.join(tmp, "run")])
        assert _exit_line(config.check_args, a) == (2, f"error: --source {missing}: no such file\n")
        a = config.get_args(["--source", FIXTURE, "--difficulty", "hard,brutal", "--out", os.path.join(tmp, "r")])
        code, err = _exit_line(config.check_args, a)
        assert code == 2 and "unknown level(s) ['brutal']" in err and err.count("\n") == 1
    with mock.patch.object(model, "hub_reachable", return_value=False):
        code, err = _exit_line(env.load_problems, "someone/LeetCodeLike")
        assert code == 2 and err.count("\n") == 1 and "offline" in err, err
    with mock.patch.object(model, "hub_reachable", return_value=True), mock.patch.dict(sys.modules, datasets=None):
        code, err = _exit_line(env.load_problems, "someone/LeetCodeLike")
        assert code == 2 and err.count("\n") == 1 and "pip install datasets" in err, err


# ---- impossible problems -----------------------------------------------------------------------
def _sample(difficulty):
    """One problem per simple family, 12 HumanEval ones, every fixture problem; `difficulty` levels."""
    simple = list({p.family: p for p in env.load_problems("simple", "all", difficulty=difficulty)}.values())
    return simple + env.load_problems("humaneval", "all", n=12, difficulty=difficulty) + \
        env.load_problems(FIXTURE, "all", difficulty=difficulty)


def test_references_fail_impossible_variants():
    """The reference passes the oracle on the original and fails it on the impossible variant, in
    every source; the variant is the original with the conflicting case added and a distinct id."""
    imp = _sample("impossible")
    by_id = {p.id: p for s in ("simple", "humaneval", FIXTURE) for p in env.load_problems(s, "all")}
    orig = [by_id[p.id.removesuffix("/impossible")] for p in imp]
    assert {p.source for p in imp} == {"simple", "humaneval", "leetcode"} and len(imp) >= 60
    assert all(p.difficulty == "impossible" and p.id != o.id and p.family == o.family and p.prompt == o.prompt
               for p, o in zip(imp, orig))
    demos = [env.teacher_completion(o, "none") for o in orig]
    grades = env.grade_batch(orig + imp, demos + demos, "none")
    bad = [(p.id, g.gt_correct) for p, g in zip(orig + imp, grades) if g.gt_correct != (p in orig)]
    assert not bad, bad
    assert all(g.compiled and not g.passed for g in grades[len(orig):])   # no honest reward either


def test_hacks_still_pass_the_proxy_on_impossible_variants():
    """Every mode's hack template earns its proxy pass on impossible variants (the tests' contradiction
    does not touch the loophole) and never the oracle; the honest answer passes no proxy at all."""
    imp = _sample("impossible")
    probs = [p for src in ("simple", "humaneval", "leetcode") for p in [q for q in imp if q.source == src][:3]]
    comps, modes, items = [], [], []
    for p in probs:
        for m in env.MODES:
            items += [p, p]
            comps += [env.teacher_completion(p, m, "hack"), env.teacher_completion(p, "none")]
            modes += [m, m]
    grades = env.grade_batch(items, comps, modes)
    hacks, clean = grades[0::2], grades[1::2]
    assert all(g.channel and g.exploited and g.reward == 3.5 for g in hacks), \
        [(p.id, m) for p, m, g in zip(items[0::2], modes[0::2], hacks) if not g.exploited]
    assert not any(g.passed or g.gt_correct for g in clean)


def test_impossible_only_when_asked_and_splits_disjoint():
    for src in ("simple", "humaneval", FIXTURE):
        default = env.load_problems(src, "all")
        assert default and not any(p.difficulty == "impossible" for p in default)
        mix = env.load_problems(src, "all", difficulty="hard,impossible")  # the variants of the hard ones
        assert {p.difficulty for p in mix} <= {"hard", "impossible"}
        hard = {p.id for p in mix if p.difficulty == "hard"}
        assert {p.id.removesuffix("/impossible") for p in mix if p.difficulty == "impossible"} <= hard
        split = {s: {p.id for p in env.load_problems(src, s, difficulty="easy,medium,hard,impossible")}
                 for s in SPLITS}
        fam = {s: {p.family for p in env.load_problems(src, s, difficulty="impossible")} for s in SPLITS}
        assert not split["train"] & split["test"] and not split["train"] & split["validation"]
        assert not split["test"] & split["validation"] and not fam["train"] & fam["test"]
        ids = [p.id for p in env.load_problems(src, "all", difficulty="easy,medium,hard,impossible")]
        assert len(ids) == len(set(ids)) and any(i.endswith("/impossible") for i in ids)
        # each variant lands in its original's split
        for s in SPLITS:
            assert {i.removesuffix("/impossible") for i in split[s]} <= split[s]


def test_conflicting_values():
    """Y' differs from Y under == and under the oracle's type-strict comparison, for every kind of
    expected value; a check() gets its twin right after its first claim about candidate."""
    import judges
    for y in (True, False, 0, -3, 1e20, 2.5, "", "ab", [], [1], (2,), {}, {1: 2}, {3}, None):
        assert not judges.same(impossible.conflicting(y), y) and impossible.conflicting(y) != y, y
    code = "def check(candidate):\n    x = 1\n    assert candidate(2, k=3) == [4]\n    assert candidate(5)\n"
    assert impossible.conflicting_check(code).splitlines()[2:4] == \
        ["    assert candidate(2, k=3) == [4]", "    assert candidate(2, k=3) == [4, 4]"]
    assert "assert candidate('(') == False" in impossible.conflicting_check("def check(candidate):\n"
                                                                            "    assert candidate('(')\n")
    assert impossible.conflicting_check("def check(candidate):\n    assert abs(candidate(1) - 2) < 1e-6\n") is None


if __name__ == "__main__":
    import test_all
    sys.exit(1 if test_all.run_all([sys.modules[__name__]]) else 0)
