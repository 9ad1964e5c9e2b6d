"""Argument checks shared by the public ops: every message names the argument, what was
expected and what came (STYLE.md practice 6). TypeError for wrong types/dtypes, ValueError for
wrong shapes and values."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def floating(name: str, t: object) -> torch.Tensor:
    t = is_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), "
                        f"got {t.dtype}")
    return t


def like(name: str, t: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """`t` is a tensor with the dtype and device of `ref`."""
    t = is_tensor(name, t)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    return t


def ndim(name: str, t: torch.Tensor, dims: tuple[int, ...], layout: str) -> None:
    if t.dim() not in dims:
        allowed = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {allowed} {layout}, got shape {tuple(t.shape)}")


def shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        suffix = f" {meaning}" if meaning else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{suffix}, got {tuple(t.shape)}")


def probability(name: str, p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def kernel_dtype(op: str, backend: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: backend '{backend}' supports float16, bfloat16 and float32, "
                        f"got {name} of dtype {t.dtype} (use backend 'reference' for float64)")


def mask(name: str, m: object, target: tuple[int, ...], target_name: str, dtype: torch.dtype,
         device: torch.device) -> torch.Tensor:
    """A bool or float mask that broadcasts to `target`; float masks must have `dtype`."""
    m = is_tensor(name, m)
    if m.dtype != torch.bool and m.dtype != dtype:
        raise TypeError(f"{name} must be bool (True = keep) or {dtype} (added to the scores), "
                        f"got {m.dtype}")
    if m.device != device:
        raise ValueError(f"{name} must be on {device}, got {m.device}")
    try:
        if m.dim() > len(target) or torch.broadcast_shapes(m.shape, target) != torch.Size(target):
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(m.shape)} does not broadcast to the "
                         f"{target_name} shape {tuple(target)}") from None
    return m
