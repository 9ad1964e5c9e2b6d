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
	$(PY) bench/report.py bench/results/cpu-latest.json --plot bench/results/plots/cpu-latest

# Registers, spills and static shared memory of every CUDA kernel (ptxas, -O3); needs nvcc only.
# sm_90a (H100/H200: the wgmma kernels) and sm_80 (A100: the mma.sync kernels' own target).
ptxas-report: $(STAMP)
	$(PY) bench/ptxas_report.py --arch 90a --out bench/results/ptxas-sm_90a.txt
	$(PY) bench/ptxas_report.py --arch 80 --out bench/results/ptxas-sm_80.txt

# GPU machine (device time is 15 min a session, machine start included; 10 min a command; 8
# files back): gpu-check is the one call to make, bench/gpu_run.py's staged run of the build,
# the oracle check, the `gpu` test tier (and the cuda attention/FFN tests again on the
# mma.sync kernels) and a benchmark pass, under one deadline, writing its eight files to
# $(OUT) as it goes. gpu-bench is the whole benchmark grid alone, for a session with time left.
gpu-check:
	$(GPU_PY) bench/gpu_run.py --out $(OUT) --python $(GPU_PY)

gpu-bench:
	mkdir -p $(OUT)
	-FUSEDFORMER_BENCH_JSONL=$(abspath $(OUT))/bench.jsonl timeout 540 $(GPU_PY) -m pytest bench -q \
	  --benchmark-only -p no:cacheprovider > $(OUT)/bench.log 2>&1; \
	  echo "bench exit $$?" >> $(OUT)/bench.log; $(GPU_PY) bench/report.py $(OUT)/bench.jsonl

clean:
	rm -rf build *.egg-info transformer/_C*.so $(BUILT)
