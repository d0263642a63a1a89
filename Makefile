# `make demo` runs the main job on the embedded demo; `make test` runs the test suite.
# Both create .venv from scratch when it is missing (torch first, pinned by constraints.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LLAMACPP_STAMP := $(VENV)/.llamacpp-installed
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1

.PHONY: demo test test-slow install install-llamacpp bench bench-search bench-behaviour clean lock readme-figures

install: $(STAMP)

# Exactly the versions in requirements.lock (hashes checked; torch is the 2.13.0 CPU build), then mergelib itself,
# its bytecode and its compiled kernels.
$(STAMP): pyproject.toml constraints.txt requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m compileall -q mergelib stages >/dev/null  # bytecode, as a wheel install has (PYTHONDONTWRITEBYTECODE may be set)
	$(BIN)/mergelib warm-kernels  # numba's on-disk cache filled here, so no merge compiles a kernel
	touch $(STAMP)

# The llamacpp extra (llama.cpp compiled from llama-cpp-python's sdist, about 20 CPU-minutes, once): K-quant GGUF
# exports and the llama.cpp check of every GGUF. `make demo` needs it; `make test` does not (those tests skip).
install-llamacpp: $(LLAMACPP_STAMP)

$(LLAMACPP_STAMP): $(STAMP) requirements-llamacpp.lock
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements-llamacpp.lock
	touch $(LLAMACPP_STAMP)

# Re-resolve requirements.lock, and requirements-llamacpp.lock on top of it, after changing pyproject.toml or
# constraints.txt (pip-tools in its own venv).
lock:
	test -x .lockenv/bin/pip-compile || { $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install -q pip-tools==7.6.2; }
	PATH="$(CURDIR)/.lockenv/bin:$$PATH" .lockenv/bin/python tools/lock.py

# The pipeline on the trained demo family (fetch trains it once, about 3 CPU-minutes; DVC caches it): `dvc repro`
# (git and DVC initialised first where missing, e.g. in an unpacked archive), then a table of what each stage
# produced and every task's score for the base, the fine-tunes and the merge. Stage commands find `python` on PATH:
# the venv's. Other configurations: `dvc exp run -S method=ties -S density=0.5`, or edit conf/ and run
# `python -m mergelib.config.compose` before `make demo`.
demo: $(STAMP) $(LLAMACPP_STAMP)
	@test -d .git || git init -q
	@test -f .dvc/config || { $(BIN)/dvc init -q && $(BIN)/dvc config hydra.enabled true; }
	@start=$$(date +%s); export PATH="$(CURDIR)/$(BIN):$$PATH"; \
	  $(BIN)/dvc repro && $(BIN)/python -m stages.summary --repro-seconds $$(( $$(date +%s) - start ))

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

test-slow: $(STAMP) $(LLAMACPP_STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/merge_bench.py

# Recipe-search throughput (serial vs 2 Ray workers) and the 3-seed demo goal; needs the demo family (make demo).
bench-search: $(STAMP)
	$(BIN)/python benchmarks/search_bench.py

# Every merge method on fine-tuned digits MLPs (Tier A, 3 seeds, minutes): reports/behaviour.json and .png; then
# `python tools/readme_figures.py --record behaviour`. Tier B (the demo LM family, needs `make demo`): TIER=b.
TIER ?= a
bench-behaviour: $(STAMP)
	$(BIN)/python -m benchmarks.behaviour.run --tier $(TIER)

# The README's measured tables from docs/figures/*.json (record new ones with `tools/readme_figures.py --record
# demo` after `make demo`, `--record sweep` after `python -m stages.sweep`), and its file map from the docstrings.
readme-figures: $(STAMP)
	$(BIN)/python tools/readme_figures.py
	$(BIN)/python tools/file_map.py

clean:
	rm -rf out bench-cache .pytest_cache
