"""Benchmark plumbing: every result row records the machine and versions it came from.

Run with `make bench` (CPU) or `make gpu-check` (GPU). Timings are medians of many rounds
(pytest-benchmark on CPU; CUDA events via triton.testing.do_bench inside the GPU cases).
"""
from __future__ import annotations

import os
import platform
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict[str, str]:
    import importlib.metadata as md

    def version(p: str) -> str:
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "none"

    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "cpu": platform.processor() or platform.machine(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": version("triton"),
        "python": platform.python_version(),
        "git": _git_sha(),
    }


@pytest.fixture(scope="session")
def machine_info() -> dict[str, str]:
    return machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update(machine())
