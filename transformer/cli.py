"""`python -m fusedformer` / `fusedformer`: info, check, demo.

    info    versions, device, and every backend: available or not (and why), ops implemented
    check   every available backend against the float64 oracle, forward and backward, on fresh
            random inputs; one row per (op, backend, dtype) with the worst tensor's error and
            the FlashAttention-rule bound (2x PyTorch's own same-dtype error + floor);
            --model adds fused-vs-reference GPT and EncoderDecoder (logits, loss, gradients)
    demo    info + check + a few hundred steps of gpt-tiny on bytes of this machine's Python
            standard library, on the fused ops and then on the plain-PyTorch reference from the
            same initialization and batches, printing both losses as they fall and their gap
On a machine without a GPU the triton backend runs interpreted (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _interpret_triton_without_gpu(argv: Sequence[str]) -> None:
    """Without a GPU, Triton must run interpreted, and TRITON_INTERPRET must be set before
    triton is imported (importing fusedformer already imports it, through torch._dynamo): so
    re-run this command once with the variable set."""
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "fusedformer", *argv])


def cmd_info(_args: argparse.Namespace) -> int:
    import fusedformer

    info = fusedformer.info()
    for key in ("fusedformer", "python", "torch", "torch_cuda", "triton", "device", "backend", "cuda_matmul", "cpu_bf16"):
        print(f"{key:>12}: {info[key]}")
    print()
    print(f"{'backend':<10} {'available':<10} {'ops':<36} why not")
    for name, status in info["backends"].items():
        ops = ", ".join(status["ops"]) or "-"
        print(f"{name:<10} {'yes' if status['available'] else 'no':<10} {ops:<36} {status['reason']}")
    return 0


def _device_for(backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_check(args: argparse.Namespace) -> int:
    from fusedformer.kernels.dispatch import backend_status
    from fusedformer.kernels.testing import CHECKS, RATIO

    status = backend_status()
    backends = args.backend or [b for b, s in status.items() if s["available"]]
    ops = args.op or list(CHECKS)
    dtypes = [DTYPES[d] for d in (args.dtype or list(DTYPES))]
    print(f"fused vs float64 oracle, forward and backward; pass = max error <= {RATIO:g} x "
          "PyTorch's same-dtype error + floor")
    print(f"{'op':<11} {'backend':<10} {'dtype':<9} {'worst tensor':<12} {'max error':>10} "
          f"{'bound':>10}  result")
    failures = 0
    torch.manual_seed(args.seed)
    for op in ops:
        for backend in backends:
            if op not in status[backend]["ops"]:
                continue
            for dtype in dtypes:
                started = time.perf_counter()
                try:
                    rows = CHECKS[op](backend, dtype, _device_for(backend))
                except Exception as e:  # report every op; one failure must not hide the rest
                    failures += 1
                    print(f"{op:<11} {backend:<10} {str(dtype)[6:]:<9} {'-':<12} {'-':>10} "
                          f"{'-':>10}  ERROR {type(e).__name__}: {e}")
                    continue
                worst = max(rows, key=lambda c: (not c.ok, c.err / c.bound if c.bound else 0))
                ok = all(c.ok for c in rows)
                failures += not ok
                print(f"{op:<11} {backend:<10} {str(dtype)[6:]:<9} {worst.name:<12} "
                      f"{worst.err:>10.3g} {worst.bound:>10.3g}  {'pass' if ok else 'FAIL'}"
                      f"  ({time.perf_counter() - started:.1f}s)")
    if args.model:
        failures += _check_models(status, backends, dtypes)
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 1 if failures else 0


def _check_models(status: dict, backends: list[str], dtypes: list[torch.dtype]) -> int:
    """Fused GPT / EncoderDecoder vs the reference models (logits, loss, every gradient)."""
    from fusedformer.parity import MODEL_CHECKS, MODEL_OPS

    print("\nfused models vs the float64 reference model: logits, loss and every parameter "
          "gradient (RMS errors)")
    print(f"{'model':<15} {'backend':<10} {'dtype':<9} {'worst tensor':<36} {'rms error':>10} "
          f"{'bound':>10}  result")
    failures = 0
    for model, check in MODEL_CHECKS.items():
        for backend in backends:
            if not all(op in status[backend]["ops"] for op in MODEL_OPS):
                continue
            for dtype in dtypes:
                if dtype == torch.float16:
                    continue  # the reference models are trained in fp32 / bf16
                rows = check(backend, dtype, _device_for(backend))
                worst = max(rows, key=lambda c: (not c.ok, c.err / c.bound if c.bound else 0))
                ok = all(c.ok for c in rows)
                failures += not ok
                print(f"{model:<15} {backend:<10} {str(dtype)[6:]:<9} {worst.name[:36]:<36} "
                      f"{worst.err:>10.3g} {worst.bound:>10.3g}  {'pass' if ok else 'FAIL'}")
    return failures


def cmd_demo(args: argparse.Namespace) -> int:
    from fusedformer.train import train_fused_and_reference

    print("== fusedformer info ==")
    cmd_info(args)
    print("\n== fusedformer check ==")
    check_failed = cmd_check(args)
    print(f"\n== training gpt-tiny on Python's standard library ({args.steps} steps), on the fused ops "
          "and on the reference ==")
    fused, reference = train_fused_and_reference(steps=args.steps, seed=args.seed)
    gap = max(abs(a - b) for a, b in zip(fused, reference))
    print(f"largest gap between the two runs' per-step train losses: {gap:.2e}")
    return check_failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fusedformer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, backends").set_defaults(fn=cmd_info)
    for name, fn, helptext in (("check", cmd_check, "every backend vs the oracle"),
                               ("demo", cmd_demo, "info + check + a short training run")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--backend", action="append", choices=["reference", "cpu", "cuda", "triton"],
                       help="check only this backend (repeatable)")
        p.add_argument("--op", action="append", choices=["attention", "softmax", "layer_norm", "ffn"],
                       help="check only this op (repeatable)")
        p.add_argument("--dtype", action="append", choices=list(DTYPES),
                       help="check only this dtype (repeatable)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--model", action="store_true",
                       help="also compare the fused GPT and EncoderDecoder with the reference models")
        if name == "demo":
            p.add_argument("--steps", type=int, default=300, help="training steps")
        p.set_defaults(fn=fn)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    _interpret_triton_without_gpu(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
