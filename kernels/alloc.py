"""Output allocation for the launchers, with the tests' NaN-fill switch.

Under nan_filled_outputs() every output a launcher allocates (here, and in fusedformer._C)
starts as NaN, so an element that a kernel forgets to write fails the oracle comparison
instead of passing by luck. Off by default: it costs a write of every output.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .dispatch import extension

_nan_fill = False


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str
          ) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _nan_fill and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty_like(t: torch.Tensor) -> torch.Tensor:
    return empty(t.shape, t.dtype, t.device)


@contextlib.contextmanager
def nan_filled_outputs(enabled: bool = True) -> Iterator[None]:
    global _nan_fill
    ext, _ = extension()
    previous = _nan_fill
    _nan_fill = enabled
    if ext is not None:
        ext.set_nan_fill(enabled)
    try:
        yield
    finally:
        _nan_fill = previous
        if ext is not None:
            ext.set_nan_fill(previous)
