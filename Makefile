# make demo   set up .venv if needed, then run every layout on 2 local CPU ranks and print a table
# make test   set up .venv if needed, then run the test suite
# make bench  the core benchmark (README's numbers)

VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build of torch; on this kind of machine pip finds it on local disk.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) -c "from striped_attention.kernels import build_cpu_extension; build_cpu_extension()"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/striped-attention demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
