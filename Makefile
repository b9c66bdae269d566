# cellrl: two commands. `make demo` runs the pipeline on built-in demo data; `make test` runs the tests.
# Both create the pinned virtual environment (.venv) first when it is missing.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= all
STAMP  := $(VENV)/.cellrl-installed

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# Install order from design.md section 5: numpy + build tools, velocyto without build isolation,
# then everything else under constraints.txt (pinned versions of the whole working set).
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt "numpy==1.26.4" cython "setuptools<80" wheel
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation velocyto==0.17.17
	$(BIN)/pip install -q -c constraints.txt --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES)

test: $(STAMP)
	$(BIN)/python -m pytest -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow"

lint: $(STAMP)
	$(BIN)/snakemake --lint

bench: $(STAMP)
	$(BIN)/python benchmarks/transitions.py
	$(BIN)/python benchmarks/env_throughput.py

clean:
	rm -rf results resources/demo .snakemake
