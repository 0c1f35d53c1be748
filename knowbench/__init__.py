"""knowbench: a benchmark harness for knowledge editing."""

__version__ = "0.1.0"
