"""The position-wise feed-forward block in Triton: the `triton` backend's ffn launchers.

    pre    = x w1ᵀ + b1                              (M, F1)   F1 = F, or 2F for swiglu
    hidden = dropout(act(pre))                       (M, F)    act(pre) = silu(gate) * up for swiglu
    y      = hidden w2ᵀ + b2                         (M, C)

Every product is one tiled GEMM kernel, _ffn_gemm_kernel, C = A · B with A (M, K) and B (K, N)
read through arbitrary strides (so transposes and stride-0 expanded gradients cost no copy),
fp32 accumulation, int64 offsets, masked loads for any M, N, K, grouped launch order (GROUP_M
rows of tiles share their B panel in L2) and one of three epilogues:
    _EPI_BIAS     C = acc (+ bias[n])                                  second GEMM, dx, dW
    _EPI_ACT_FWD  pre = acc + b1 (stored, rounded to the storage dtype); hidden =
                  dropout(act(pre as stored)) -> C. For swiglu the program accumulates two
                  tiles, the gate columns n and the up columns F + n of w1, so it can write
                  hidden = silu(gate) * up for its columns at once.
    _EPI_ACT_BWD  acc = dHidden tile; dropout mask and act'(pre) applied -> d_pre (both halves
                  for swiglu), and hidden recomputed from pre (dropout included) -> HID.
Backward (5 GEMM launches):
    d_pre  = act'(pre) * dropout(dy · w2)        _EPI_ACT_BWD, also writes hidden (M, F)
    dw2    = dyᵀ · hidden,  db2 = Σ_m dy          _EPI_BIAS + the A row sums (ROWSUM)
    dw1    = d_preᵀ · x,    db1 = Σ_m d_pre       _EPI_BIAS + ROWSUM
    dx     = d_pre · w1                           _EPI_BIAS
Hidden is not saved by forward (the contract saves only `pre`); backward's first GEMM
recomputes it from `pre` in its epilogue, where `pre` is loaded anyway, and writes it once
(M x F, storage dtype) for the dw2 GEMM, instead of re-deriving it in every dw2 tile's loads.

Dropout: keep = tl.rand(seed, m * F + f) >= p on the hidden (M, F), kept values scaled by
1 / (1 - p); the same (seed, offset) pairs in forward, backward and ffn_dropout_mask.

Napkin math: each GEMM is 2·M·C·F FLOPs (the first forward one 2·M·C·2F for swiglu); forward
2 GEMMs, backward 4 (+ the epilogue's recompute): ~6·M·C·F·(1 + swiglu) FLOPs per step. At
M = 16K, C = 4096, F = 16384 that is 4.4 TFLOP per forward+backward, ~6 ms at 800 TFLOP/s.
Extra bytes over plain GEMMs: forward writes pre (M·F1) next to hidden where a backward will
run (save_pre), backward writes hidden once more (M·F).

Dtypes: fp16 / bf16 / fp32 storage, fp32 accumulation. fp32 dots use TF32 only when
torch.backends.cuda.matmul.allow_tf32 is set (PyTorch's own rule), otherwise IEEE fp32.
Under TRITON_INTERPRET=1, tl.dot with bf16 operands returns garbage (see
/work/shared/ENVIRONMENT.md), so bf16 operands are cast to fp32 before the dot there
(constexpr DOT_F32); fp16 and fp32 dots are used as they are.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import alloc
from .dispatch import triton_interpreted
from .layer_norm import interpreter_rounds_bf16, rne_bf16

ACTIVATIONS: dict[str, int] = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "swiglu": 3}
_EPI_BIAS, _EPI_ACT_FWD, _EPI_ACT_BWD = 0, 1, 2
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

@triton.jit
def _tanh(u):
    # tanh via exp; exp(-2u) overflows to inf for u << 0, giving -1 as it should.
    return 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0


@triton.jit
def _act_fwd(a, up, ACT: tl.constexpr):
    """act(a) in fp32 (up: the swiglu up projection, unused otherwise)."""
    if ACT == 0:
        h = tl.maximum(a, 0.0)
    elif ACT == 1:
        h = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))                  # 1 / sqrt(2)
    elif ACT == 2:
        h = 0.5 * a * (1.0 + _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))  # sqrt(2 / pi)
    else:
        h = a * tl.sigmoid(a) * up
    return h


@triton.jit
def _gemm_tile(A, B, offs_m, offs_n, M, N, K, s_am, s_ak, s_bk, s_bn, F,
               DUAL: tl.constexpr, ROWSUM: tl.constexpr, DOT_F32: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The K loop of one (BLOCK_M, BLOCK_N) tile, fp32 accumulation. Returns
    acc = A[offs_m, :] · B[:, offs_n], acc2 = A[offs_m, :] · B[:, F + offs_n] (DUAL: the swiglu
    up half, sharing each loaded A block; zeros otherwise) and the row sums of A[offs_m, :]
    (ROWSUM; zeros otherwise)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None] * s_am + offs_k[None, :] * s_ak                # (BLOCK_M, BLOCK_K)
    b_ptrs = B + offs_k[:, None] * s_bk + offs_n[None, :] * s_bn                # (BLOCK_K, BLOCK_N)
    mm = (offs_m < M)[:, None]
    mn = (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mk = (k + offs_k) < K
        a = tl.load(a_ptrs, mask=mm & mk[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mk[:, None] & mn, other=0.0)
        if ROWSUM:
            rsum += tl.sum(a.to(tl.float32), axis=1)
        if DOT_F32:
            # Interpreter only: bf16 tl.dot is wrong under TRITON_INTERPRET=1, fp32 is right.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if DUAL:
            b2 = tl.load(b_ptrs + F * s_bn, mask=mk[:, None] & mn, other=0.0)
            if DOT_F32:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a, b2, acc2, input_precision=PRECISION)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    return acc, acc2, rsum


@triton.jit
def _ffn_gemm_kernel(
    A, B, C, BIAS, PRE, HID, ROWSUM_OUT,
    M, N, K, F,
    s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
    seed, p_drop, drop_scale,
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    STORE_PRE: tl.constexpr, ROWSUM: tl.constexpr, DOT_F32: tl.constexpr,
    PRECISION: tl.constexpr, RNE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = A (M, K) · B (K, N) with the EPILOGUE described in the module docstring.
    _EPI_ACT_FWD: N = F, C = hidden (M, F), PRE = pre (M, F1) written where STORE_PRE, BIAS =
    b1 (F1,).
    _EPI_ACT_BWD: N = F, C = d_pre (M, F1), PRE = pre read, HID = hidden (M, F) written.
    ROWSUM: ROWSUM_OUT (M,) = row sums of A, written by the programs of column tile 0."""
    # Grouped launch order: GROUP_M tile-rows walk the tile-columns together.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_size
    pid_n = (pid % num_in_group) // group_size

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)          # (BLOCK_M,)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)          # (BLOCK_N,)
    acc, acc_up, rsum = _gemm_tile(A, B, offs_m, offs_n, M, N, K, s_am, s_ak, s_bk, s_bn, F,
                                   EPILOGUE == 1 and ACT == 3, ROWSUM, DOT_F32, PRECISION,
                                   BLOCK_M, BLOCK_N, BLOCK_K)
    if ROWSUM:
        if pid_n == 0:
            tl.store(ROWSUM_OUT + offs_m, rne_bf16(rsum, RNE).to(ROWSUM_OUT.dtype.element_ty),
                     mask=offs_m < M)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]

    if EPILOGUE == 0:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        c_ptrs = C + offs_m[:, None] * s_cm + offs_n[None, :] * s_cn
        tl.store(c_ptrs, rne_bf16(acc, RNE).to(C.dtype.element_ty), mask=mask)
    else:
        if ACT == 3:
            F1 = 2 * F
        else:
            F1 = F
        pre_ptrs = PRE + offs_m[:, None] * F1 + offs_n[None, :]               # gate / only half
        hid_offs = offs_m[:, None] * F + offs_n[None, :]                      # (BLOCK_M, BLOCK_N) in (M, F)
        if DROPOUT:
            keep = tl.rand(seed, hid_offs) >= p_drop
        if EPILOGUE == 1:
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            pre = rne_bf16(acc, RNE).to(PRE.dtype.element_ty)
            if STORE_PRE:
                tl.store(pre_ptrs, pre, mask=mask)
            a = pre.to(tl.float32)
            up = a
            if ACT == 3:
                if HAS_BIAS:
                    acc_up += tl.load(BIAS + F + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                pre_up = rne_bf16(acc_up, RNE).to(PRE.dtype.element_ty)
                if STORE_PRE:
                    tl.store(pre_ptrs + F, pre_up, mask=mask)
                up = pre_up.to(tl.float32)
            h = _act_fwd(a, up, ACT)
            if DROPOUT:
                h = tl.where(keep, h * drop_scale, 0.0)
            tl.store(C + hid_offs, rne_bf16(h, RNE).to(C.dtype.element_ty), mask=mask)
        else:
            dh = acc                                                          # d hidden (after dropout)
            if DROPOUT:
                dh = tl.where(keep, dh * drop_scale, 0.0)
            a = tl.load(pre_ptrs, mask=mask, other=0.0).to(tl.float32)
            dpre_ptrs = C + offs_m[:, None] * F1 + offs_n[None, :]
            if ACT == 0:
                h = tl.maximum(a, 0.0)
                tl.store(dpre_ptrs, rne_bf16(tl.where(a > 0.0, dh, 0.0), RNE).to(C.dtype.element_ty),
                         mask=mask)
            elif ACT == 1:
                cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
                pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327                   # 1 / sqrt(2 pi)
                h = a * cdf
                tl.store(dpre_ptrs, rne_bf16(dh * (cdf + a * pdf), RNE).to(C.dtype.element_ty),
                         mask=mask)
            elif ACT == 2:
                t = _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a))
                h = 0.5 * a * (1.0 + t)
                dt = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * a * a)
                d = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * dt
                tl.store(dpre_ptrs, rne_bf16(dh * d, RNE).to(C.dtype.element_ty), mask=mask)
            else:
                up = tl.load(pre_ptrs + F, mask=mask, other=0.0).to(tl.float32)
                sg = tl.sigmoid(a)
                silu = a * sg
                h = silu * up
                d_gate = dh * up * sg * (1.0 + a * (1.0 - sg))
                tl.store(dpre_ptrs, rne_bf16(d_gate, RNE).to(C.dtype.element_ty), mask=mask)
                tl.store(dpre_ptrs + F, rne_bf16(dh * silu, RNE).to(C.dtype.element_ty), mask=mask)
            if DROPOUT:
                h = tl.where(keep, h * drop_scale, 0.0)
            tl.store(HID + hid_offs, rne_bf16(h, RNE).to(HID.dtype.element_ty), mask=mask)


