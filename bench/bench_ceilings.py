"""The device's two ceilings, measured in the same run as the kernels (DESIGN.md section 6).

- copy: a large device-to-device copy; bytes = read + written.
- matmul: a large matrix product through torch's library, on random data (zeros run faster);
  bf16 on a GPU (the dtype of the attention and FFN targets); fp32 and bf16 on the CPU, whose
  bf16 product runs on other units (AMX, where the CPU has it) at another rate.

bench/report.py divides every kernel's GB/s by the copy rate and its TFLOP/s by the matmul
rate of its dtype (the "% ceil" column).
"""
from __future__ import annotations

import pytest
import torch

from bench.common import DEVICE, ON_GPU, measure

# GPU: 2 GiB each way (many times the H100/H200's 50-60 MiB L2); 8192^3 is where cuBLAS
# reaches its plateau. CPU: 256 MiB, 2048^3 (2-core machine: ~0.1 s a product).
COPY_BYTES = (2 << 30) if ON_GPU else (256 << 20)
MATMUL_N = 8192 if ON_GPU else 2048
MATMUL_DTYPES = [torch.bfloat16] if ON_GPU else [torch.float32, torch.bfloat16]


def test_copy_bandwidth(benchmark):
    src = torch.randn(COPY_BYTES // 4, device=DEVICE)
    dst = torch.full_like(src, float("nan"))
    measure(benchmark, lambda: dst.copy_(src), provider="torch", ceiling="copy",
            dtype=str(src.dtype), shape=[src.numel()], bytes=2 * COPY_BYTES)
    assert torch.equal(dst, src)


@pytest.mark.parametrize("dtype", MATMUL_DTYPES, ids=str)
def test_matmul_rate(benchmark, dtype):
    n = MATMUL_N
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    measure(benchmark, lambda: a @ b, provider="torch", ceiling="matmul",
            dtype=str(dtype), shape=[n, n, n], flops=2 * n ** 3)
