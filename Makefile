# Two commands do all the set-up on a fresh machine:
#   make demo   relax the example structures with the packaged default model
#   make test   run the test suite (default CI target)
# Both create .venv with Python 3.12 (PATH or pyenv) and install the package if needed.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# pytest-xdist workers for `make test` / `make test-slow`: one per core, at most 4 (each worker runs one thread).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
# the fast target sends whole files to a worker (module fixtures, e.g. test_ray's cluster, start once); the slow
# target's 24 tests differ 10x in length, so idle workers steal queued tests (worksteal balances them)
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadfile
PYTEST_PARALLEL_SLOW := -n $(TEST_WORKERS) --dist worksteal

PYTHON312 := $(shell \
	if python3.12 --version >/dev/null 2>&1; then command -v python3.12; \
	else ls -d "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1; fi)

.PHONY: venv test test-slow test-all lint demo bench clean-venv

# ruff (style, complexity, argument counts) and a lenient type check ([tool.mypy] in pyproject.toml)
lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
		if [ -z "$(PYTHON312)" ]; then echo "error: python3.12 not found on PATH or in pyenv's versions folder" >&2; exit 1; fi; \
		echo "creating $(VENV) with $(PYTHON312)"; \
		"$(PYTHON312)" -m venv $(VENV); \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

test: venv
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -m "not slow" -q $(PYTEST_PARALLEL)

test-slow: venv
	@$(PY) -m pytest -m "slow" -q $(PYTEST_PARALLEL_SLOW); rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests selected"; exit 0; fi; exit $$rc

test-all: venv
	$(PY) -m pytest -q

demo: venv
	$(VENV)/bin/geodite-sim demo

bench: venv
	$(PY) benchmarks/neighbors.py --quick
	$(PY) benchmarks/relax_throughput.py --quick
	$(PY) benchmarks/md_throughput.py --quick

clean-venv:
	rm -rf $(VENV)
