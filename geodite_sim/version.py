"""The package version (one place: pyproject.toml's ``version`` equals it, tests/project/test_packaging.py)."""

__version__ = "0.1.0"
