# The two commands a user needs: `make train` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; override (e.g. TORCH_SPEC="torch>=2.1") where another build is wanted.
TORCH_SPEC ?= torch==2.13.0
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
TRAIN_ARGS ?= --model seed_cnn --dataset fashion-mnist --epochs 10 --batch-size 32 --lr 1e-3
PYTEST_ARGS ?=

.PHONY: setup data train test test-fallback bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

data:
	@bash scripts/ensure-fashion-mnist.sh "$(FASHION_DIR)"

train: setup data
	$(BIN)/convdescent train $(TRAIN_ARGS)

test: setup data
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The layer and training tests once more with every native kernel and fused path switched off, so the
# fallbacks (the reference paths) stay right on machines without a compiler. .ci/run runs it after `test`.
FALLBACK_TESTS ?= tests/test_layers*.py tests/test_model.py tests/test_execution.py tests/test_train_*.py
test-fallback: setup data
	CONVDESCENT_NATIVE=0 CONVDESCENT_FUSED=0 CONVDESCENT_FUSION=0 $(BIN)/python -m pytest -q $(PYTEST_ARGS) $(FALLBACK_TESTS)

bench: setup data
	$(BIN)/python benchmarks/train_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
