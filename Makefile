# Install, test and run patterngen. PYTHON may point at another interpreter: make test PYTHON=python3.12
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install test run

# torch first and pinned (an unpinned torch pulls several GB of CUDA packages);
# then the package without build isolation, so pip reuses that torch.
install:
	$(PIP) install torch==2.13.0
	$(PIP) install triton==3.9.0 numpy  # triton needs numpy to import, undeclared
	$(PIP) install --no-build-isolation -e .[test]
	$(PIP) install --no-deps --no-build-isolation natten==0.21.7
	$(PIP) install --no-deps transformers==5.23.0 huggingface-hub==2.4.0 safetensors==0.8.0 tqdm==4.70.1 httpx2==2.16.2 httpcore2==2.16.2 h11==0.16.0 truststore==0.10.5 idna==3.13 pyyaml==6.0.3 regex==2026.5.9 packaging  # transformers, only what a Llama model needs

test:
	$(PYTHON) -m pytest -q

run:
	$(PYTHON) -m patterngen.cli run
