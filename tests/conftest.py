"""Shared test machinery: the one tolerance table, the FlashAttention rule, assert_close.

The table and the rule live in fusedformer.kernels.testing so that `fusedformer check` applies
exactly the same numbers; this file re-exports them for the tests and adds the pytest side.
Triton kernels run interpreted on this CPU-only machine: TRITON_INTERPRET must be set before
triton is first imported, hence here, before anything imports fusedformer's Triton modules.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fusedformer.kernels.testing import FLOOR, RATIO, Comparison, error  # noqa: E402,F401

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float,
                 rtol: float = 0.0) -> None:
    """|actual - expected| <= atol + rtol * |expected| everywhere; on failure print the max
    and mean error and where the max is."""
    err, mean, where = error(actual, expected)
    tol = atol + rtol * float(expected.detach().double().abs().max()) if expected.numel() else atol
    assert err <= tol, (f"{name}: max err {err:.3g} at {where} (actual {actual[where].item() if where else None}, "
                        f"expected {expected[where].item() if where else None}), mean err {mean:.3g}, "
                        f"tolerance {tol:.3g}")


def assert_rule(comparisons: list[Comparison]) -> None:
    """Every tensor of an op within the rule: fused err <= RATIO x PyTorch's err + FLOOR."""
    failed = [str(c) for c in comparisons if not c.ok]
    assert not failed, "\n".join(failed)


def devices() -> list:
    """CPU always; CUDA as a `gpu`-marked parameter (run by make gpu-check)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(autouse=True)
def _fresh_backend():
    """Each test starts on the default backend, whatever the previous one set."""
    from fusedformer import use_backend

    with use_backend("auto"):
        yield


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request):
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _nan_filled_outputs():
    """Every kernel output starts as NaN in every test (see fusedformer.kernels.alloc)."""
    from fusedformer.kernels.alloc import nan_filled_outputs

    with nan_filled_outputs():
        yield


def backend_params(op: str) -> list:
    """(backend, device) pairs for the fused backends of `op`: CPU ones always, CUDA ones
    marked `gpu`. A pair whose backend cannot run `op` here is skipped with the reason."""
    pairs = [("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]
    return [pytest.param(b, d, marks=[pytest.mark.gpu] if d == "cuda" else [], id=f"{b}-{d}")
            for b, d in pairs]


def require_backend(op: str, backend: str, device: str) -> None:
    from fusedformer.kernels.dispatch import backend_status

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    status = backend_status()[backend]
    if not status["available"]:
        pytest.skip(f"backend '{backend}' unavailable: {status['reason']}")
    if op not in status["ops"]:
        pytest.skip(f"backend '{backend}' does not implement {op} yet")
