"""Launchers of the `cpu` and `cuda` backends: thin calls into fusedformer._C (csrc/).

The C++ side checks its arguments, makes inputs contiguous and dispatches on the tensors'
device, so one launcher serves both backends. The launcher contract is in kernels/ops.py.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .dispatch import extension


def _C():
    ext, why = extension()
    if ext is None:
        raise RuntimeError(why)
    return ext


def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_C().layer_norm_fwd(x, residual, weight, bias, eps))


def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, need_dweight: bool, need_dbias: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_C().layer_norm_bwd(dy, dh, h, weight, mean, rstd, need_dweight, need_dbias))
