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

test:
	$(PYTHON) -m pytest -q

run:
	$(PYTHON) -m patterngen.cli run
