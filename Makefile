# The two commands a user needs: `make train` and `make test`. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; override (e.g. TORCH_SPEC="torch>=2.1") where another build is wanted.
TORCH_SPEC ?= torch==2.13.0
FASHION_DIR ?= /usr/share/datasets/fashion-mnist
TRAIN_ARGS ?= --model seed_cnn --dataset fashion-mnist --epochs 10 --batch-size 32 --lr 1e-3
PYTEST_ARGS ?=

.PHONY: setup data train test bench clean

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

bench: setup data
	$(BIN)/python benchmarks/train_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
