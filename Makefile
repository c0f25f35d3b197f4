# Quick start: `make demo` (set up, pull the default model, serve it) and `make test` (set up, run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
# A CPU build of torch where there is no GPU; pip takes this exact release from local disk here.
TORCH_CPU ?= torch==2.13.0
MODEL ?= smollm2-135m-instruct

.PHONY: setup kernels model demo test test-deps bench r1-zero r1 r1-tools nano-r1 clean

# The web chat's front-end libraries (marked, DOMPurify, highlight.js, KaTeX) come from the npm registry at
# install time, pinned by web/package-lock.json, and are served from the package: never from a CDN.
VENDOR := sputnik/web/static/vendor/.built

setup: $(VENV)/.installed $(VENDOR)

$(VENDOR): web/package.json web/package-lock.json web/vendor.mjs
	@command -v npm >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q nodejs npm; }
	npm ci --prefix web --no-audit --no-fund --loglevel=error
	node web/vendor.mjs
	touch $@

# Debian packages the tests use: Chromium for the browser tests, PostgreSQL's server for the storage tests (the
# tests start a throwaway cluster on a free loopback port and stop it).
test-deps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q chromium; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q postgresql; }

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

# The CPU kernels for block-format weights (sputnik/kernels: the GGUF's blocks as they are, the native decode step),
# compiled here by g++ from Debian's packages so that the first chat or server start does not wait for them. Where
# they cannot be built the model still runs, dequantized (slower, larger): the demo goes on, the tests fail.
kernels: setup
	@command -v g++ >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q g++; } || true
	$(PY) -m sputnik.kernels || echo "continuing without the kernels: block-format weights will be dequantized"

model: kernels
	$(VENV)/bin/sputnik pull $(MODEL)

test: model test-deps
	PYTHONUNBUFFERED=1 SPUTNIK_REQUIRE_MODEL=1 SPUTNIK_REQUIRE_KERNELS=1 SPUTNIK_REQUIRE_PG=1 SPUTNIK_REQUIRE_BROWSER=1 $(PY) -m pytest -q

# The DeepSeek/OpenAI-compatible API on loopback (no keys needed there); Ctrl-C stops it.
PORT ?= 8000
demo: model
	@echo "serving $(MODEL) on http://127.0.0.1:$(PORT)/v1 — try:"
	@echo "  curl -s http://127.0.0.1:$(PORT)/v1/chat/completions -H 'content-type: application/json' \\"
	@echo "    -d '{\"model\": \"$(MODEL)\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 17 + 25?\"}]}'"
	$(VENV)/bin/sputnik serve --model $(MODEL) --served-name $(MODEL) --port $(PORT) --no-auth

bench: model
	$(PIP) install -e '.[bench]' || $(PIP) install -e '.[test]'
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/grpo_step.py
	$(PY) benchmarks/serve_load.py
	$(PY) benchmarks/train_mfu.py

# The reasoning recipes, each reported as the R1 paper does into docs/reasoning.json (docs/reasoning.md): GRPO with
# thinking, the same model with its thinking closed, and the direct-answer control of the same budget.
# R1-Zero: SmolLM2-135M-Instruct straight to GRPO on format + accuracy (strict grading).
r1-zero: model
	$(VENV)/bin/sputnik recipe --config recipes/r1-zero.yaml --report docs/reasoning.json
	cp runs/r1-zero/think/metrics.png docs/r1-zero.png

# R1: cold-start SFT on programmatic traces (English and Korean), then GRPO with language consistency.
r1: model
	$(VENV)/bin/sputnik recipe --config recipes/r1.yaml --report docs/reasoning.json
	cp runs/r1/think/metrics.png docs/r1.png

# Agentic GRPO: SmolLM2-135M-Instruct learns to call the calculator (docs/agentic.md).
r1-tools: model
	$(VENV)/bin/sputnik recipe --config recipes/r1-tools.yaml --report docs/agentic.json
	cp runs/r1-tools/tools/metrics.png docs/r1-tools.png

# The whole R1 recipe from nothing on a CPU: tokenizer -> pretrain (MLA + MoE + MTP) -> cold-start SFT -> GRPO, and
# the direct-answer control from the same pretrained model; held-out figures in docs/nano-r1.json, docs/reasoning.json.
nano-r1: setup
	$(VENV)/bin/sputnik nano-r1 --out-dir runs/nano-r1 --report docs/reasoning.json
	mkdir -p docs
	cp runs/nano-r1/nano-r1.json docs/nano-r1.json
	for s in pretrain sft grpo grpo-direct; do cp runs/nano-r1/$$s.png docs/nano-r1-$$s.png; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache web/node_modules sputnik/web/static/vendor
