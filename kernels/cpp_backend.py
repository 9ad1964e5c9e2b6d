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


# Attention


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                  is_causal: bool, dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    return tuple(_C().attention_fwd(q, k, v, mask, scale, is_causal, dropout_p, seed))


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  mask: Optional[Tensor], scale: float, is_causal: bool, dropout_p: float,
                  seed: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_C().attention_bwd(do, q, k, v, o, lse, mask, scale, is_causal, dropout_p, seed))


def attention_dropout_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float,
                           device: str = "cpu") -> Tensor:
    """The bool keep-mask (B, HQ, LQ, LK) that attention_fwd/bwd draw for `seed` (Philox,
    csrc/philox.h: the same bits on the CPU and the GPU), moved to `device` (a torch.device
    or its name)."""
    b, hq, lq, lk = shape
    return _C().attention_dropout_mask(seed, b, hq, lq, lk, dropout_p).to(device)


# Softmax


def softmax_fwd(x: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool) -> Tensor:
    return _C().softmax_fwd(x, mask, scale, is_causal)


def softmax_bwd(dy: Tensor, y: Tensor, scale: float) -> Tensor:
    return _C().softmax_bwd(dy, y, scale)


# FFN


def ffn_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            activation: str, dropout_p: float, seed: int, save_pre: bool = True) -> tuple[Tensor, Tensor]:
    return tuple(_C().ffn_fwd(x, w1, b1, w2, b2, activation, dropout_p, seed, save_pre))


def ffn_bwd(dy: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], pre: Tensor, activation: str, dropout_p: float, seed: int
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_C().ffn_bwd(dy, x, w1, b1, w2, b2, pre, activation, dropout_p, seed))


def ffn_dropout_mask(seed: int, shape: tuple[int, ...], dropout_p: float,
                     device: str = "cpu") -> Tensor:
    """The bool keep-mask of a hidden of `shape` (..., F) that ffn_fwd/bwd draw for `seed`
    (Philox, csrc/philox.h: element (i, j) of the (M, F) hidden uses counter i * F + j, the
    same bits on the CPU and the GPU), moved to `device` (a torch.device or its name)."""
    return _C().ffn_dropout_mask(seed, list(shape), dropout_p).to(device)
