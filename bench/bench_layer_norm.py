"""LayerNorm (+ residual) benchmarks: fusedformer's backends vs torch eager on this device.

Napkin math (the floor is memory traffic; S = bytes per element of the storage dtype):
    fwd with residual: read x, residual; write h, y          = 4 * M * N * S  (+ weight/bias)
    bwd with residual: read dy, dh, h; write dx              = 4 * M * N * S  (+ mean/rstd)
GB/s = bytes / time; on a GPU, compare with the copy bandwidth measured in the same run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedformer
from bench.common import DEVICE, ON_GPU, backend_of, fused_providers, grads, measure

SHAPES = [(16384, 2048), (4096, 8192), (2048, 65536)] if ON_GPU else [(4096, 768), (2048, 4096), (512, 8192)]
DTYPES = [torch.bfloat16, torch.float32] if ON_GPU else [torch.float32, torch.bfloat16]


def _inputs(shape, dtype):
    m, n = shape
    x, r = (torch.randn(m, n, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(n, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    return x, r, w, b


def _fwd(provider, x, r, w, b):
    n = x.shape[-1]
    if provider == "torch":
        h = x + r
        return F.layer_norm(h, (n,), w, b), h
    return fusedformer.layer_norm(x, n, w, b, residual=r, backend=backend_of(provider))


@pytest.mark.parametrize("provider", fused_providers("layer_norm") + ["torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_layer_norm_residual(benchmark, provider, dtype, shape, mode):
    x, r, w, b = _inputs(shape, dtype)
    dy = torch.randn_like(x)
    m, n = shape
    nbytes = 4 * m * n * x.element_size() * (2 if mode == "fwd+bwd" else 1)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return _fwd(provider, x, r, w, b)
        y, h = _fwd(provider, x, r, w, b)
        grads((y, h), (x, r, w, b), (dy, dy))
        return y

    measure(benchmark, run, provider=provider, dtype=str(dtype), shape=shape, mode=mode, bytes=nbytes)
