"""The numerics rule and the op checks shared by the test suite and `fusedformer check`.

The rule (FlashAttention's, DESIGN.md section 4): run the fused op and PyTorch's own op in the
same low precision, compare both with a float64 truth from the oracle; the fused error must be
at most RATIO x PyTorch's error + FLOOR[dtype]. One table, used everywhere.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference
from .dispatch import use_backend

RATIO = 2.0
# Absolute floor per dtype: about one unit of rounding on O(1) outputs (bf16 eps = 2^-8,
# fp16 eps = 2^-11), so that an exact PyTorch result does not demand an exact fused one.
FLOOR: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


@dataclasses.dataclass
class Comparison:
    """One tensor of one op checked by the rule."""
    name: str
    err: float          # max |fused - truth|
    mean_err: float     # mean |fused - truth|
    where: tuple        # index of the max error
    torch_err: float    # max |pytorch - truth|, same dtype as fused
    bound: float        # RATIO * torch_err + FLOOR

    @property
    def ok(self) -> bool:
        return self.err <= self.bound  # False for NaN

    def __str__(self) -> str:
        return (f"{self.name}: max err {self.err:.3g} at {self.where} (mean {self.mean_err:.3g}), "
                f"bound {self.bound:.3g} = {RATIO} x PyTorch's {self.torch_err:.3g} + floor")


def error(x: Tensor, truth: Tensor) -> tuple[float, float, tuple]:
    """(max, mean, argmax index) of |x - truth| in float64; NaN anywhere gives NaN max."""
    if x.shape != truth.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != expected {tuple(truth.shape)}")
    if x.numel() == 0:
        return 0.0, 0.0, ()
    d = (x.detach().double() - truth.detach().double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    flat = int(d.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), d.shape))
    err = float(d.max())
    return (math.nan if math.isinf(err) else err), float(d.mean()), where


def compare(name: str, fused: Tensor, pytorch: Tensor, truth: Tensor, stat: str = "max"
            ) -> Comparison:
    """The rule on one tensor. stat="max" (per op) compares max errors; stat="rms" compares
    root-mean-square errors, for whole-model checks where one element's max error after a
    dozen low-precision layers is an outlier of rounding order, not a property of the kernels."""
    err, mean, where = error(fused, truth)
    torch_err, _, _ = error(pytorch, truth)
    if stat == "rms":
        err = _rms(fused, truth)
        torch_err = _rms(pytorch, truth)
    elif stat != "max":
        raise ValueError(f"stat must be 'max' or 'rms', got {stat!r}")
    return Comparison(name, err, mean, where, torch_err, RATIO * torch_err + FLOOR[fused.dtype])


def _rms(x: Tensor, truth: Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    d = x.detach().double() - truth.detach().double()
    return float(d.pow(2).mean().sqrt()) if not torch.isnan(d).any() else math.nan


# ----------------------------------------------------------------------------------------
# Per-op checks: fused (a backend) vs PyTorch's own op, both against the float64 oracle,
# outputs and every gradient, on fresh random inputs.


def _run(fn: Callable[..., Tensor], inputs: Sequence[Optional[Tensor]], dy: Tensor
         ) -> list[Tensor]:
    """[output, grad of each input that requires grad] for fn(*inputs) with upstream dy."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None and t.requires_grad],
                                dy.to(out.dtype))
    return [out.detach(), *grads]


def _check(names: Sequence[str], inputs: Sequence[Optional[Tensor]], dy: Tensor,
           fused: Callable, pytorch: Callable, oracle: Callable) -> list[Comparison]:
    f = _run(fused, inputs, dy)
    p = _run(pytorch, inputs, dy)
    wide = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    t = _run(oracle, wide, dy.double())
    return [compare(n, a, b, c) for n, a, b, c in zip(names, f, p, t)]


