"""Tools that sit above the library: the `patterngen` command line, spec files, the checks
behind `patterngen run`, terminal pictures and the benchmark.

They use the library only through its modules' public names; nothing in the library imports
them, so the compiler can be read, installed and tested without them.
"""
