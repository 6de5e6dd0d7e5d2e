# Install, run, test and GPU-check patterngen. `make run` and `make test` install what they need
# first (once per interpreter: a stamp in .make/ remembers it until pyproject.toml or this file
# changes). PYTHON may point at another interpreter: make test PYTHON=python3.12
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# one stamp per interpreter environment, so a new venv installs again
ENV_ID := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])")
STAMP = .make/installed-$(ENV_ID)
GPU_OUT ?= gpu-results

.PHONY: install test run gpu-check

# torch first and pinned (an unpinned torch pulls several GB of CUDA packages); then the package
# without build isolation, so pip reuses that torch. numpy: torch warns without it and triton's
# interpreter imports it without declaring it. transformers without its declared dependencies:
# only what importing a Llama model needs (the integration tests).
$(STAMP): pyproject.toml Makefile
	$(PIP) install torch==2.13.0
	$(PIP) install "setuptools>=68" wheel triton==3.9.0 numpy
	$(PIP) install --no-build-isolation -e ".[test]"
	$(PIP) install --no-deps --no-build-isolation natten==0.21.7
	$(PIP) install --no-deps transformers==5.23.0 huggingface-hub==2.4.0 safetensors==0.8.0 tqdm==4.70.1 \
		httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 truststore==0.10.5 idna==3.13 pyyaml==6.0.3 \
		regex==2026.5.9 packaging
	$(PYTHON) -c "import torch, triton, numpy, patterngen; print('installed: torch', torch.__version__, 'triton', triton.__version__)"
	mkdir -p .make && touch $@

install:
	rm -f $(STAMP)
	$(MAKE) $(STAMP) PYTHON=$(PYTHON)

test: $(STAMP)
	$(PYTHON) -m pytest -q

run: $(STAMP)
	$(PYTHON) -m patterngen.tools.cli run

# On a lent GPU machine (torch, triton, jinja2 and sympy preinstalled; no network): install
# the project without touching those, run the GPU tests, a quick benchmark against
# FlexAttention and SDPA, the serving benchmark (`bench --serving`: packed documents, bounded
# caches, ragged split-KV decode against FlexAttention) and the changing-lengths benchmark
# (`bench --lengths`: Hugging Face decode, new lengths), and leave everything in $(GPU_OUT)/.
# Each step has a time limit and a failing step does not stop the next one; the limits add up
# to 9.5 minutes, inside one 10-minute call of a lease.
GPU_TEST_LIMIT ?= 170
GPU_BENCH_LIMIT ?= 220
GPU_SERVING_LIMIT ?= 100
GPU_LENGTHS_LIMIT ?= 70
gpu-check:
	mkdir -p $(GPU_OUT)
	$(PIP) install --no-build-isolation --no-deps -e . > $(GPU_OUT)/install.log 2>&1
	$(PYTHON) -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
		| tee $(GPU_OUT)/versions.txt
	-if $(PYTHON) -c "import pytest" 2>/dev/null; then \
		PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 timeout $(GPU_TEST_LIMIT) $(PYTHON) -m pytest -q --durations=8 -m gpu tests/test_gpu.py; \
		else PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 timeout $(GPU_TEST_LIMIT) $(PYTHON) tests/test_gpu.py; fi 2>&1 \
		| tee $(GPU_OUT)/tests.txt
	-PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 timeout $(GPU_BENCH_LIMIT) $(PYTHON) -m patterngen.tools.cli bench --quick \
		--out $(GPU_OUT)/bench $(BENCH_ARGS) 2>&1 | tee $(GPU_OUT)/bench.txt
	-PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 timeout $(GPU_SERVING_LIMIT) $(PYTHON) -m patterngen.tools.cli bench --serving \
		--out $(GPU_OUT)/serving 2>&1 | tee $(GPU_OUT)/serving.txt
	-PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 timeout $(GPU_LENGTHS_LIMIT) $(PYTHON) -m patterngen.tools.cli bench --lengths \
		--tokens 100 --out $(GPU_OUT)/lengths 2>&1 | tee $(GPU_OUT)/lengths.txt