def _gpu_configs() -> list:
    """Autotune space (GPU only): the Triton matmul tutorial's configs, trimmed. No sweep on a
    GPU yet; the autotuner picks per (M, N, K) at first use."""
    shapes = [(128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 4, 4),
              (128, 256, 64, 8, 3), (64, 32, 32, 2, 5)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in shapes]


# Shared memory per block, opt-in maximum: sm_90 (H100/H200) 227 KiB, sm_80 (A100) 163 KiB.
_SM90_SHARED_BYTES = 232448


def _shared_bytes_limit() -> int:
    """The current GPU's shared memory per block; the sm_90 figure with no GPU (the AOT compile
    check in tests/test_triton_aot.py runs this pruning on the CPU for an sm_90 target)."""
    if not torch.cuda.is_available():
        return _SM90_SHARED_BYTES
    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
    return props["max_shared_mem"]


def _prune_gemm_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Drop the tiles that cannot run or that spill, before the autotuner benchmarks them.
    Figures from ptxas (tests/test_triton_aot.py, FUSEDFORMER_AOT_SWEEP=1, sm_90, triton 3.9):
    - shared memory: num_stages buffers of an A tile and one B tile (two for swiglu's forward,
      which loads the gate and the up columns) must fit; swiglu bf16 at 128 x 256 x 64 with 3
      stages asks 240 KiB (> 227);
    - the activation-backward epilogue (act', dropout, the hidden recompute) at 128 x 256:
      255 registers and 11.3 KB of spill stores (fp16 gelu + dropout); tiles up to 128 x 128;
    - fp32 operands without tensor cores: 128 x 128 spilled 2.4 KB (swiglu backward), 128 x 64
      at most 152 B; tiles up to 128 x 64.
    Keeps the smallest config if nothing is left."""
    elem = named_args["A"].element_size()
    epilogue, act = kwargs.get("EPILOGUE"), kwargs.get("ACT")
    dual = epilogue == _EPI_ACT_FWD and act == ACTIVATIONS["swiglu"]
    max_tile = 128 * 64 if elem == 4 else 128 * 128 if epilogue == _EPI_ACT_BWD else 128 * 256
    limit = _shared_bytes_limit()

    def fits(c) -> bool:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        smem = c.num_stages * (bm * bk + (2 if dual else 1) * bk * bn) * elem
        return smem <= limit and bm * bn <= max_tile

    kept = [c for c in configs if fits(c)]
    smallest = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)
    return kept or [smallest]


# Keyed by the shape and by the epilogue, which changes the tile's register needs (swiglu's
# forward holds two accumulators).
_ffn_gemm_autotuned = triton.autotune(configs=_gpu_configs(),
                                      key=["M", "N", "K", "EPILOGUE", "ACT", "ROWSUM"],
                                      prune_configs_by={"early_config_prune": _prune_gemm_configs},
                                      )(_ffn_gemm_kernel)

# On a GPU with FUSEDFORMER_AUTOTUNE=0 (make gpu-check's test run: every test shape would
# otherwise benchmark every config): one tile that fits every epilogue and dtype without
# spilling (ptxas, sm_90, tests/test_triton_aot.py's fixed-tile cases: at most 203
# registers, no spills, 72 KiB of shared memory).
_FIXED_GPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8,
                     "num_warps": 4, "num_stages": 3}

# Under the interpreter: one small fixed tile. Interpreted time grows with the number of
# programs and K steps, not the tile area: check_ffn(m=67, c=40, f=136, bf16) took 4.6 s with
# 32x32x32 tiles and 2.2 s with these; the test shapes are still ragged in M, N and K, and
# GROUP_M = 2 leaves a ragged last group of tile-rows (M = 67 -> 3 tile-rows).
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 2}


@triton.jit
def _dropout_mask_kernel(KEEP, total, seed, p_drop, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs) >= p_drop
    tl.store(KEEP + offs, keep.to(tl.uint8), mask=offs < total)


# ----------------------------------------------------------------------------------------
# Launchers (contract in kernels/ops.py)


def _gemm(a: Tensor, b: Tensor, c: Tensor, *, a_strides: tuple[int, int],
          b_strides: tuple[int, int], m: int, n: int, k: int, epilogue: int = _EPI_BIAS,
          bias: Optional[Tensor] = None, pre: Optional[Tensor] = None,
          hid: Optional[Tensor] = None, rowsum: Optional[Tensor] = None, f: int = 0,
          act: int = 0, dropout_p: float = 0.0, seed: int = 0) -> None:
    """One launch of _ffn_gemm_kernel: c = a · b (M, N) with the given epilogue."""
    if m == 0 or n == 0:
        return
    dtype = a.dtype
    interp = triton_interpreted()
    precision = "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    args = (a, b, c, bias if bias is not None else c, pre if pre is not None else c,
            hid if hid is not None else c, rowsum if rowsum is not None else c,
            m, n, k, f, *a_strides, *b_strides, *c.stride(),
            seed, float(dropout_p), 1.0 / (1.0 - dropout_p))
    flags = dict(EPILOGUE=epilogue, ACT=act, HAS_BIAS=bias is not None, DROPOUT=dropout_p > 0.0,
                 STORE_PRE=pre is not None, ROWSUM=rowsum is not None,
                 DOT_F32=interp and dtype == torch.bfloat16, PRECISION=precision,
                 RNE=interpreter_rounds_bf16(dtype))
    if interp or os.environ.get("FUSEDFORMER_AUTOTUNE", "1") == "0":
        cfg = _INTERPRETER_CONFIG if interp else _FIXED_GPU_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _ffn_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _ffn_gemm_autotuned[grid](*args, **flags)


def _check_args(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                activation: str, dropout_p: float) -> tuple[int, int, int, int]:
    """(M, C, F, F1) after checking the launcher's arguments."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"ffn (triton): activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"ffn (triton): dropout_p must be in [0, 1), got {dropout_p}")
    if x.dim() != 2:
        raise ValueError(f"ffn (triton): x must be 2-D (M, C), got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"ffn (triton): x must be float16, bfloat16 or float32, got {x.dtype}")
    m, c = x.shape
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"ffn (triton): {name} must have dtype {x.dtype} on {x.device}, "
                            f"got {t.dtype} on {t.device}")
    if w1.dim() != 2 or w1.shape[1] != c:
        raise ValueError(f"ffn (triton): w1 must be (F1, {c}), got {tuple(w1.shape)}")
    f1 = w1.shape[0]
    if activation == "swiglu" and f1 % 2:
        raise ValueError(f"ffn (triton): w1 must have an even number of rows for swiglu, got {tuple(w1.shape)}")
    f = f1 // 2 if activation == "swiglu" else f1
    if tuple(w2.shape) != (c, f):
        raise ValueError(f"ffn (triton): w2 must be ({c}, {f}), got {tuple(w2.shape)}")
    if b1 is not None and tuple(b1.shape) != (f1,):
        raise ValueError(f"ffn (triton): b1 must be ({f1},), got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (c,):
        raise ValueError(f"ffn (triton): b2 must be ({c},), got {tuple(b2.shape)}")
    return m, c, f, f1


def ffn_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
            activation: str, dropout_p: float, seed: int, save_pre: bool = True) -> tuple[Tensor, Tensor]:
    """y = dropout(act(x w1ᵀ + b1)) w2ᵀ + b2. x: (M, C); w1: (F1, C); w2: (C, F); biases or
    None. Returns y (M, C) and pre = x w1ᵀ + b1 (M, F1), saved for backward; with save_pre
    False, (0, F1) and never stored."""
    m, c, f, f1 = _check_args(x, w1, b1, w2, b2, activation, dropout_p)
    b1 = None if b1 is None else b1.contiguous()
    b2 = None if b2 is None else b2.contiguous()
    y = alloc.empty((m, c), x.dtype, x.device)                     # (M, C)
    pre = alloc.empty((m if save_pre else 0, f1), x.dtype, x.device)  # (M, F1)
    hidden = alloc.empty((m, f), x.dtype, x.device)                # (M, F) scratch
    act = ACTIVATIONS[activation]
    # hidden = dropout(act(x · w1ᵀ + b1)), pre written on the way: B = w1ᵀ (C, F1).
    _gemm(x, w1, hidden, a_strides=x.stride(), b_strides=(w1.stride(1), w1.stride(0)),
          m=m, n=f, k=c, epilogue=_EPI_ACT_FWD, bias=b1, pre=pre if save_pre else None, f=f,
          act=act, dropout_p=dropout_p, seed=seed)
    # y = hidden · w2ᵀ + b2: B = w2ᵀ (F, C).
    _gemm(hidden, w2, y, a_strides=hidden.stride(), b_strides=(w2.stride(1), w2.stride(0)),
          m=m, n=c, k=f, bias=b2)
    return y, pre


def ffn_bwd(dy: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor], pre: Tensor, activation: str, dropout_p: float, seed: int
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ffn_fwd. dy: (M, C), any strides; pre: (M, F1) from ffn_fwd. Returns dx
    (M, C), dw1 (F1, C), db1 (F1,), dw2 (C, F), db2 (C,); db1 / db2 are (0,) when the bias
    is None."""
    m, c, f, f1 = _check_args(x, w1, b1, w2, b2, activation, dropout_p)
    if tuple(dy.shape) != (m, c) or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"ffn (triton): dy must be ({m}, {c}) {x.dtype} on {x.device}, got "
                         f"{tuple(dy.shape)} {dy.dtype} on {dy.device}")
    if tuple(pre.shape) != (m, f1) or pre.dtype != x.dtype:
        raise ValueError(f"ffn (triton): pre must be ({m}, {f1}) {x.dtype}, got {tuple(pre.shape)} {pre.dtype}")
    pre = pre.contiguous()
    dx = alloc.empty((m, c), x.dtype, x.device)                    # (M, C)
    dw1 = alloc.empty((f1, c), x.dtype, x.device)                  # (F1, C)
    dw2 = alloc.empty((c, f), x.dtype, x.device)                   # (C, F)
    db1 = alloc.empty((f1,) if b1 is not None else (0,), x.dtype, x.device)
    db2 = alloc.empty((c,) if b2 is not None else (0,), x.dtype, x.device)
    d_pre = alloc.empty((m, f1), x.dtype, x.device)                # (M, F1) scratch
    hidden = alloc.empty((m, f), x.dtype, x.device)                # (M, F) scratch
    if m == 0:
        return dx, dw1.zero_(), db1.zero_(), dw2.zero_(), db2.zero_()
    # d_pre = act'(pre) * dropout(dy · w2), hidden recomputed: B = w2 (C, F).
    _gemm(dy, w2, d_pre, a_strides=dy.stride(), b_strides=w2.stride(), m=m, n=f, k=c,
          epilogue=_EPI_ACT_BWD, pre=pre, hid=hidden, f=f, act=ACTIVATIONS[activation],
          dropout_p=dropout_p, seed=seed)
    # dw2 = dyᵀ · hidden (C, F), db2 = row sums of dyᵀ.
    _gemm(dy, hidden, dw2, a_strides=(dy.stride(1), dy.stride(0)), b_strides=hidden.stride(),
          m=c, n=f, k=m, rowsum=db2 if b2 is not None else None)
    # dw1 = d_preᵀ · x (F1, C), db1 = row sums of d_preᵀ.
    _gemm(d_pre, x, dw1, a_strides=(d_pre.stride(1), d_pre.stride(0)), b_strides=x.stride(),
          m=f1, n=c, k=m, rowsum=db1 if b1 is not None else None)
    # dx = d_pre · w1 (M, C).
    _gemm(d_pre, w1, dx, a_strides=d_pre.stride(), b_strides=w1.stride(), m=m, n=c, k=f1)
    return dx, dw1, db1, dw2, db2


def ffn_dropout_mask(seed: int, shape: tuple[int, int], dropout_p: float,
                     device: torch.device | str) -> Tensor:
    """The keep-mask (M, F) bool that ffn_fwd / ffn_bwd draw for this seed and dropout_p: the
    same tl.rand(seed, m * F + f) >= p, so tests can hand it to the oracle (ffn_ref's
    dropout_mask)."""
    if len(shape) != 2:
        raise ValueError(f"ffn_dropout_mask: shape must be (M, F), got {tuple(shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"ffn_dropout_mask: dropout_p must be in [0, 1), got {dropout_p}")
    keep = alloc.empty(tuple(shape), torch.uint8, device)
    total = math.prod(shape)
    if total:
        block = 4096
        _dropout_mask_kernel[(triton.cdiv(total, block),)](keep, total, int(seed), float(dropout_p),
                                                         BLOCK=block)
    return keep.view(torch.bool)
