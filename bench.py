"""
Where a GRPO step's time and memory go, per phase and per router (DESIGN.md §2, issue 7).

Not written yet: the functions below raise NotImplementedError naming their topic.
"""
import sys


def bench_step(model_name, router):
    raise NotImplementedError("per-phase step benchmark (issue 7: bench.py)")


if __name__ == "__main__":
    print("error: bench.py is not written yet (issue 7: benchmark)", file=sys.stderr)
    sys.exit(2)
