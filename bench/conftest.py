"""Benchmark plumbing: every result row records the machine and versions it came from.

Run with `make bench` (CPU) or `make gpu-check` (GPU). Timings are medians of many rounds
(pytest-benchmark on CPU; CUDA events via triton.testing.do_bench inside the GPU cases).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _keep_freed_memory() -> str:
    """CPU runs: make glibc keep freed memory for reuse, so a benchmark times the kernels and
    not the kernel's page faults. By default glibc unmaps every freed block at or above its
    mmap threshold (adaptive, at most 32 MiB), so the next call's outputs are fresh pages and
    each 4 KiB page faults on first touch: at fp32 2048 x 4096 that made both LayerNorms
    (ours and torch's) take ~19 ms instead of ~3-6, and the ratio swung 0.4x-1.7x from run to
    run with the allocator's state. Both providers run under the same setting. Returns what
    was set (recorded with the machine info)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system default (not glibc)"
    one_gib = 1 << 30
    if mallopt(M_MMAP_THRESHOLD, one_gib) != 1 or mallopt(M_TRIM_THRESHOLD, one_gib) != 1:
        return "system default (mallopt refused)"
    return "glibc mmap/trim threshold 1 GiB (freed memory reused; no page faults per call)"


_MALLOC = "system default"


def pytest_configure(config):
    global _MALLOC
    if not torch.cuda.is_available():
        _MALLOC = _keep_freed_memory()


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cpu_isa() -> str:
    """The vector ISA fusedformer's C++ CPU kernels were built for (setup.py picks the
    building machine's), and torch's own CPU capability."""
    try:
        from fusedformer import _C
        ours = _C.build_info().get("cpu_isa", "?")
    except ImportError:
        ours = "not built"
    return f"fusedformer {ours}, torch {torch.backends.cpu.get_cpu_capability()}"


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the 2-core machines differ from session to
    session: an AMX Xeon one day, an AMD EPYC without AMX the next), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def machine() -> dict[str, str]:
    import importlib.metadata as md

    def version(p: str) -> str:
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "none"

    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "cpu": _cpu_model(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": version("triton"),
        "python": platform.python_version(),
        "git": _git_sha(),
        "malloc": _MALLOC,
        "cpu_isa": _cpu_isa(),
    }


@pytest.fixture(scope="session")
def machine_info() -> dict[str, str]:
    return machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(machine())


@pytest.fixture(autouse=True)
def _stream_result(request):
    """With FUSEDFORMER_BENCH_JSONL=path, append each benchmark's result to that file as one
    JSON line the moment it is measured. pytest-benchmark writes its JSON only when the whole
    session ends, and a GPU run cut off by its time limit (bench/gpu_run.py) must still bring
    back every row it measured. bench/report.py reads either format."""
    yield
    path = os.environ.get("FUSEDFORMER_BENCH_JSONL")
    bench = request.node.funcargs.get("benchmark")
    if not path or bench is None or "median_s" not in bench.extra_info:
        return
    row = {"name": request.node.name, "extra_info": dict(bench.extra_info), "machine_info": machine()}
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
