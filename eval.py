"""
Deploy evaluation (DESIGN.md §10, issue 6): base vs trained vs deployed (quarantine ablated) on
held-out problems per mode, relearn probe, over-suppression, detector sweep, export.

Not written yet: the functions below raise NotImplementedError naming their topic.
"""
import sys


def evaluate(ckpt_dir):
    raise NotImplementedError("deploy evaluation (issue 6: eval.py)")


if __name__ == "__main__":
    print("error: eval.py is not written yet (issue 6: deploy evaluation)", file=sys.stderr)
    sys.exit(2)
