"""Scaled + masked softmax in Triton (Megatron's fused kernel, any row length): the `triton`
backend's softmax launchers.

    y = softmax(x * scale + mask) over the last dim         x: (B, H, LQ, LK), y contiguous
    dx = scale * y * (dy - sum(dy * y))                       backward from the saved y

Rows are the (B*H*LQ) last-dim vectors. The mask (bool, True = keep, or x.dtype, added after
scaling) is 4-D (B|1, H|1, LQ|1, LK|1) and broadcast inside the kernel through stride-0
strides: it is never materialized at (B, H, LQ, LK). `is_causal` keeps key k for query q iff
k <= q (top-left). A row with every key masked gives y = 0 (and so dx = 0), never NaN.
x and dy may have any strides (transposed, stride-0 expanded gradients); y and dx are written
contiguous.

Two paths, both fp32 math on storage-dtype loads:
  rows   LK <= _MAX_BLOCK_N: a tile of BLOCK_M rows x BLOCK_N columns held in registers, one
         read of x and one write of y.
  looped LK > _MAX_BLOCK_N: one row at a time in column blocks; pass 1 keeps a running max and
         rescaled sum per lane (online softmax), pass 2 re-reads x and writes y. Backward:
         pass 1 sums dy * y, pass 2 writes dx.
Grids are persistent: _num_programs() programs stride over the row tiles.

Napkin math (storage dtype of s bytes per element, no mask): forward reads x and writes y, 2s
bytes per element (the looped path reads x twice, 3s); backward reads dy and y and writes dx,
3s (looped: 5s). A (1|B, 1|H, 1|LQ, LK) bool mask adds at most 1 byte per element and usually
stays in L2. At LK = 4096, B*H*LQ = 64K rows, bf16: 1 GB per forward, ~0.35 ms at 3 TB/s.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import alloc
from .layer_norm import interpreter_rounds_bf16, rne_bf16

# Longest row held in registers in one block; longer rows take the looped path. Untuned
# default (no GPU sweep yet): 1024 columns keeps register pressure low at 4 warps while a second
# read of a <= 8 KB row hits L1/L2.
_MAX_BLOCK_N = 1024
# Elements per program in the rows path: short rows are packed BLOCK_M to a tile.
_TILE = 4096

_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2


def _config(lk: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, looped, num_warps) for rows of lk elements."""
    block_n = min(triton.next_power_of_2(lk), _MAX_BLOCK_N)
    looped = lk > block_n
    block_m = 1 if looped else max(1, min(_TILE // block_n, 64))
    num_warps = min(max(block_m * block_n // 512, 1), 8)
    return block_m, block_n, looped, num_warps


def _num_programs(tiles: int, device: torch.device) -> int:
    """Persistent grid: a few programs per SM on a GPU, each striding over the row tiles."""
    if device.type == "cuda":
        return max(1, min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(tiles, 16))


@triton.jit
def _row_offsets(rows, H, LQ, s_b, s_h, s_q):
    """Element offset of the start of each row (b, h, q) for a 4-D tensor's strides."""
    q = rows % LQ
    bh = rows // LQ
    return (bh // H) * s_b + (bh % H) * s_h + q * s_q


@triton.jit
def _scores(X, MASK, x_row, m_row, q, cols, valid, scale, xs_k, ms_k,
            MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """x * scale + mask for a tile, fp32, -inf where masked out or past LK. x_row, m_row, q:
    per-row offsets / query index broadcastable against cols; valid: in-bounds mask."""
    s = tl.load(X + x_row + cols * xs_k, mask=valid, other=0.0).to(tl.float32) * scale
    if MASK_KIND == 2:
        s = s + tl.load(MASK + m_row + cols * ms_k, mask=valid, other=0.0).to(tl.float32)
    keep = valid
    if MASK_KIND == 1:
        keep = keep & (tl.load(MASK + m_row + cols * ms_k, mask=valid, other=0) != 0)
    if IS_CAUSAL:
        keep = keep & (cols <= q)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _softmax_fwd_rows_kernel(
    X, MASK, Y,                            # X: (B, H, LQ, LK) strided; MASK: broadcast strides; Y: (R, LK)
    R, H, LQ, LK, scale,
    xs_b, xs_h, xs_q, xs_k, ms_b, ms_h, ms_q, ms_k,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)[None, :]                                     # (1, BLOCK_N)
    n_tiles = tl.cdiv(R, BLOCK_M)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)            # (BLOCK_M,)
        in_rows = rows < R
        x_row = _row_offsets(rows, H, LQ, xs_b, xs_h, xs_q)[:, None]
        m_row = _row_offsets(rows, H, LQ, ms_b, ms_h, ms_q)[:, None]
        valid = in_rows[:, None] & (cols < LK)                                # (BLOCK_M, BLOCK_N)
        s = _scores(X, MASK, x_row, m_row, (rows % LQ)[:, None], cols, valid, scale, xs_k,
                    ms_k, MASK_KIND, IS_CAUSAL)
        m = tl.max(s, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)                              # fully masked row
        p = tl.exp(s - m[:, None])
        l = tl.sum(p, axis=1)
        y = p / tl.where(l == 0.0, 1.0, l)[:, None]                           # l == 0: row -> 0
        tl.store(Y + rows[:, None] * LK + cols, rne_bf16(y, RNE).to(Y.dtype.element_ty), mask=valid)


@triton.jit
def _softmax_fwd_looped_kernel(
    X, MASK, Y,                            # as above
    R, H, LQ, LK, scale,
    xs_b, xs_h, xs_q, xs_k, ms_b, ms_h, ms_q, ms_k,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, RNE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols0 = tl.arange(0, BLOCK_N)
    for row in range(tl.program_id(0), R, tl.num_programs(0)):
        row = tl.cast(row, tl.int64)
        q = row % LQ
        x_row = _row_offsets(row, H, LQ, xs_b, xs_h, xs_q)
        m_row = _row_offsets(row, H, LQ, ms_b, ms_h, ms_q)
        # Pass 1: per-lane running max and sum rescaled to it (online softmax).
        m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, LK, BLOCK_N):
            cols = start + cols0
            s = _scores(X, MASK, x_row, m_row, q, cols, cols < LK, scale, xs_k, ms_k,
                        MASK_KIND, IS_CAUSAL)
            m_new = tl.maximum(m_i, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.exp(s - m_safe)
            m_i = m_new
        m = tl.max(m_i, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)                              # fully masked row
        l = tl.sum(l_i * tl.exp(m_i - m), axis=0)
        inv_l = 1.0 / tl.where(l == 0.0, 1.0, l)                              # l == 0: row -> 0
        # Pass 2: normalize and write.
        for start in range(0, LK, BLOCK_N):
            cols = start + cols0
            valid = cols < LK
            s = _scores(X, MASK, x_row, m_row, q, cols, valid, scale, xs_k, ms_k,
                        MASK_KIND, IS_CAUSAL)
            y = tl.exp(s - m) * inv_l
            tl.store(Y + row * LK + cols, rne_bf16(y, RNE).to(Y.dtype.element_ty), mask=valid)


@triton.jit
def _softmax_bwd_rows_kernel(
    DY, Yp, DX,                            # DY, Yp: (B, H, LQ, LK) strided; DX: (R, LK)
    R, H, LQ, LK, scale,
    ds_b, ds_h, ds_q, ds_k, ys_b, ys_h, ys_q, ys_k,
    RNE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)[None, :]
    n_tiles = tl.cdiv(R, BLOCK_M)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        rows = tl.cast(tile, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = (rows < R)[:, None] & (cols < LK)
        d_row = _row_offsets(rows, H, LQ, ds_b, ds_h, ds_q)[:, None]
        y_row = _row_offsets(rows, H, LQ, ys_b, ys_h, ys_q)[:, None]
        dy = tl.load(DY + d_row + cols * ds_k, mask=valid, other=0.0).to(tl.float32)
        y = tl.load(Yp + y_row + cols * ys_k, mask=valid, other=0.0).to(tl.float32)
        dot = tl.sum(dy * y, axis=1)[:, None]
        dx = scale * y * (dy - dot)
        tl.store(DX + rows[:, None] * LK + cols, rne_bf16(dx, RNE).to(DX.dtype.element_ty), mask=valid)


@triton.jit
def _softmax_bwd_looped_kernel(
    DY, Yp, DX,                            # as above
    R, H, LQ, LK, scale,
    ds_b, ds_h, ds_q, ds_k, ys_b, ys_h, ys_q, ys_k,
    RNE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols0 = tl.arange(0, BLOCK_N)
    for row in range(tl.program_id(0), R, tl.num_programs(0)):
        row = tl.cast(row, tl.int64)
        d_row = _row_offsets(row, H, LQ, ds_b, ds_h, ds_q)
        y_row = _row_offsets(row, H, LQ, ys_b, ys_h, ys_q)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for start in range(0, LK, BLOCK_N):
            cols = start + cols0
            valid = cols < LK
            dy = tl.load(DY + d_row + cols * ds_k, mask=valid, other=0.0).to(tl.float32)
            y = tl.load(Yp + y_row + cols * ys_k, mask=valid, other=0.0).to(tl.float32)
            acc += dy * y
        dot = tl.sum(acc, axis=0)
        for start in range(0, LK, BLOCK_N):
            cols = start + cols0
            valid = cols < LK
            dy = tl.load(DY + d_row + cols * ds_k, mask=valid, other=0.0).to(tl.float32)
            y = tl.load(Yp + y_row + cols * ys_k, mask=valid, other=0.0).to(tl.float32)
            dx = scale * y * (dy - dot)
            tl.store(DX + row * LK + cols, rne_bf16(dx, RNE).to(DX.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------
# Launchers (contract in kernels/ops.py)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_x(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"softmax (triton): {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"softmax (triton): {name} must be 4-D (B, H, LQ, LK), got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"softmax (triton): {name} must be float16, bfloat16 or float32, got {t.dtype}")


def softmax_fwd(x: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool) -> Tensor:
    """softmax(x * scale + mask) over the last dim. x: (B, H, LQ, LK), any strides; mask: None
    or 4-D (B|1, H|1, LQ|1, LK|1), bool (True = keep) or x.dtype (added). Returns y (B, H, LQ,
    LK) contiguous, 0 on rows with every key masked."""
    _check_x("x", x)
    b, h, lq, lk = x.shape
    if mask is None:
        kind, m = _MASK_NONE, x
        m_strides = (0, 0, 0, 0)
    else:
        if mask.dim() != 4 or any(md not in (1, xd) for md, xd in zip(mask.shape, x.shape)):
            raise ValueError(f"softmax (triton): mask must be 4-D and broadcast to x {tuple(x.shape)} "
                             f"as (B|1, H|1, LQ|1, LK|1), got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool and mask.dtype != x.dtype:
            raise TypeError(f"softmax (triton): mask must be bool or {x.dtype}, got {mask.dtype}")
        if mask.device != x.device:
            raise ValueError(f"softmax (triton): mask must be on {x.device}, got {mask.device}")
        m = mask.expand(b, h, lq, lk)  # a view with stride 0 on the broadcast dims
        if mask.dtype == torch.bool:
            kind, m = _MASK_BOOL, m.view(torch.uint8)
        else:
            kind = _MASK_FLOAT
        m_strides = m.stride()
    y = alloc.empty((b, h, lq, lk), x.dtype, x.device)
    rows = b * h * lq
    if rows == 0 or lk == 0:
        return y
    block_m, block_n, looped, num_warps = _config(lk)
    args = (x, m, y, rows, h, lq, lk, float(scale), *x.stride(), *m_strides)
    flags = dict(MASK_KIND=kind, IS_CAUSAL=bool(is_causal), RNE=interpreter_rounds_bf16(x.dtype))
    if looped:
        _softmax_fwd_looped_kernel[(_num_programs(rows, x.device),)](
            *args, **flags, BLOCK_N=block_n, num_warps=num_warps)
    else:
        grid = (_num_programs(triton.cdiv(rows, block_m), x.device),)
        _softmax_fwd_rows_kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                                       num_warps=num_warps)
    return y


def softmax_bwd(dy: Tensor, y: Tensor, scale: float) -> Tensor:
    """dx = scale * y * (dy - sum(dy * y, -1)). dy, y: (B, H, LQ, LK), any strides (a stride-0
    expanded dy is read as such). Returns dx (B, H, LQ, LK) contiguous."""
    _check_x("y", y)
    _check_x("dy", dy)
    if dy.shape != y.shape or dy.dtype != y.dtype or dy.device != y.device:
        raise ValueError(f"softmax (triton): dy must match y ({tuple(y.shape)}, {y.dtype}, {y.device}), "
                         f"got ({tuple(dy.shape)}, {dy.dtype}, {dy.device})")
    b, h, lq, lk = y.shape
    dx = alloc.empty((b, h, lq, lk), y.dtype, y.device)
    rows = b * h * lq
    if rows == 0 or lk == 0:
        return dx
    block_m, block_n, looped, num_warps = _config(lk)
    args = (dy, y, dx, rows, h, lq, lk, float(scale), *dy.stride(), *y.stride())
    rne = interpreter_rounds_bf16(y.dtype)
    if looped:
        _softmax_bwd_looped_kernel[(_num_programs(rows, y.device),)](
            *args, RNE=rne, BLOCK_N=block_n, num_warps=num_warps)
    else:
        grid = (_num_programs(triton.cdiv(rows, block_m), y.device),)
        _softmax_bwd_rows_kernel[grid](*args, RNE=rne, BLOCK_M=block_m, BLOCK_N=block_n,
                                       num_warps=num_warps)
    return dx
