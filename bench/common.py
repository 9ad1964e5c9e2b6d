"""Shared benchmark helpers: providers, timing, and the ceilings of the device.

Timing: on CPU, pytest-benchmark's median over rounds; on a GPU, triton.testing.do_bench
(CUDA events, warm-up, L2 flush, median) — its median is recorded as extra_info["median_s"]
and is what bench/report.py prints.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

import fusedformer

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def grads(outputs, inputs, grad_outputs) -> tuple[torch.Tensor, ...]:
    """The gradients of `inputs` as a training step computes them after
    zero_grad(set_to_none=True): fresh tensors. Tensor.backward across rounds would accumulate
    into .grad instead, adding a read and a write of every input gradient per round, the same for
    every provider, which dilutes the ratio of memory-bound ops."""
    return torch.autograd.grad(outputs, inputs, grad_outputs)


def fused_providers(op: str) -> list[str]:
    """fusedformer-<backend> for every backend that can run `op` on this device."""
    status = fusedformer.info()["backends"]
    wanted = ("triton", "cuda") if ON_GPU else ("cpu",)
    return [f"fusedformer-{b}" for b in wanted if status[b]["available"] and op in status[b]["ops"]]


def measure(benchmark, fn: Callable[[], object], **extra) -> float:
    """Time fn; record extra info (units, shapes) and return the median seconds."""
    benchmark.extra_info.update(extra)
    if ON_GPU:
        import triton.testing

        median = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=1, iterations=1)
    else:
        benchmark.pedantic(fn, rounds=15, warmup_rounds=2, iterations=1)
        median = benchmark.stats.stats.median
    benchmark.extra_info["median_s"] = median
    if "flops" in extra:
        benchmark.extra_info["TFLOP/s"] = extra["flops"] / median / 1e12
    if "bytes" in extra:
        benchmark.extra_info["GB/s"] = extra["bytes"] / median / 1e9
    return median
