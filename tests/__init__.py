"""The test suite. A regular package, so that `from tests import helpers` finds this directory
before any other `tests` package on the path (robustbench's wheel installs one)."""
