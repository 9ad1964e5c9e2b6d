"""FFN benchmarks: fused ffn vs torch eager (Linear, activation, Linear) and torch.compile of
the same eager code.

FLOPs: 2 * M * C * F per GEMM (swiglu: the first GEMM is 2F wide); forward 2 GEMMs, backward 4.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedformer
from bench.common import (DEVICE, ON_GPU, backend_of, fused_providers, grads, measure, switches,
                          variant_providers)

# The CPU's third shape runs the cpu backend's FFN as 2 chunks of rows (gelu) or 4 (swiglu).
SHAPES = ([(16384, 2048, 8192), (8192, 4096, 11008)] if ON_GPU
          else [(512, 256, 1024), (1024, 512, 2048), (4096, 512, 4096)])
DTYPES = [torch.bfloat16] if ON_GPU else [torch.float32, torch.bfloat16]
ACTIVATIONS = ["gelu", "swiglu"]


def _eager(x, w1, b1, w2, b2, activation):
    h = F.linear(x, w1, b1)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return F.linear(h, w2, b2)


_compiled = torch.compile(_eager, dynamic=False)


@pytest.mark.parametrize("provider", fused_providers("ffn") + variant_providers("ffn")
                         + ["torch", "torch-compile"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_ffn(benchmark, provider, activation, dtype, shape, mode):
    m, c, f = shape
    f1 = 2 * f if activation == "swiglu" else f
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=DEVICE) * scale).to(dtype).requires_grad_()  # noqa: E731
    x, w1, b1 = mk(m, c), mk(f1, c, scale=c ** -0.5), mk(f1)
    w2, b2 = mk(c, f, scale=f ** -0.5), mk(c)
    dy = torch.randn(m, c, device=DEVICE, dtype=dtype)
    flops = 2 * m * c * (f1 + f) * (3 if mode == "fwd+bwd" else 1)

    def ffn():
        if provider == "torch":
            return _eager(x, w1, b1, w2, b2, activation)
        if provider == "torch-compile":
            return _compiled(x, w1, b1, w2, b2, activation)
        with switches(provider):
            return fusedformer.ffn(x, w1, b1, w2, b2, activation, backend=backend_of(provider))

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return ffn()
        grads(ffn(), (x, w1, b1, w2, b2), dy)

    measure(benchmark, run, provider=provider, dtype=str(dtype), shape=shape, mode=mode,
            activation=activation, flops=flops)
