"""Jinja sources of generated kernels (package data)."""
