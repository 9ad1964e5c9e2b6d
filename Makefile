# fusedformer: the two commands (make demo, make test), plus make bench and make gpu-check.
# Each target sets itself up: a ./.venv with the pinned requirements and an editable install
# that builds fusedformer._C (the CUDA sources too when torch has CUDA and nvcc is found).

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.requirements-installed
BUILT     := $(VENV)/.fusedformer-built
CSRC      := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
MAX_JOBS  ?= 2
# GPU tier: the GPU machine has torch preinstalled and no package registry, so it uses the
# system Python and installs nothing but fusedformer itself.
GPU_PY    ?= python3
OUT       ?= gpu-results

.PHONY: demo test build bench gpu-check clean

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(BUILT): $(STAMP) setup.py $(CSRC)
	MAX_JOBS=$(MAX_JOBS) $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

demo: $(BUILT)
	$(PY) -m fusedformer demo

test: $(BUILT)
	$(PY) -m pytest -q

bench: $(BUILT)
	$(PY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results/cpu-latest.json

gpu-check:
	mkdir -p $(OUT)
	MAX_JOBS=16 FUSEDFORMER_CUDA_ARCHS="90a" $(GPU_PY) -m pip install --no-deps --no-build-isolation -e . 2>&1 | tee $(OUT)/build.log
	$(GPU_PY) -m fusedformer info 2>&1 | tee $(OUT)/info.txt
	$(GPU_PY) -m pytest -m "gpu or not gpu" -q -rs --junitxml=$(OUT)/tests.xml 2>&1 | tee $(OUT)/tests.log; \
	  $(GPU_PY) -m fusedformer check 2>&1 | tee $(OUT)/check.txt; \
	  $(GPU_PY) -m pytest bench -q --benchmark-only --benchmark-json=$(OUT)/bench.json 2>&1 | tee $(OUT)/bench.log

clean:
	rm -rf build *.egg-info transformer/_C*.so $(BUILT)
