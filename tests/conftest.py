"""Shared test setup: hypothesis defaults. Shared helpers live in tests/strategies.py
(hypothesis strategies) and tests/helpers.py (checks used by several files); `tests` is a
package, so test files import them as `tests.strategies` and `tests.helpers`.

Every test file picks its own `max_examples`; the profile only fixes what all
of them share (no per-example deadline: the first example pays for imports and
torch warm-up). For a longer run, `PG_TEST_SCALE=10` multiplies every test's
example count (see `strategies.scaled`).
"""
import os

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    # Kernel tests run in the Triton interpreter, which triton reads once, at its import: set it
    # before any test module (or a library it imports, such as transformers) imports triton, so
    # that any subset of the files runs as the whole suite does. A GPU run leaves it unset.
    os.environ.setdefault("TRITON_INTERPRET", "1")


settings.register_profile("patterngen", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "patterngen"))
