# fusedformer: the two commands (make demo, make test), plus make bench, make gpu-check and make gpu-bench.
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

.PHONY: demo test build bench ptxas-report gpu-check gpu-bench clean

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

# Registers, spills and static shared memory of every CUDA kernel (ptxas, -O3); needs nvcc only.
ptxas-report: $(STAMP)
	$(PY) bench/ptxas_report.py --arch 90a --out bench/results/ptxas-sm_90a.txt

# Device time is short (15 min a session, machine start included; 10 min a command), so each
# stage has its own time limit and writes to $(OUT) as it goes: what finished comes back even
# if a later stage runs out. gpu-check (build, oracle check, gpu test tier) fits one command;
# gpu-bench is a second. Tests run with autotuning off (one fixed tile per kernel; otherwise
# each test shape would benchmark every config); the benchmarks autotune.
# The gpu tier runs as four pytest processes at once (Triton compiles each kernel specialization
# on first use, on one CPU core per process); the last shard is every other test file.
# A fifth runs the cuda attention and FFN tests again with FUSEDFORMER_CUDA_WGMMA=0: on an sm_90
# the default is their wgmma kernels, and the mma.sync ones must pass there too.
GPU_SHARDS := tests/test_attention_triton.py tests/test_ffn.py \
              tests/test_softmax.py,tests/test_layer_norm.py \
              tests,--ignore=tests/test_attention_triton.py,--ignore=tests/test_ffn.py,--ignore=tests/test_softmax.py,--ignore=tests/test_layer_norm.py

gpu-check:
	mkdir -p $(OUT)
	MAX_JOBS=16 FUSEDFORMER_CUDA_ARCHS="90a" timeout 270 $(GPU_PY) -m pip install --no-deps --no-build-isolation -e . > $(OUT)/build.log 2>&1; \
	  echo "build exit $$?" >> $(OUT)/build.log; tail -3 $(OUT)/build.log
	-$(GPU_PY) -m fusedformer info 2>&1 | tee $(OUT)/info.txt
	-timeout 60 $(GPU_PY) -m fusedformer check 2>&1 | tee $(OUT)/check.txt
	-i=0; for files in $(GPU_SHARDS); do \
	  i=$$((i + 1)); \
	  ( FUSEDFORMER_AUTOTUNE=0 timeout 200 $(GPU_PY) -m pytest $$(echo $$files | tr , ' ') -m gpu -q -rs \
	      -p no:cacheprovider --junitxml=$(OUT)/tests-$$i.xml > $(OUT)/tests-$$i.log 2>&1; \
	    echo "tests exit $$? ($$files)" >> $(OUT)/tests-$$i.log ) & \
	done; \
	( FUSEDFORMER_AUTOTUNE=0 FUSEDFORMER_CUDA_WGMMA=0 timeout 200 $(GPU_PY) -m pytest tests/test_attention_cpp.py \
	    tests/test_ffn.py -m gpu -k cuda-cuda -q -rs -p no:cacheprovider --junitxml=$(OUT)/tests-mma.xml \
	    > $(OUT)/tests-mma.log 2>&1; \
	  echo "tests exit $$? (cuda attention and ffn on the mma.sync kernels: FUSEDFORMER_CUDA_WGMMA=0)" \
	    >> $(OUT)/tests-mma.log ) & \
	wait; tail -n 6 $(OUT)/tests-*.log

gpu-bench:
	mkdir -p $(OUT)
	-timeout 500 $(GPU_PY) -m pytest bench -q --benchmark-only --benchmark-json=$(OUT)/bench.json > $(OUT)/bench.log 2>&1; \
	  echo "bench exit $$?" >> $(OUT)/bench.log; tail -5 $(OUT)/bench.log

clean:
	rm -rf build *.egg-info transformer/_C*.so $(BUILT)