def check_layer_norm(backend: str, dtype: torch.dtype, device: str = "cpu",
                     shape: tuple[int, ...] = (4, 37, 203)) -> list[Comparison]:
    n = shape[-1]
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    x, res, w, b = mk(*shape), mk(*shape), mk(n), mk(n)
    dy = torch.randn(shape, device=device, dtype=dtype)

    def fused(x, res, w, b):
        with use_backend(backend):
            y, h = ops.layer_norm(x, n, w, b, 1e-5, res)
        return y + 0.5 * h  # exercise the gradient flowing into h as well

    def pytorch(x, res, w, b):
        h = x + res
        return F.layer_norm(h, (n,), w, b, 1e-5) + 0.5 * h

    def oracle(x, res, w, b):
        y, h = reference.layer_norm_ref(x, n, w, b, 1e-5, res)
        return y + 0.5 * h

    return _check(("y", "dx", "dresidual", "dweight", "dbias"), (x, res, w, b), dy,
                  fused, pytorch, oracle)


def check_attention(backend: str, dtype: torch.dtype, device: str = "cpu",
                    b: int = 2, hq: int = 4, hkv: int = 2, lq: int = 37, lk: int = 45,
                    d: int = 32, causal: bool = True) -> list[Comparison]:
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=device, requires_grad=True)  # noqa: E731
    q, k, v = mk(b, hq, lq, d), mk(b, hkv, lk, d), mk(b, hkv, lk, d)
    keep = torch.rand(b, 1, 1, lk, device=device) > 0.2  # key padding
    dy = torch.randn(b, hq, lq, d, dtype=dtype, device=device)

    def fused(q, k, v):
        with use_backend(backend):
            return ops.scaled_dot_product_attention(q, k, v, keep, is_causal=causal, enable_gqa=True)

    def pytorch(q, k, v):
        mask = keep & torch.ones(lq, lk, dtype=torch.bool, device=device).tril() if causal else keep
        return F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)

    def oracle(q, k, v):
        return reference.attention_ref(q, k, v, keep, is_causal=causal, enable_gqa=True)

    return _check(("o", "dq", "dk", "dv"), (q, k, v), dy, fused, pytorch, oracle)


def check_softmax(backend: str, dtype: torch.dtype, device: str = "cpu",
                  shape: tuple[int, ...] = (2, 3, 29, 77)) -> list[Comparison]:
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    keep = torch.rand(shape[0], 1, 1, shape[-1], device=device) > 0.2
    dy = torch.randn(shape, dtype=dtype, device=device)
    scale = 0.37

    def fused(x):
        with use_backend(backend):
            return ops.scaled_masked_softmax(x, scale, keep, causal=False)

    def pytorch(x):
        return torch.softmax((x * scale).masked_fill(~keep, -math.inf), dim=-1)

    def oracle(x):
        return reference.scaled_masked_softmax_ref(x, scale, keep)

    return _check(("y", "dx"), (x,), dy, fused, pytorch, oracle)


def check_ffn(backend: str, dtype: torch.dtype, device: str = "cpu", activation: str = "gelu",
              m: int = 67, c: int = 48, f: int = 136) -> list[Comparison]:
    f1 = 2 * f if activation == "swiglu" else f
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(dtype).requires_grad_()  # noqa: E731
    x, w1, b1 = mk(m, c), mk(f1, c, scale=c ** -0.5), mk(f1)
    w2, b2 = mk(c, f, scale=f ** -0.5), mk(c)
    dy = torch.randn(m, c, dtype=dtype, device=device)
    acts = {
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "swiglu": lambda t: F.silu(t[..., :f]) * t[..., f:],
    }

    def fused(*args):
        with use_backend(backend):
            return ops.ffn(*args, activation=activation)

    def pytorch(x, w1, b1, w2, b2):
        return F.linear(acts[activation](F.linear(x, w1, b1)), w2, b2)

    def oracle(*args):
        return reference.ffn_ref(*args, activation=activation)

    return _check(("y", "dx", "dw1", "db1", "dw2", "db2"), (x, w1, b1, w2, b2), dy,
                  fused, pytorch, oracle)


CHECKS: dict[str, Callable[..., list[Comparison]]] = {
    "attention": check_attention,
    "softmax": check_softmax,
    "layer_norm": check_layer_norm,
    "ffn": check_ffn,
}
