"""Scaled masked softmax benchmarks vs torch eager (softmax(x * scale + mask)).

Bytes (the floor): forward reads x (+ the broadcast mask, small) and writes y: 2 * numel * S;
backward reads dy, y and writes dx: 3 * numel * S.
"""
from __future__ import annotations

import pytest
import torch

import fusedformer
from bench.common import DEVICE, ON_GPU, backend_of, fused_providers, grads, measure

SHAPES = [(4, 16, 1024, 1024), (1, 16, 2048, 4096)] if ON_GPU else [(2, 8, 256, 256), (1, 4, 128, 2048)]
DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("provider", fused_providers("softmax") + ["torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_softmax(benchmark, provider, dtype, shape, mode):
    x = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    keep = torch.rand(shape[0], 1, 1, shape[-1], device=DEVICE) > 0.1  # key padding
    dy = torch.randn_like(x)
    numel = x.numel()
    nbytes = numel * x.element_size() * (5 if mode == "fwd+bwd" else 2)

    def softmax():
        if provider == "torch":
            return torch.softmax((x * 0.125).masked_fill(~keep, float("-inf")), dim=-1)
        return fusedformer.scaled_masked_softmax(x, 0.125, keep, backend=backend_of(provider))

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return softmax()
        grads(softmax(), (x,), dy)

    measure(benchmark, run, provider=provider, dtype=str(dtype), shape=shape, mode=mode, bytes=nbytes)
