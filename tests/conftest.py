"""Shared test setup: makes tests/strategies.py importable and sets hypothesis defaults.

Every test file picks its own `max_examples`; the profile only fixes what all
of them share (no per-example deadline: the first example pays for imports and
torch warm-up). For a longer run, `PG_TEST_SCALE=10` multiplies every test's
example count (see `strategies.scaled`).
"""
import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile("patterngen", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "patterngen"))
