"""Peak host memory of one FFN forward + backward (or, with --mode fwd, one forward under
torch.no_grad) on the CPU: fused (cpu backend) vs torch eager (Linear, activation, Linear), each
configuration in a fresh process.

The number is the rise of the process's peak RSS over a warm process that already holds the
inputs (a small call of the same op first, so that library code and oneDNN's JIT are loaded),
per element of the (M, F) hidden: what the op's saved tensors and workspaces cost.

    python -m bench.ffn_memory [--shape M C F] [--mode fwd] > bench/results/<machine>-<date>-ffn-memory.txt

torch's fp16 GEMM on CPUs without AMX-FP16 takes minutes at the default shape, so eager fp16 is
left out unless --eager-fp16 is given.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("gelu", "swiglu")


def measure(provider: str, dtype_name: str, activation: str, mode: str, m: int, c: int, f: int) -> dict:
    """One call in this process; returns the peak RSS rise in bytes and the wall time."""
    import resource
    import time

    import fusedformer
    from bench.bench_ffn import _eager

    dtype = getattr(torch, dtype_name)
    f1 = 2 * f if activation == "swiglu" else f
    x = torch.randn(m, c, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(f1, c) * c ** -0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(c, f) * f ** -0.5).to(dtype).requires_grad_()
    b1 = torch.zeros(f1, dtype=dtype, requires_grad=True)
    b2 = torch.zeros(c, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, c, dtype=dtype)

    def run(x):
        if provider == "fusedformer-cpu":
            return fusedformer.ffn(x, w1, b1, w2, b2, activation, backend="cpu")
        return _eager(x, w1, b1, w2, b2, activation)

    small = x.detach()[:8].requires_grad_()
    run(small).sum().backward()
    for t in (w1, w2, b1, b2):
        t.grad = None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "fwd":
        with torch.no_grad():
            run(x)
    else:
        run(x).backward(dy)
    seconds = time.perf_counter() - start
    rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux
    return {"rise": rise, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(4096, 1024, 4096), metavar=("M", "C", "F"))
    ap.add_argument("--mode", choices=("fwd+bwd", "fwd"), default="fwd+bwd")
    ap.add_argument("--eager-fp16", action="store_true")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # provider dtype activation: child
    args = ap.parse_args()
    m, c, f = args.shape
    if args.one:
        print(json.dumps(measure(*args.one, args.mode, m, c, f)))
        return
    from fusedformer.kernels import cpp_backend  # noqa: F401  (fails early if unbuilt)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=root).stdout.strip()
    print(f"# FFN {args.mode} peak RSS rise on the CPU, (M, C, F) = ({m}, {c}, {f}), biases, no dropout;"
          f" torch {torch.__version__}, git {git}, {torch.get_num_threads()} threads")
    print(f"{'dtype':9s} {'activation':10s} {'provider':16s} {'MB':>7s} {'B per (M,F)':>12s} {'seconds':>8s}")
    for dtype_name in DTYPES:
        for activation in ACTIVATIONS:
            for provider in ("fusedformer-cpu", "torch"):
                if provider == "torch" and dtype_name == "float16" and not args.eager_fp16:
                    continue
                out = subprocess.run([sys.executable, "-m", "bench.ffn_memory", "--shape", str(m), str(c),
                                      str(f), "--mode", args.mode, "--one", provider, dtype_name, activation],
                                     capture_output=True, text=True, check=True, cwd=root).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{dtype_name:9s} {activation:10s} {provider:16s} {r['rise'] / 2**20:7.0f} "
                      f"{r['rise'] / (m * f):12.1f} {r['seconds']:8.2f}")


if __name__ == "__main__":
    main()
