"""knowbench: a benchmark harness for knowledge editing."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout, `knowbench/` on sys.path (e.g. `python -m pytest` from the repo root) shadows
# the installed package, whose knowbench.tasks / knowbench.editors are mapped from ../tasks and
# ../editors by setuptools. Let the checkout resolve them the same way.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "tasks" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]
del _Path, _root
