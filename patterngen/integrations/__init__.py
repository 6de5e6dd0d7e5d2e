"""Adapters that plug patterngen into other libraries (imported on demand, so that
patterngen itself never needs them)."""
