"""Turn the repository into coursework: blank a function's body, keep its signature and docstring.

    python tests/blank.py reward.iou grpo.advantages    # blank these two, in place
    python tests/blank.py --exercise 4                  # blank exercise 4's functions
    python tests/blank.py --verify                      # each check passes, then fails blanked

A blanked function raises NotImplementedError naming itself and its exercise, so the check that
grades it fails with that line, not a traceback deep in the code. An instructor forks the
repository, runs `python tests/blank.py --exercise N` for the exercises of the assignment and
commits; a student fills the bodies in until the exercise's check passes. `git diff` (or
`git checkout -- FILE`) shows or restores the reference solution.
"""
import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# number: (what the student writes, the functions blanked, the check that grades it)
EXERCISES = {
    1: ("IoU of two boxes", ["reward.iou"],
        "pytest tests/test_reward.py -k 'iou or grounding or matching'"),
    2: ("the one-to-one box matching with the largest total IoU", ["reward.match_boxes"],
        "pytest tests/test_reward.py -k 'matching or grounding'"),
    3: ("the paper's grounding reward and the dense IoU", ["reward.box_rewards"],
        "pytest tests/test_reward.py -k 'grounding or total'"),
    4: ("group-relative advantages", ["grpo.advantages"],
        "pytest tests/test_grpo.py -k 'advantages or equal_rewards or ties'"),
    5: ("the clipped per-token objective with the k3 KL", ["grpo.per_token_loss"],
        "pytest tests/test_grpo.py -k 'clipping or k3 or ratio_one'"),
    6: ("the three loss aggregations", ["grpo.aggregate", "grpo.loss_denominator"],
        "pytest tests/test_grpo.py -k 'aggregations or dropped or micro_batched'"),
    7: ("span credit: box rewards to the digits, text rewards to the rest",
        ["credit.span_advantages"], "pytest tests/test_grpo.py -k span_credit"),
    8: ("the SFT loss mask: the response and its end token, nothing else", ["sft.sft_batch"],
        "pytest tests/test_sft.py -k 'loss_mask or accumulation'"),
}


def blank(path, name, exercise=None):
    """Replace the body of function `name` (top level, or Class.method) in file `path` by a
    NotImplementedError, keeping its signature and docstring. Returns True if it found it."""
    source = open(path).read()
    lines = source.split("\n")
    scope = ast.parse(source).body
    for part in name.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return False
        scope = node.body
    body = node.body
    has_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
               and isinstance(body[0].value.value, str))
    first = body[1] if has_doc and len(body) > 1 else (None if has_doc else body[0])
    indent = " " * body[0].col_offset
    module = os.path.splitext(os.path.basename(path))[0]
    where = f" (exercise {exercise}, README: Coursework)" if exercise else ""
    stub = f'{indent}raise NotImplementedError("write {module}.{name}{where}")'
    start = first.lineno - 1 if first is not None else body[0].end_lineno
    lines[start:node.end_lineno] = [stub]
    open(path, "w").write("\n".join(lines))
    return True


def blank_all(root, names, exercise=None):
    for target in names:
        module, name = target.split(".", 1)
        path = os.path.join(root, module + ".py")
        if not os.path.exists(path) or not blank(path, name, exercise):
            raise SystemExit(f"tests/blank.py: no function {target} (file {path})")


def verify():
    """Each exercise's check, on a copy of the repository: passes as shipped, fails blanked."""
    ok = True
    for n, (what, names, check) in EXERCISES.items():
        results = []
        for blanked in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                copy = os.path.join(tmp, "repo")
                shutil.copytree(HERE, copy, ignore=shutil.ignore_patterns(
                    ".git", "runs", "__pycache__", ".pytest_cache", "*.png", "*.html"))
                if blanked:
                    blank_all(copy, names, n)
                run = subprocess.run(f"{sys.executable} -m {check} -q -p no:cacheprovider",
                                     shell=True, cwd=copy, capture_output=True, text=True)
                said = [x for x in run.stdout.splitlines() if "NotImplementedError: write" in x]
                results.append((run.returncode, said[0].strip() if said else ""))
        (rc_ref, _), (rc_blank, message) = results
        good = rc_ref == 0 and rc_blank != 0 and message
        ok &= bool(good)
        print(f"exercise {n} ({', '.join(names)}): reference {'passes' if rc_ref == 0 else 'FAILS'}"
              f", blanked {'fails: ' + message if rc_blank and message else 'DOES NOT FAIL'}")
    return ok


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    ap.add_argument("functions", nargs="*", help="module.function (or module.Class.method)")
    ap.add_argument("--exercise", type=int, action="append", default=[],
                    help="blank this exercise's functions (repeatable)")
    ap.add_argument("--verify", action="store_true",
                    help="check every exercise on a temporary copy: passes, then fails blanked")
    a = ap.parse_args()
    if a.verify:
        sys.exit(0 if verify() else 1)
    for n in a.exercise:
        if n not in EXERCISES:
            raise SystemExit(f"--exercise {n}: the exercises are {sorted(EXERCISES)}")
        blank_all(HERE, EXERCISES[n][1], n)
    blank_all(HERE, a.functions)
    print("blanked:", ", ".join(a.functions + [f for n in a.exercise for f in EXERCISES[n][1]]))
