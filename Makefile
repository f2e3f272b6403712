# Two commands do all the set-up on a fresh machine: `make report` and `make test`.
# torch is pinned to the CPU build this workplace keeps on disk; override with TORCH_SPEC=...
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
MODEL ?= resnet18
ARGS ?= --stem cifar --batch 64 --input 3x32x32 --optimizer adam --measure
BIN := $(VENV)/bin

.PHONY: setup report test test-zoo test-models fuzz bench-policies clean

# The `models` extra (torchvision, timm, transformers for tests/test_foreign_models.py) is pinned to
# releases that accept torch 2.13.0; TORCH_SPEC goes into the same resolve, so that pip fails rather
# than replace the installed torch if an extra ever asked for another one.
$(BIN)/memfit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,models]" "$(TORCH_SPEC)"
	touch $@

setup: $(BIN)/memfit

report: setup
	$(BIN)/memfit report $(MODEL) $(ARGS)

# Lint and type-check first (seconds), so that a finding fails CI before the tests run.
test: setup
	$(BIN)/ruff check memfit tests examples benchmarks
	$(BIN)/ruff format --check memfit tests examples benchmarks
	$(BIN)/mypy memfit
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=15

# The planner's correctness matrix over the rest of the zoo (CI runs one model per family) and the
# cost model on the deeper family members, and the tradeoff curve of the CNN beyond CI's: ~35 min.
test-zoo: setup
	MEMFIT_ZOO=1 $(BIN)/python -m pytest -q -n 2 --durations=15 tests/test_planner.py tests/test_costmodel.py tests/test_tradeoff.py -m zoo

# The foreign-model conformance matrix (torchvision, timm, transformers; CI runs a subset): ~8 min.
test-models: setup
	MEMFIT_MODELS=all $(BIN)/python -m pytest -q -n 2 --durations=15 tests/test_foreign_models.py

# Property-based tests over N random networks and budgets (tests/test_fuzz.py; CI runs 5 of each,
# fixed). SEED=<int> draws another sequence than the fixed one. About 6 s a network on one core.
N ?= 2000
SEED ?=
fuzz: setup
	MEMFIT_FUZZ_N=$(N) MEMFIT_FUZZ_SEED=$(SEED) $(BIN)/python -m pytest -q -n 2 -p no:logging --durations=5 tests/test_fuzz.py

# memfit against hand-written torch.utils.checkpoint policies at equal budgets (docs/benchmarks.md).
bench-policies: setup
	$(BIN)/python benchmarks/policies.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
