"""LayerNorm (+ fused residual add) in Triton: the `triton` backend's layer_norm launchers.

Forward, x (M, N), fp32 math whatever the storage dtype. Rows that fit one block
(N <= _MAX_BLOCK_N) are packed BLOCK_M to a program, a (BLOCK_M, BLOCK_N) tile loaded once and
kept in registers. A wider row gets a program of its own that walks its column blocks three
times (sum, squared deviations, normalize), recomputing h = x + residual from the inputs each
time instead of reading back the h it stored. With a residual, h is
rounded to the storage dtype before it is normalized (the CPU twin in csrc/cpu/layer_norm.cpp
does the same), so backward, which sees the stored h, differentiates exactly the numbers the
forward normalized. mean and rstd are saved in fp32, (M,).

Backward: kernel 1 runs G programs (G = _bwd_groups(M), fixed for a given M, so the result is
deterministic); program g walks its rows [g*R, (g+1)*R) (BLOCK_M at a time when they fit one
block), writes dx (+ dh) per row, and sums
dy * xhat and dy over its rows into an fp32 partial buffer (2, G, N). Kernel 2 reduces the G
partials column-block by column-block, always in group order, into dweight / dbias.

Napkin math (bytes per element, storage dtype of s bytes):
    forward   read x (+ residual) + write y (+ h): 2s (4s with residual); weight/bias are N-sized
    backward  read dy, h (+ dh) + write dx: 3s (4s); the partial buffer is 2*G*N*4 bytes
A wide row (N > _MAX_BLOCK_N) reads x (+ residual) three times in forward and dy, h twice in
backward; those re-reads of a row (<= a few 10s of KB) mostly hit L2.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import alloc
from .dispatch import triton_interpreted

# Widest row held in registers in one block; wider rows loop over column blocks of this size.
# 4096 fp32 values per program = 16 KB of registers at 8 warps (the Triton tutorial's 64 KB
# per-row cap is what the loop removes).
_MAX_BLOCK_N = 4096
# Elements per program in the rows kernels: rows narrower than a block are packed BLOCK_M to a
# program so that a program always has ~4K elements of work (N = 128 would otherwise leave most
# of a 4-warp program idle). It also cuts interpreter time ~20x on the test shapes (615 rows
# of 123: forward 4.5 s -> 0.23 s).
_TILE = 4096


def _config(n: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, single_block, num_warps) for rows of n elements. Untuned defaults:
    no GPU sweep has been run yet."""
    block_n = min(triton.next_power_of_2(n), _MAX_BLOCK_N)
    single = n <= block_n
    block_m = max(1, min(_TILE // block_n, 64)) if single else 1
    return block_m, block_n, single, _num_warps(block_m * block_n)


def _num_warps(elements: int) -> int:
    return min(max(elements // 512, 1), 8)


def _bwd_groups(rows: int, device: torch.device) -> int:
    """Number of row groups for the dweight/dbias partial sums: a function of the row count
    and the device only, so two runs reduce in the same order. Two programs per SM keeps a GPU
    busy while the partial buffer (2 x G x N fp32) stays small; 16 under the interpreter."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 16
    return max(1, min(rows, target))


def interpreter_rounds_bf16(dtype: torch.dtype) -> bool:
    """True when the Triton interpreter would truncate an fp32 -> bf16 cast (seen with triton
    3.9: its cast drops the low 16 bits, 1-ulp errors, biased towards zero; the GPU rounds to
    nearest even). The kernels then round explicitly with rne_bf16 before storing."""
    return dtype == torch.bfloat16 and triton_interpreted()


@triton.jit
def rne_bf16(x, ENABLED: tl.constexpr):
    """fp32 x rounded to the nearest bf16 value (ties to even), still as fp32, when ENABLED, so
    that the interpreter's truncating cast to bf16 is exact; x unchanged otherwise."""
    if ENABLED:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _layer_norm_fwd_rows_kernel(
    X, RES, W, B, Y, H, MEAN, RSTD,        # X, RES, Y, H: (M, N) contiguous; W, B: (N,); MEAN, RSTD: (M,) fp32
    M, N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RNE: tl.constexpr,
):
    """Rows that fit one block: BLOCK_M rows per program, each held in registers."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_N)                                              # (BLOCK_N,)
    mc = cols < N
    m = (rows < M)[:, None] & mc[None, :]                                     # (BLOCK_M, BLOCK_N)
    offs = rows[:, None] * N + cols[None, :]
    h = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        h = h + tl.load(RES + offs, mask=m, other=0.0).to(tl.float32)
        hs = rne_bf16(h, RNE).to(H.dtype.element_ty)
        tl.store(H + offs, hs, mask=m)
        h = hs.to(tl.float32)
    mean = tl.sum(h, axis=1) / N                                              # (BLOCK_M,)
    d = tl.where(m, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)                     # (BLOCK_M,)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, rne_bf16(y, RNE).to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + rows, mean, mask=rows < M)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _layer_norm_fwd_wide_kernel(
    X, RES, W, B, Y, H, MEAN, RSTD,        # as above
    N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_N: tl.constexpr,
    RNE: tl.constexpr,
):
    """Rows wider than one block: one row per program, three walks over its column blocks."""
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        m = c < N
        h = tl.load(X + base + c, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            h = h + tl.load(RES + base + c, mask=m, other=0.0).to(tl.float32)
            hs = rne_bf16(h, RNE).to(H.dtype.element_ty)
            tl.store(H + base + c, hs, mask=m)
            h = hs.to(tl.float32)
        acc += h
    mean = tl.sum(acc, axis=0) / N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        m = c < N
        h = tl.load(X + base + c, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            h = h + tl.load(RES + base + c, mask=m, other=0.0).to(tl.float32)
            h = rne_bf16(h, RNE).to(H.dtype.element_ty).to(tl.float32)
        d = tl.where(m, h - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        m = c < N
        h = tl.load(X + base + c, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            h = h + tl.load(RES + base + c, mask=m, other=0.0).to(tl.float32)
            h = rne_bf16(h, RNE).to(H.dtype.element_ty).to(tl.float32)
        y = (h - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + c, mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + c, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + base + c, rne_bf16(y, RNE).to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_rows_kernel(
    DY, DH, Hx, W, MEAN, RSTD, DX, PDW, PDB,  # DY, DH, Hx, DX: (M, N); PDW, PDB: (G, N) fp32
    M, N, rows_per_group,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, NEED_PARAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RNE: tl.constexpr,
):
    """Rows that fit one block: program g walks its row group BLOCK_M rows at a time and keeps
    the group's dweight / dbias partials in registers."""
    g = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mc = cols < N
    row_start = g * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, M)
    if HAS_W:
        w = tl.load(W + cols, mask=mc, other=0.0).to(tl.float32)[None, :]    # (1, BLOCK_N)
    acc_dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)                                     # (BLOCK_M,)
        mr = rows < row_end
        m = mr[:, None] & mc[None, :]                                         # (BLOCK_M, BLOCK_N)
        offs = rows[:, None] * N + cols[None, :]
        mean = tl.load(MEAN + rows, mask=mr, other=0.0)[:, None]
        rstd = tl.load(RSTD + rows, mask=mr, other=0.0)[:, None]
        dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
        h = tl.load(Hx + offs, mask=m, other=0.0).to(tl.float32)
        xhat = tl.where(m, (h - mean) * rstd, 0.0)
        if HAS_W:
            gr = dy * w
        else:
            gr = dy
        c_gx = (tl.sum(gr * xhat, axis=1) / N)[:, None]
        c_g = (tl.sum(gr, axis=1) / N)[:, None]
        dx = rstd * (gr - c_g - xhat * c_gx)
        if HAS_DH:
            dx += tl.load(DH + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(DX + offs, rne_bf16(dx, RNE).to(DX.dtype.element_ty), mask=m)
        if NEED_PARAMS:
            acc_dw += tl.sum(dy * xhat, axis=0)
            acc_db += tl.sum(dy, axis=0)
    if NEED_PARAMS:
        tl.store(PDW + g * N + cols, acc_dw, mask=mc)
        tl.store(PDB + g * N + cols, acc_db, mask=mc)


@triton.jit
def _layer_norm_bwd_wide_kernel(
    DY, DH, Hx, W, MEAN, RSTD, DX, PDW, PDB,  # as above; PDW, PDB start as zeros
    M, N, rows_per_group,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, NEED_PARAMS: tl.constexpr, BLOCK_N: tl.constexpr,
    RNE: tl.constexpr,
):
    """Rows wider than one block: two walks over each row's column blocks. The partials live in
    the zero-initialised buffer and are updated in place; only program g touches row g of it,
    with the same offsets each time, so no atomics are needed."""
    g = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_start = g * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, M)
    pdw = PDW + g * N                        # (N,) this group's dweight partial
    pdb = PDB + g * N                        # (N,) this group's dbias partial
    for row in range(row_start, row_end):
        base = row * N
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        acc_gx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            dy = tl.load(DY + base + c, mask=m, other=0.0).to(tl.float32)
            h = tl.load(Hx + base + c, mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (h - mean) * rstd, 0.0)
            if HAS_W:
                gr = dy * tl.load(W + c, mask=m, other=0.0).to(tl.float32)
            else:
                gr = dy
            acc_gx += gr * xhat
            acc_g += gr
            if NEED_PARAMS:
                tl.store(pdw + c, tl.load(pdw + c, mask=m, other=0.0) + dy * xhat, mask=m)
                tl.store(pdb + c, tl.load(pdb + c, mask=m, other=0.0) + dy, mask=m)
        c_gx = tl.sum(acc_gx, axis=0) / N
        c_g = tl.sum(acc_g, axis=0) / N
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            dy = tl.load(DY + base + c, mask=m, other=0.0).to(tl.float32)
            h = tl.load(Hx + base + c, mask=m, other=0.0).to(tl.float32)
            xhat = (h - mean) * rstd
            if HAS_W:
                gr = dy * tl.load(W + c, mask=m, other=0.0).to(tl.float32)
            else:
                gr = dy
            dx = rstd * (gr - c_g - xhat * c_gx)
            if HAS_DH:
                dx += tl.load(DH + base + c, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + base + c, rne_bf16(dx, RNE).to(DX.dtype.element_ty), mask=m)


@triton.jit
def _layer_norm_bwd_params_kernel(
    PDW, PDB, DW, DB,                          # PDW, PDB: (G, N) fp32; DW, DB: (N,)
    N, G,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_N: tl.constexpr, RNE: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = c < N
    acc_dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    p_dw = PDW + c                             # walks the G rows (64-bit pointer steps)
    p_db = PDB + c
    for _ in range(0, G):
        if NEED_DW:
            acc_dw += tl.load(p_dw, mask=m, other=0.0)
        if NEED_DB:
            acc_db += tl.load(p_db, mask=m, other=0.0)
        p_dw += N
        p_db += N
    if NEED_DW:
        tl.store(DW + c, rne_bf16(acc_dw, RNE).to(DW.dtype.element_ty), mask=m)
    if NEED_DB:
        tl.store(DB + c, rne_bf16(acc_db, RNE).to(DB.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------
# Launchers (contract in kernels/ops.py)


def _check_2d(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"layer_norm (triton): {name} must be 2-D (M, N), got shape {tuple(t.shape)}")


def _check_vec(name: str, t: Optional[Tensor], n: int, ref: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    if tuple(t.shape) != (n,):
        raise ValueError(f"layer_norm (triton): {name} must have shape ({n},), got {tuple(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise TypeError(f"layer_norm (triton): {name} must have dtype {ref.dtype} on {ref.device}, "
                        f"got {t.dtype} on {t.device}")
    return t.contiguous()


def _check_like(name: str, t: Tensor, ref_name: str, ref: Tensor) -> Tensor:
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"layer_norm (triton): {name} must have the shape of {ref_name} "
                         f"{tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise TypeError(f"layer_norm (triton): {name} must have dtype {ref.dtype} on {ref.device}, "
                        f"got {t.dtype} on {t.device}")
    return t.contiguous()


def layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = LN(h) with h = x (+ residual). x, residual: (M, N); weight, bias: (N,) or None.
    Returns y (M, N), h (M, N) or (0,) without residual, mean and rstd (M,) float32."""
    _check_2d("x", x)
    if not eps > 0:
        raise ValueError(f"layer_norm (triton): eps must be > 0, got {eps}")
    m, n = x.shape
    if n == 0:
        raise ValueError(f"layer_norm (triton): x must have at least one column, got shape {tuple(x.shape)}")
    x = x.contiguous()
    residual = None if residual is None else _check_like("residual", residual, "x", x)
    weight = _check_vec("weight", weight, n, x)
    bias = _check_vec("bias", bias, n, x)

    y = alloc.empty_like(x)                                        # (M, N)
    h = alloc.empty_like(x) if residual is not None else x.new_empty((0,))
    mean = alloc.empty((m,), torch.float32, x.device)              # (M,)
    rstd = alloc.empty((m,), torch.float32, x.device)              # (M,)
    if m == 0:
        return y, h, mean, rstd
    block_m, block_n, single, num_warps = _config(n)
    args = (x, residual if residual is not None else x, weight if weight is not None else x,
            bias if bias is not None else x, y, h if residual is not None else y, mean, rstd)
    flags = dict(HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                 RNE=interpreter_rounds_bf16(x.dtype))
    if single:
        _layer_norm_fwd_rows_kernel[(triton.cdiv(m, block_m),)](
            *args, m, n, float(eps), **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    else:
        _layer_norm_fwd_wide_kernel[(m,)](
            *args, n, float(eps), **flags, BLOCK_N=block_n, num_warps=num_warps)
    return y, h, mean, rstd


def layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, need_dweight: bool, need_dbias: bool
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """dx (M, N) of y = LN(h) (+ dh), and dweight / dbias (N,) when requested, else (0,).
    h: the normalized input (M, N); mean, rstd: (M,) float32 from layer_norm_fwd."""
    _check_2d("h", h)
    m, n = h.shape
    h = h.contiguous()
    dy = _check_like("dy", dy, "h", h)
    dh = None if dh is None else _check_like("dh", dh, "h", h)
    weight = _check_vec("weight", weight, n, h)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.dtype != torch.float32 or tuple(t.shape) != (m,):
            raise ValueError(f"layer_norm (triton): {name} must be float32 of shape ({m},), "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
    mean, rstd = mean.contiguous(), rstd.contiguous()
    need_dweight = bool(need_dweight) and weight is not None
    need_dbias = bool(need_dbias)
    need_params = need_dweight or need_dbias

    dx = alloc.empty_like(h)                                                  # (M, N)
    dw = alloc.empty((n if need_dweight else 0,), h.dtype, h.device)          # (N,) or (0,)
    db = alloc.empty((n if need_dbias else 0,), h.dtype, h.device)            # (N,) or (0,)
    if m == 0:
        return dx, dw.zero_(), db.zero_()
    block_m, block_n, single, num_warps = _config(n)
    groups = _bwd_groups(m, h.device)
    rows_per_group = triton.cdiv(m, groups)
    groups = triton.cdiv(m, rows_per_group)  # no empty group
    # (2, G, N) fp32: [0] dweight partials, [1] dbias partials. The wide path accumulates in
    # place, so it starts from zeros; the rows path overwrites it.
    if need_params:
        partial = (torch.empty if single else torch.zeros)((2, groups, n), dtype=torch.float32,
                                                           device=h.device)
    else:
        partial = (mean, mean)
    args = (dy, dh if dh is not None else dy, h, weight if weight is not None else h, mean, rstd,
            dx, partial[0], partial[1], m, n, rows_per_group)
    flags = dict(HAS_DH=dh is not None, HAS_W=weight is not None, NEED_PARAMS=need_params,
                 RNE=interpreter_rounds_bf16(h.dtype))
    if single:
        _layer_norm_bwd_rows_kernel[(groups,)](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                                               num_warps=num_warps)
    else:
        _layer_norm_bwd_wide_kernel[(groups,)](*args, **flags, BLOCK_N=block_n, num_warps=num_warps)
    if need_params:
        reduce_block = min(triton.next_power_of_2(n), 1024)
        _layer_norm_bwd_params_kernel[(triton.cdiv(n, reduce_block),)](
            partial[0], partial[1], dw if need_dweight else dx, db if need_dbias else dx, n, groups,
            NEED_DW=need_dweight, NEED_DB=need_dbias, BLOCK_N=reduce_block, RNE=flags["RNE"],
            num_warps=_num_warps(reduce_block))
    return dx, dw, db
