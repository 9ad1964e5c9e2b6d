"""Shared benchmark helpers: providers, timing, and the ceilings of the device.

Timing: on CPU, pytest-benchmark's median over rounds; on a GPU, triton.testing.do_bench
(CUDA events, warm-up, L2 flush, median) — its median is recorded as extra_info["median_s"]
and is what bench/report.py prints.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator

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


# Variants of a fused provider: the same backend under an environment switch, timed where the
# switch means something (sm_90+). Base providers run with every switch at its default.
SWITCHES = {"FUSEDFORMER_TRITON_TMA": "0", "FUSEDFORMER_CUDA_WGMMA": "1"}
VARIANTS = {
    # the triton attention forward through TMA descriptors (the backward is fusedformer-triton's)
    "fusedformer-triton-tma": ("attention", {"FUSEDFORMER_TRITON_TMA": "1"}),
    # the cuda backend's mma.sync kernels on an sm_90, where its default is the wgmma ones
    "fusedformer-cuda-mma": ("attention", "ffn", {"FUSEDFORMER_CUDA_WGMMA": "0"}),
}


def variant_providers(op: str) -> list[str]:
    """The VARIANTS of `op` that can run here: a GPU of sm_90+ and the base backend available
    (the TMA one also needs a Triton with host tensor descriptors)."""
    if not ON_GPU or torch.cuda.get_device_capability() < (9, 0):
        return []
    fused = fused_providers(op)
    out = []
    for name, (*ops, _) in VARIANTS.items():
        if op not in ops or name.rsplit("-", 1)[0] not in fused:
            continue
        if name == "fusedformer-triton-tma":
            from fusedformer.kernels import attention

            if attention.TensorDescriptor is None:
                continue
        out.append(name)
    return out


def backend_of(provider: str) -> str:
    """fusedformer-<backend>[-<variant>] -> backend."""
    return provider.split("-")[1]


@contextlib.contextmanager
def switches(provider: str) -> Iterator[None]:
    """The environment switches of `provider` (VARIANTS), every other one at its default."""
    wanted = {**SWITCHES, **(VARIANTS[provider][-1] if provider in VARIANTS else {})}
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def measure(benchmark, fn: Callable[[], object], **extra) -> float:
    """Time fn; record extra info (units, shapes) and return the median seconds."""
    if extra.get("provider", "").startswith("fusedformer-triton"):  # the one backend that autotunes
        extra["autotune"] = "off" if os.environ.get("FUSEDFORMER_AUTOTUNE", "1") == "0" else "on"
    benchmark.extra_info.update(extra)
    if benchmark.disabled:  # --benchmark-disable: a smoke run of every row; fn runs once, nothing is timed
        benchmark.pedantic(fn, rounds=1, iterations=1)
        return math.nan
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
