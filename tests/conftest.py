"""Shared test setup: hypothesis defaults. Shared helpers live in tests/strategies.py
(hypothesis strategies) and tests/helpers.py (checks used by several files); `tests` is a
package, so test files import them as `tests.strategies` and `tests.helpers`.

Every test file picks its own `max_examples`; the profile only fixes what all
of them share (no per-example deadline: the first example pays for imports and
torch warm-up). For a longer run, `PG_TEST_SCALE=10` multiplies every test's
example count (see `strategies.scaled`).
"""
import os

from hypothesis import HealthCheck, settings


settings.register_profile("patterngen", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "patterngen"))
