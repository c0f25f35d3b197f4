# Quick start: `make demo` (set up, pull the default model, chat) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
# A CPU build of torch where there is no GPU; pip takes this exact release from local disk here.
TORCH_CPU ?= torch==2.13.0
MODEL ?= smollm2-135m-instruct

.PHONY: setup model demo test bench r1-zero clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch with CUDA"; $(PIP) install 'torch>=2.4,<3'; \
	else \
		$(PIP) install $(TORCH_CPU) || $(PIP) install --index-url https://download.pytorch.org/whl/cpu torch; \
	fi
	$(PIP) install -e '.[test]'
	touch $@

model: setup
	$(VENV)/bin/sputnik pull $(MODEL)

test: model
	SPUTNIK_REQUIRE_MODEL=1 $(PY) -m pytest -q

demo: model
	$(VENV)/bin/sputnik chat --model $(MODEL)

bench: model
	$(PIP) install -e '.[bench]' || $(PIP) install -e '.[test]'
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/grpo_step.py

# R1-Zero on a CPU: GRPO on 2-digit addition, greedy accuracy on 200 held-out problems before and after.
r1-zero: model
	$(VENV)/bin/sputnik train grpo --config recipes/r1-zero-smollm2-addition.yaml
	mkdir -p docs
	cp runs/r1-zero-smollm2-addition/summary.json docs/r1-zero.json
	cp runs/r1-zero-smollm2-addition/metrics.png docs/r1-zero.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
