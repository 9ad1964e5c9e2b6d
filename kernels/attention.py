"""FlashAttention-2 in Triton: forward, backward and the dropout keep-mask, with launchers.

Launchers (the contract in kernels/ops.py; tensors in, tensors out, no autograd):
    attention_fwd(q, k, v, mask, scale, is_causal, dropout_p, seed) -> (o, lse)
    attention_bwd(do, q, k, v, o, lse, mask, scale, is_causal, dropout_p, seed) -> (dq, dk, dv)
    attention_dropout_mask(seed, shape, dropout_p, device) -> keep (B, HQ, LQ, LK) bool

Shapes: q, o, do: (B, HQ, LQ, D); k, v: (B, HKV, LK, D), HQ % HKV == 0, query head h reads kv
head h // (HQ // HKV); lse: (B, HQ, LQ) float32, natural log. Any strides (the kernels take
every stride, so transposed views and stride-0 expanded gradients are read correctly).

Algorithm (Dao, "FlashAttention-2", 2023):
  forward, one program per (query block of BLOCK_M rows, b, h): walk the key blocks keeping
    the running max m (base-2 units: log2(e) is folded into the scale so exp2 replaces exp),
    the running sum l and the fp32 accumulator acc; rescale by exp2(m_old - m_new) per block;
    o = acc / l, lse = (m + log2 l) * ln 2. Causal: key blocks left of the diagonal run without
    the causal compare, blocks on the diagonal apply it, blocks right of it are never visited
    (the loop bound). A row with every key masked has l = 0: o = 0, lse = -inf.
  split-KV (FlashDecoding), when B · HQ · query blocks leave SMs idle (decoding): each query
    block's key blocks cut into num_splits consecutive ranges, one program each, writing that
    range's o and lse in fp32; _attn_fwd_combine_kernel merges them by lse. The count is
    csrc/attention.h's rule (num_splits_heuristic), so all three forwards split alike.
  backward: (1) Delta = rowsum(dO * O) (fp32); (2) one program per (key block, b, kv head)
    loops over the query heads of its group and their query blocks, recomputes P = exp(S - lse)
    and accumulates dV = Pᵀ dO and dK = scale · dSᵀ Q with dS = P * (dP - Delta), dP = dO Vᵀ;
    (3) one program per (query block, b, h) loops over key blocks for dQ = scale · dS K. No
    atomics: deterministic. exp(S - lse) is guarded where lse = -inf, so a fully masked row
    contributes zero gradient, never NaN.
  dropout: keep(b, h, i, j) = tl.rand(seed, ((b * HQ + h) * LQ + i) * LK + j) >= p, the offset
    in int64 (unique for every element of any realistic shape), kept probabilities scaled by
    1 / (1 - p); forward, backward and attention_dropout_mask draw the same numbers.

FLOPs (the roofline's numerator): forward 4 · B · HQ · LQ · LK · D (two matmuls of
2 · LQ · LK · D each), half that when causal with LQ == LK; backward 2.5x the forward (five
matmuls, one of them the recomputed Q Kᵀ).

Head dims: any D in [1, 256]; the kernels pad D to BLOCK_D = next_power_of_2(D) (at least 16)
with masked loads, so 40, 80, 96 run on the 64- and 128-wide paths.

Interpreter (TRITON_INTERPRET=1, the CPU test tier): tl.dot with bf16 operands returns garbage
there (shared/ENVIRONMENT.md), so for bf16 the launchers set DOT_FP32 and the kernels upcast
the already-rounded bf16 operands to fp32 before each dot; on a GPU the real bf16 dot runs.
Its fp32 -> bf16 cast also truncates instead of rounding to nearest: RNE_BF16 rounds in fp32
bit arithmetic first (see _rne). Both flags are False on a GPU and for fp16 / fp32.
fp32 inputs use input_precision="tf32x3" on a GPU (three TF32 mmas, ~fp32 accuracy, not plain
TF32), with small tiles and no autotuning: fp32 attention is for accuracy, fp16 / bf16 for
speed.

TMA (forward only, opt-in with FUSEDFORMER_TRITON_TMA=1, sm_90+, Triton >= 3.4): Q, K, V and
O move as 4-D tensor descriptors, and with 128-row tiles the key loop is warp-specialized;
see _fwd_tma_descriptors. Off by default until a GPU run measures it; the backward and every
other case use the portable sm_80+ pointer formulation.
Offsets inside one (b, h) slice are int32: LQ · stride(L) and LK · stride(L) must stay below
2^31 (e.g. L = 1M rows of 2048 elements); batch and head offsets are int64.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import alloc

try:  # host-side TMA descriptors: Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: the pointer path only
    TensorDescriptor = None

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
MAX_HEAD_DIM = 256
MAX_SPLITS = 128  # most key ranges a query block's split-KV forward takes (csrc/attention.h's too)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotuning(dtype: torch.dtype) -> bool:
    """Whether a launch goes through triton.autotune: on a GPU, 16-bit inputs, unless
    FUSEDFORMER_AUTOTUNE=0. The interpreter and fp32 (tf32x3, not the fast path) take the fixed
    tiles."""
    return (not _interpreting() and dtype != torch.float32
            and os.environ.get("FUSEDFORMER_AUTOTUNE", "1") != "0")


# ----------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. DOT_FP32: upcast the (already rounded) operands first,
    the interpreter's bf16 workaround."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _rne(x, RNE_BF16: tl.constexpr):
    """x, or under RNE_BF16 x rounded to the nearest bf16 value (ties to even) but still fp32:
    the interpreter's fp32 -> bf16 cast truncates (measured: mean bias -1.3e-3 on U(0, 1),
    which summed over a row of P doubled dV's error), while a GPU's cast rounds to nearest.
    Rounding first makes the interpreter's truncating cast exact."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _masked_scores(qk, qk_scale, i, j, LQ, LK, mask_base, stride_mask_m, stride_mask_n,
                   HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, CAUSAL: tl.constexpr,
                   CHECK_ROWS: tl.constexpr):
    """Scaled, masked scores in base-2 units: qk · scale · log2(e) (+ float mask · log2(e)),
    -inf where masked (bool mask False, causal j > i, out-of-range key, out-of-range query
    when CHECK_ROWS). i, j: query and key indices broadcastable to qk's shape (both layouts,
    S and Sᵀ, go through here)."""
    s = qk * qk_scale
    valid = j < LK
    if CHECK_ROWS:
        valid = valid & (i < LQ)
    if CAUSAL:
        valid = valid & (j <= i)
    if HAS_MASK:
        m = tl.load(mask_base + i * stride_mask_m + j * stride_mask_n,
                    mask=(i < LQ) & (j < LK), other=0)
        if MASK_BOOL:
            valid = valid & (m != 0)
        else:
            s = s + m.to(tl.float32) * 1.4426950408889634
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _dropout_keep(seed, bh_offset, i, j, LK, dropout_p):
    """keep(i, j) of the (b, h) slice whose first element has offset bh_offset (int64)."""
    offset = bh_offset + i.to(tl.int64) * LK + j
    return tl.rand(seed, offset) >= dropout_p


# ----------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_key_block(acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_d, LQ, LK, D, qk_scale,
                   mask_base, stride_mm, stride_mn, stride_kn, stride_kd, stride_vn, stride_vd,
                   tma_b, tma_hkv, seed, bh_offset, dropout_p,
                   HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DIAGONAL: tl.constexpr,
                   DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, RNE_BF16: tl.constexpr,
                   PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key block [start_n, start_n + BLOCK_N) of the forward's online softmax: returns
    the updated (acc, l_i, m_i). k_src, v_src: the (b, kv head)'s row pointers, or (USE_TMA)
    the K and V descriptors read at (tma_b, tma_hkv). DIAGONAL: apply the causal compare."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < LK) & (offs_d[None, :] < D)
    if USE_TMA:
        k = k_src.load([tma_b, tma_hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        k = tl.load(k_src + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    qk = _dot(q, tl.trans(k), DOT_FP32, PRECISION)  # (BLOCK_M, BLOCK_N)
    s = _masked_scores(qk, qk_scale, offs_m[:, None], offs_n[None, :], LQ, LK, mask_base,
                       stride_mm, stride_mn, HAS_MASK, MASK_BOOL, DIAGONAL, False)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far
    p = tl.math.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, bh_offset, offs_m[:, None], offs_n[None, :], LK, dropout_p)
        p = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    if USE_TMA:
        v = v_src.load([tma_b, tma_hkv, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        v = tl.load(v_src + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    acc = acc * alpha[:, None] + _dot(_rne(p, RNE_BF16).to(v.dtype), v, DOT_FP32, PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MASK, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    HQ, LQ, LK, D, GROUP, qk_scale, seed, dropout_p,
    LQ_BUCKET, LK_BUCKET,  # autotune key only: next_power_of_2 of the lengths
    num_splits, stride_os, stride_ls,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, RNE_BF16: tl.constexpr,
    PRECISION: tl.constexpr, USE_TMA: tl.constexpr, SPLIT: tl.constexpr, PACK_GQA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """PACK_GQA (decoding with GQA/MQA): program_id(2) is a kv head, and the rows of a tile are
    the (query head of its group, query row) pairs, row r = g · LQ + i, so that the GROUP query
    heads read each K and V tile once instead of GROUP times (and a one-row query fills a tile
    with GROUP rows instead of one). Causal rows then share no block boundary with the keys:
    every key block below min(LQ, LK) takes the compare.
    SPLIT (split-KV, FlashDecoding): program_id(0) = query block · num_splits + split; the
    program runs only range `split` of its query block's key blocks (equal consecutive ranges,
    the last shorter, possibly empty) and stores that range's o in fp32 and its lse at O + split ·
    stride_os and LSE + split · stride_ls, the fp32 workspace _attn_fwd_combine_kernel merges.
    USE_TMA: Q, K, V, O are 4-D tensor descriptors (B, H, L, D) with blocks (1, 1, BLOCK_*,
    BLOCK_D) instead of pointers (their stride arguments are then unused): the tiles move by
    TMA, rows past L and columns past D read as 0 and stores clip there, as the masked loads
    and stores of the pointer path do. With TMA and 128-row tiles (8 warps) the key loop is
    warp-specialized (producer / consumer warps): Triton 3.9's NVGPUWarpSpecialization pass
    fails on the 64-row, 4-warp tiles for sm_90 (tests/test_triton_aot.py, compiled without a
    GPU), so those keep the software pipeline."""
    if SPLIT:
        start_m = tl.program_id(0) // num_splits
        split = tl.program_id(0) % num_splits
    else:
        start_m = tl.program_id(0)
        split = 0
    off_b = tl.program_id(1).to(tl.int64)
    # Each row's query head and query index (offs_m), as vectors so that both row layouts
    # share what follows; padding rows get index LQ (out of range: no mask read, no store).
    if PACK_GQA:
        off_hkv = tl.program_id(2).to(tl.int64)
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < GROUP * LQ
        offs_m = tl.where(row_ok, rows % LQ, LQ)  # (BLOCK_M,)
        heads = off_hkv * GROUP + tl.minimum(rows // LQ, GROUP - 1)
    else:
        off_h = tl.program_id(2).to(tl.int64)
        off_hkv = off_h // GROUP
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = offs_m < LQ
        heads = tl.full((BLOCK_M,), 0, tl.int64) + off_h
    mask_base = (MASK + off_b * stride_mb + heads * stride_mh)[:, None]  # (BLOCK_M, 1)
    bh_offset = ((off_b * HQ + heads) * LQ * LK)[:, None]

    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_ok = offs_d < D
    tma_b = tl.program_id(1)  # descriptor coordinates are int32
    tma_h = tl.program_id(2)
    tma_hkv = tma_h // GROUP
    if USE_TMA:
        q = Q.load([tma_b, tma_h, start_m * BLOCK_M, 0]).reshape(BLOCK_M, BLOCK_D)
        k_src = K
        v_src = V
    else:
        q = tl.load(Q + off_b * stride_qb + heads[:, None] * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_D)
        k_src = K + off_b * stride_kb + off_hkv * stride_kh  # this (b, kv head)'s rows
        v_src = V + off_b * stride_vb + off_hkv * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max, base-2 units
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    # Stage 1: key blocks left of the diagonal (every key, or for causal those with j <
    # start_m * BLOCK_M <= i: no causal compare needed). Stage 2 (causal only): the diagonal
    # blocks [start_m * BLOCK_M, (start_m + 1) * BLOCK_M), with the compare. Blocks right of
    # the diagonal are skipped. BLOCK_M % BLOCK_N == 0 keeps the stage boundary on a block edge.
    # SPLIT: both stages clipped to the program's key range [lo_s, hi_s).
    if IS_CAUSAL and PACK_GQA:
        hi1 = 0
        hi2 = tl.minimum(LQ, LK)
    elif IS_CAUSAL:
        hi1 = tl.minimum(start_m * BLOCK_M, LK)
        hi2 = tl.minimum((start_m + 1) * BLOCK_M, LK)
    else:
        hi1 = LK
        hi2 = LK
    lo_s = 0
    hi_s = hi2
    if SPLIT:
        per = tl.cdiv(tl.cdiv(hi2, BLOCK_N), num_splits) * BLOCK_N  # keys a range
        lo_s = tl.minimum(split * per, hi2)
        hi_s = tl.minimum(lo_s + per, hi2)
    for stage in tl.static_range(2):
        lo = lo_s
        hi = tl.minimum(hi1, hi_s)
        if stage == 1:
            lo = tl.maximum(hi1, lo_s)
            hi = hi_s
        # The warp-specialized loop is a separate static branch (not warp_specialize=<flag>)
        # so that a Triton without the keyword (< 3.4, which has no TMA either) never sees it.
        if USE_TMA and BLOCK_M >= 128:
            for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
                acc, l_i, m_i = _fwd_key_block(
                    acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_d, LQ, LK, D, qk_scale,
                    mask_base, stride_mm, stride_mn, stride_kn, stride_kd, stride_vn, stride_vd,
                    tma_b, tma_hkv, seed, bh_offset, dropout_p, HAS_MASK, MASK_BOOL,
                    IS_CAUSAL and stage == 1, DROPOUT, DOT_FP32, RNE_BF16, PRECISION, USE_TMA,
                    BLOCK_N, BLOCK_D)
        else:
            for start_n in range(lo, hi, BLOCK_N):
                acc, l_i, m_i = _fwd_key_block(
                    acc, l_i, m_i, q, k_src, v_src, start_n, offs_m, offs_d, LQ, LK, D, qk_scale,
                    mask_base, stride_mm, stride_mn, stride_kn, stride_kd, stride_vn, stride_vd,
                    tma_b, tma_hkv, seed, bh_offset, dropout_p, HAS_MASK, MASK_BOOL,
                    IS_CAUSAL and stage == 1, DROPOUT, DOT_FP32, RNE_BF16, PRECISION, USE_TMA,
                    BLOCK_N, BLOCK_D)

    empty = l_i == 0.0  # every key masked
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]  # acc is 0 on empty rows, so o = 0 exactly
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    lse_base = LSE
    o_rows = off_b * stride_ob + heads[:, None] * stride_oh + offs_m[:, None] * stride_om
    if SPLIT:  # fp32 partials: no rounding to the input dtype until the merge
        lse_base = LSE + split.to(tl.int64) * stride_ls  # the workspace can pass 2^31 elements
        tl.store(O + split.to(tl.int64) * stride_os + o_rows + offs_d[None, :] * stride_od, o,
                 mask=row_ok[:, None] & d_ok[None, :])
    elif USE_TMA:
        O.store([tma_b, tma_h, start_m * BLOCK_M, 0],
                _rne(o, RNE_BF16).to(q.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    else:
        tl.store(O + o_rows + offs_d[None, :] * stride_od, _rne(o, RNE_BF16).to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_base + (off_b * HQ + heads) * LQ + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_fwd_combine_kernel(
    O_ACC, LSE_ACC, O, LSE,
    stride_ob, stride_oh, stride_om, stride_od,
    HQ, LQ, D, ROWS, num_splits,
    RNE_BF16: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split-KV's merge, BLOCK_R rows a program: row r = (b · HQ + h) · LQ + i has num_splits
    partial results o_s (fp32, O_ACC (num_splits, ROWS, D) contiguous) and lse_s (LSE_ACC
    (num_splits, ROWS)); lse = log Σ_s exp(lse_s) and o = Σ_s exp(lse_s - lse) o_s. Ranges with
    no key (lse_s = -inf) weigh 0; a row with none keeps o = 0 and lse = -inf."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    row_ok = rows < ROWS
    offs_s = tl.arange(0, BLOCK_S)
    lse_s = tl.load(LSE_ACC + offs_s[None, :].to(tl.int64) * ROWS + rows[:, None],
                    mask=row_ok[:, None] & (offs_s[None, :] < num_splits), other=float("-inf"))
    mx = tl.max(lse_s, 1)
    empty = mx == float("-inf")
    mx_safe = tl.where(empty, 0.0, mx)
    total = tl.sum(tl.exp(lse_s - mx_safe[:, None]), 1)  # exp(-inf) = 0 for empty ranges
    total_safe = tl.where(empty, 1.0, total)
    offs_d = tl.arange(0, BLOCK_D)
    tile = row_ok[:, None] & (offs_d[None, :] < D)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    split_rows = rows  # row r of split s: s · ROWS + r, int64 (the workspace can pass 2^31 elements)
    for _ in range(num_splits):
        l_s = tl.load(LSE_ACC + split_rows, mask=row_ok, other=float("-inf"))
        w = tl.exp(l_s - mx_safe) / total_safe  # exp(lse_s - lse)
        o_s = tl.load(O_ACC + split_rows[:, None] * D + offs_d[None, :], mask=tile, other=0.0)
        acc += w[:, None] * o_s
        split_rows += ROWS
    i = rows % LQ
    h = rows // LQ % HQ
    b = rows // (LQ * HQ)
    tl.store(O + b[:, None] * stride_ob + h[:, None] * stride_oh + i[:, None] * stride_om
             + offs_d[None, :] * stride_od, _rne(acc, RNE_BF16).to(O.dtype.element_ty), mask=tile)
    tl.store(LSE + rows, tl.where(empty, float("-inf"), mx_safe + tl.log(total_safe)), mask=row_ok)


def _attention_fwd_config(LQ: int, LK: int, D: int, dtype: torch.dtype) -> dict:
    """Block sizes of one forward launch without the autotuner: under the interpreter, for
    fp32 inputs, and with FUSEDFORMER_AUTOTUNE=0 (BLOCK_M % BLOCK_N == 0 always, so the causal
    stage boundary falls on a key-block edge).

    Interpreter: 64 x 32 tiles. Its cost is per numpy op, so bigger tiles mean fewer programs
    (B2 H4 LQ37 LK45 D32 causal fwd on this machine's 2 cores: 16 x 16 1.6 s, 32 x 32 0.7 s,
    64 x 32 0.4 s), while 32-key blocks still give the test shapes several key blocks per row
    (the online-softmax rescale and both causal stages run).
    GPU (otherwise the autotuner below picks among _FWD_TUNE_CONFIGS, tutorial 06's search
    space): 128 x 64 with 8 warps for D <= 128, 64 x 32 for D = 256; fp32 inputs half that
    (at 128 x 64 x 128 the fp32 tf32x3 forward asked for 256 KiB of shared memory, over the
    H100's 227). Compiled for sm_90 on this machine (ptxas via tests/test_triton_aot.py, triton
    3.9; no GPU has run them yet): bf16 D = 128 128 KiB of shared memory, fp16 D = 256 100 KiB,
    fp32 D = 64 72 KiB, fp32 D = 256 80 KiB (and 1.8 KB of register spills).
    """
    if _interpreting():
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:  # 4-byte tiles: half the rows of the 16-bit configs
        if block_d >= 256:
            return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if block_d >= 256:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if LQ <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def _tma_descriptor(t: Tensor) -> Optional["TensorDescriptor"]:
    """t (4-D) as a TMA tensor descriptor, or None where TMA cannot address it: the last dim
    must be contiguous and every other stride a positive multiple of 16 bytes, the base 16-byte
    aligned. A dim of size 1 is only ever at coordinate 0, so its stride (0 in an expanded
    tensor) is replaced by a valid one. The block shape is a placeholder, set per launch."""
    size = t.element_size()
    if (t.stride(-1) != 1 and t.shape[-1] != 1) or t.data_ptr() % 16:
        return None
    unused = -(-max(st * n for st, n in zip(t.stride(), t.shape)) * size // 16) * 16 // size
    strides = []
    for st, n in zip(t.stride()[:-1], t.shape[:-1]):
        st = unused if n == 1 else st
        if st <= 0 or st * size % 16:
            return None
        strides.append(st)
    return TensorDescriptor(t, list(t.shape), strides + [1], [1, 1, 16, 16])


def _fwd_tma_descriptors(q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> Optional[tuple]:
    """(Q, K, V, O) descriptors for the forward's TMA path, or None for the pointer path.

    Opt-in (FUSEDFORMER_TRITON_TMA=1) until a GPU run has measured it against the pointer
    path (bench/bench_attention.py runs both); on a GPU it needs sm_90+ (TMA hardware) and a
    Triton with host descriptors. The interpreter runs it too, which is how the CPU tier tests
    it. Any input TMA cannot address (see _tma_descriptor) takes the pointer path."""
    if TensorDescriptor is None or os.environ.get("FUSEDFORMER_TRITON_TMA", "0") != "1":
        return None
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) < (9, 0):
        return None
    descs = tuple(_tma_descriptor(t) for t in (q, k, v, o))
    return None if any(d is None for d in descs) else descs


def _set_fwd_blocks(nargs: dict) -> None:
    """Block shapes of the forward's descriptors for the config in nargs (its BLOCK_*): the
    autotune configs' pre_hook, and called directly for a fixed config."""
    if TensorDescriptor is not None and isinstance(nargs["Q"], TensorDescriptor):
        bm, bn, bd = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_D"]
        nargs["Q"].block_shape = nargs["O"].block_shape = [1, 1, bm, bd]
        nargs["K"].block_shape = nargs["V"].block_shape = [1, 1, bn, bd]


# Candidates for triton.autotune on GPUs (tutorial 06's space, pruned for D = 256 below).
_FWD_TUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s,
                  pre_hook=_set_fwd_blocks)
    for bm, bn, w in ((128, 64, 8), (128, 32, 8), (64, 64, 4), (64, 32, 4))
    for s in (2, 3)
]


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Drop tiles too big for D = 256: 128-row tiles of a 256-wide fp32 accumulator spill, and
    64 x 64 with 3 stages asks 240 KiB of shared memory on sm_90 (> 227; ptxas, fp16). Triton
    passes the positional arguments as named_args and the keyword ones (BLOCK_D is one) as
    kwargs."""
    if kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 0)) >= 256:
        return [c for c in configs
                if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] * c.num_stages <= 128] or configs
    return configs


_fwd_tuned = None


def _fwd_kernel_autotuned():
    """The forward kernel wrapped in triton.autotune, keyed on the rounded lengths, the padded
    head dim, causal and (implicitly, Triton adds tensor dtypes to the key) the dtype. Built on
    first use on a GPU only: the interpreter, fp32 inputs (not the fast path; eight tf32x3
    compiles per key would dominate) and FUSEDFORMER_AUTOTUNE=0 run _attention_fwd_config's
    single config."""
    global _fwd_tuned
    if _fwd_tuned is None:
        _fwd_tuned = triton.autotune(
            configs=_FWD_TUNE_CONFIGS,
            key=["LQ_BUCKET", "LK_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_MASK", "DROPOUT",
                 "USE_TMA"],
            prune_configs_by={"early_config_prune": _prune_fwd_configs},
        )(_attn_fwd_kernel)
    return _fwd_tuned


# ----------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    HQ, LQ, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32."""
    start_m = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    off_h = tl.program_id(2).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < LQ) & (offs_d[None, :] < D)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + (off_b * HQ + off_h) * LQ + offs_m, tl.sum(o * do, 1), mask=offs_m < LQ)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, MASK, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    HQ, HKV, LQ, LK, D, GROUP, scale, qk_scale, seed, dropout_p,
    LQ_BUCKET, LK_BUCKET,  # autotune key only: next_power_of_2 of the lengths
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, RNE_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block (BLOCK_N keys) of kv head hkv, summed over the GROUP query
    heads that read it and all their query blocks. Works in the transposed layout Sᵀ
    (BLOCK_N, BLOCK_M) so every product is a plain tl.dot."""
    start_n = tl.program_id(0) * BLOCK_N
    off_b = tl.program_id(1).to(tl.int64)
    off_hkv = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n[:, None] < LK) & d_ok[None, :]
    k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    inv_keep = 1.0 / (1.0 - dropout_p)

    # Causal: query blocks before the one holding query start_n see none of these keys;
    # blocks from lo_full on see all of them (every i >= start_n + BLOCK_N > j).
    lo = 0
    lo_full = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        lo_full = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, LQ)
    for g in range(GROUP):
        off_h = off_hkv * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        mask_base = MASK + off_b * stride_mb + off_h * stride_mh
        row_base = (off_b * HQ + off_h) * LQ  # into LSE and DELTA, (B, HQ, LQ) contiguous
        bh_offset = row_base * LK
        for stage in tl.static_range(2):
            m_lo = lo  # stage 0: diagonal blocks (causal compare); empty when not causal
            m_hi = lo_full
            if stage == 1:  # the query blocks that see every key of this block
                m_lo = lo_full
                m_hi = LQ
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + offs_m0  # (BLOCK_M,)
                q_mask = (offs_m[:, None] < LQ) & d_ok[None, :]
                q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                            mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
                do = tl.load(do_base + offs_m[:, None] * stride_dom
                             + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
                lse = tl.load(LSE + row_base + offs_m, mask=offs_m < LQ, other=0.0)
                delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < LQ, other=0.0)
                # exp(s - lse) with lse = -inf (fully masked row) would be NaN: such a row
                # has s = -inf everywhere, so any finite stand-in gives p = 0.
                lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
                qkT = _dot(k, tl.trans(q), DOT_FP32, PRECISION)  # (BLOCK_N, BLOCK_M)
                sT = _masked_scores(qkT, qk_scale, offs_m[None, :], offs_n[:, None], LQ, LK,
                                    mask_base, stride_mm, stride_mn, HAS_MASK, MASK_BOOL,
                                    IS_CAUSAL and stage == 0, True)
                pT = tl.math.exp2(sT - lse2[None, :])  # (BLOCK_N, BLOCK_M)
                dpT = _dot(v, tl.trans(do), DOT_FP32, PRECISION)  # (BLOCK_N, BLOCK_M)
                if DROPOUT:
                    keepT = _dropout_keep(seed, bh_offset, offs_m[None, :], offs_n[:, None],
                                          LK, dropout_p)
                    pdT = tl.where(keepT, pT * inv_keep, 0.0)
                    dpT = tl.where(keepT, dpT * inv_keep, 0.0)
                else:
                    pdT = pT
                dv += _dot(_rne(pdT, RNE_BF16).to(do.dtype), do, DOT_FP32, PRECISION)
                dsT = pT * (dpT - delta[None, :])  # (BLOCK_N, BLOCK_M)
                dk += _dot(_rne(dsT, RNE_BF16).to(q.dtype), q, DOT_FP32, PRECISION)

    dk = dk * scale
    tl.store(DK + off_b * stride_dkb + off_hkv * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, _rne(dk, RNE_BF16).to(DK.dtype.element_ty),
             mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_hkv * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, _rne(dv, RNE_BF16).to(DV.dtype.element_ty),
             mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, MASK, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    HQ, LQ, LK, D, GROUP, scale, qk_scale, seed, dropout_p,
    LQ_BUCKET, LK_BUCKET,  # autotune key only: next_power_of_2 of the lengths
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_FP32: tl.constexpr, RNE_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one query block: dQ = scale · sum over key blocks of dS K."""
    start_m = tl.program_id(0)
    off_b = tl.program_id(1).to(tl.int64)
    off_h = tl.program_id(2).to(tl.int64)
    off_hkv = off_h // GROUP
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    mask_base = MASK + off_b * stride_mb + off_h * stride_mh
    row_base = (off_b * HQ + off_h) * LQ
    bh_offset = row_base * LK

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = (offs_m[:, None] < LQ) & d_ok[None, :]
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < LQ, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < LQ, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # see dK/dV kernel
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    inv_keep = 1.0 / (1.0 - dropout_p)

    if IS_CAUSAL:
        hi1 = tl.minimum(start_m * BLOCK_M, LK)
    else:
        hi1 = LK
    for stage in tl.static_range(2):  # as the forward: off-diagonal, then diagonal blocks
        lo = 0
        hi = hi1
        if stage == 1:
            lo = hi1
            if IS_CAUSAL:
                hi = tl.minimum((start_m + 1) * BLOCK_M, LK)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            kv_mask = (offs_n[:, None] < LK) & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=kv_mask, other=0.0)
            qk = _dot(q, tl.trans(k), DOT_FP32, PRECISION)  # (BLOCK_M, BLOCK_N)
            s = _masked_scores(qk, qk_scale, offs_m[:, None], offs_n[None, :], LQ, LK,
                               mask_base, stride_mm, stride_mn, HAS_MASK, MASK_BOOL,
                               IS_CAUSAL and stage == 1, True)
            p = tl.math.exp2(s - lse2[:, None])
            dp = _dot(do, tl.trans(v), DOT_FP32, PRECISION)  # (BLOCK_M, BLOCK_N)
            if DROPOUT:
                keep = _dropout_keep(seed, bh_offset, offs_m[:, None], offs_n[None, :], LK,
                                     dropout_p)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            ds = p * (dp - delta[:, None])
            dq += _dot(_rne(ds, RNE_BF16).to(k.dtype), k, DOT_FP32, PRECISION)

    dq = dq * scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, _rne(dq, RNE_BF16).to(DQ.dtype.element_ty),
             mask=q_mask)


def _attention_bwd_config(LQ: int, LK: int, D: int, dtype: torch.dtype) -> dict:
    """Tiles of the backward kernels, in the shape of Triton tutorial 06: the dK/dV kernel
    holds a tall key block and streams short query blocks (BLOCK_N1 keys x BLOCK_M1 queries),
    the dQ kernel the reverse (BLOCK_M2 queries x BLOCK_N2 keys; BLOCK_M2 % BLOCK_N2 == 0 keeps
    its causal stage boundary on a block edge).

    Interpreter: 32 x 64 / 64 x 32, the fastest that still gives the T = 37..97 test shapes
    several blocks per row (measured here, B1 H2 T128 D64 fp16 causal fwd + bwd with square
    tiles: 16 x 16 5.5 s, 32 x 32 1.6 s, 64 x 32 0.9 s, 64 x 64 0.4 s but one block per row).
    GPU: the same with 4 warps for D <= 128 (the tutorial's are 32 x 128 / 128 x 32 for
    D = 64; halved here so D = 128 keeps its two fp32 accumulators in registers), 32 x 32 for
    D = 256 or fp32 inputs, 16 x 32 / 32 x 16 for both (144 KiB of shared memory compiled for
    sm_90). A starting point, not a measurement: nothing here has run on a GPU yet. On a GPU,
    16-bit inputs at D <= 128 go to the autotuner below instead (its first candidate is these
    tiles).
    """
    if _interpreting():
        return dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4,
                    num_stages=1)
    if max(16, triton.next_power_of_2(D)) >= 256 and dtype == torch.float32:
        return dict(BLOCK_M1=16, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=16, num_warps=4,
                    num_stages=1)
    if max(16, triton.next_power_of_2(D)) >= 256 or dtype == torch.float32:
        return dict(BLOCK_M1=32, BLOCK_N1=32, BLOCK_M2=32, BLOCK_N2=32, num_warps=4,
                    num_stages=1)
    return dict(BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_warps=4, num_stages=2)


# The backward's autotuner candidates on GPUs, 16-bit at D <= 128 (fp32, D = 256 and
# FUSEDFORMER_AUTOTUNE=0 take _attention_bwd_config's fixed tiles): the fixed tiles, the same
# with 8 warps, and tutorial 06's tall-and-short shape (128 keys x 32 queries for dK/dV,
# 128 queries x 32 keys for dQ) with 8 warps and two or three stages, which halves the
# re-reads of Q, dO (dK/dV) and K, V (dQ). ptxas for sm_90 (tests/test_triton_aot.py, triton
# 3.9; bf16 D = 128 causal and fp16 D = 128 with bool mask and dropout): dK/dV 255 registers
# in every candidate, spilling 128-200 bytes with 4 warps and 40-196 with 8 (three stages the
# most); dQ 164-206 registers, no spill. (64 keys x 64 queries or 128 x 64 spilled 380-680
# bytes: left out.) dK/dV tiles keep BLOCK_N % BLOCK_M == 0 and dQ's BLOCK_M % BLOCK_N
# == 0 (the causal stage boundary on a block edge); tests/test_attention_triton.py runs every
# candidate's tiles against the oracle under the interpreter.
_BWD_DKDV_TUNE_TILES = ((32, 64, 4, 2), (32, 64, 8, 2), (32, 128, 8, 2), (32, 128, 8, 3))
_BWD_DQ_TUNE_TILES = ((64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2), (128, 32, 8, 3))
_BWD_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_MASK", "DROPOUT"]
_bwd_dkdv_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
             for bm, bn, w, st in _BWD_DKDV_TUNE_TILES], key=_BWD_TUNE_KEY)(_attn_bwd_dkdv_kernel)
_bwd_dq_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
             for bm, bn, w, st in _BWD_DQ_TUNE_TILES], key=_BWD_TUNE_KEY)(_attn_bwd_dq_kernel)


# ----------------------------------------------------------------------------------------
# Launchers


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> None:
    """Boundary checks of the launchers (the public function validates first; these keep a
    direct launcher call from reading out of bounds or returning garbage)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention (triton): {name} must be a torch.Tensor, got "
                            f"{type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention (triton): {name} must be 4-D (B, H, L, D), got shape "
                             f"{tuple(t.shape)}")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"attention (triton): {name} must be float16, bfloat16 or float32, "
                            f"got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"attention (triton): {name} must have the dtype of q ({q.dtype}), "
                            f"got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention (triton): {name} must be on the device of q ({q.device}), "
                             f"got {t.device}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
        raise ValueError(f"attention (triton): tensors must be on a CUDA device (CPU only under "
                         f"TRITON_INTERPRET=1), got {q.device}")
    b, hq, lq, d = q.shape
    _, hkv, lk, _ = k.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"attention (triton): head dim must be in [1, {MAX_HEAD_DIM}] (padded "
                         f"to a power of two inside the kernel), got {d}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention (triton): k must have shape ({b}, HKV, LK, {d}), got "
                         f"{tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"attention (triton): v must have the shape of k {tuple(k.shape)}, got "
                         f"{tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"attention (triton): query heads ({hq}) must be a multiple of kv heads "
                         f"({hkv})")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"attention (triton): mask must be a torch.Tensor or None, got "
                            f"{type(mask).__name__}")
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            raise TypeError(f"attention (triton): mask must be bool (True = attend) or {q.dtype} "
                            f"(added to the scores), got {mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"attention (triton): mask must be on {q.device}, got {mask.device}")
        target = (b, hq, lq, lk)
        if mask.dim() != 4 or any(m not in (1, t) for m, t in zip(mask.shape, target)):
            raise ValueError(f"attention (triton): mask must be 4-D with each dim 1 or that of "
                             f"(B, HQ, LQ, LK) = {target}, got shape {tuple(mask.shape)}")


def _mask_args(mask: Optional[Tensor], q: Tensor) -> tuple[Tensor, tuple[int, ...], bool, bool]:
    """(pointer tensor, strides with 0 on broadcast dims, HAS_MASK, MASK_BOOL). A bool mask is
    reinterpreted as uint8 (same storage, no copy); the expanded mask is never materialized."""
    if mask is None:
        return q, (0, 0, 0, 0), False, False
    strides = tuple(0 if size == 1 else stride for size, stride in zip(mask.shape, mask.stride()))
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), strides, True, True
    return mask, strides, True, False


def _dot_flags(dtype: torch.dtype) -> dict:
    """DOT_FP32 and RNE_BF16, the interpreter's two bf16 workarounds (its bf16 tl.dot is
    wrong and its fp32 -> bf16 cast truncates), and PRECISION: "tf32x3" for fp32 on a GPU, so
    fp32 attention is not silently TF32 (~1e-3 error where the rule allows ~1e-5; PyTorch's
    fp32 SDPA does not use TF32 either). tf32x3 (three TF32 mmas, ~fp32 accuracy) rather than
    "ieee": compiled for sm_90 on this machine (no GPU), the ieee D = 256 forward did not
    finish compiling in 9 minutes (its FMA expansion of the tiles); tf32x3 with the fp32 tiles
    of _attention_fwd_config / _attention_bwd_config compiled in 2-14 s per kernel, D = 256
    included. None (Triton's default; exact fp32 numpy in the interpreter) otherwise."""
    interpreted_bf16 = dtype == torch.bfloat16 and _interpreting()
    precision = "tf32x3" if dtype == torch.float32 and not _interpreting() else None
    return dict(DOT_FP32=interpreted_bf16, RNE_BF16=interpreted_bf16, PRECISION=precision)


def _check_dropout(dropout_p: float, seed: int) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention (triton): dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"attention (triton): seed must be an int in [0, 2^63), got {seed!r}")


def num_splits_heuristic(blocks: int, key_blocks: int, workers: int) -> int:
    """How many key ranges make `blocks` query blocks, each visiting `key_blocks` key blocks,
    fill `workers` SMs: csrc/attention.h's attention_num_splits (FlashAttention-2's wave
    efficiency rule), which tests/test_attention_triton.py checks this against. 1 when the
    blocks alone fill four fifths of the SMs; else the smallest count within 85% of the best
    last-wave efficiency, at most MAX_SPLITS ranges of at least two key blocks, skipping
    counts that leave a range as long as one range fewer would."""
    if blocks <= 0 or key_blocks < 4 or workers <= 0 or 5 * blocks >= 4 * workers:
        return 1
    most = min(MAX_SPLITS, workers, key_blocks // 2)

    def efficiency(s: int) -> float:
        waves = blocks * s / workers
        return waves / math.ceil(waves)

    useful = [s for s in range(1, most + 1) if s == 1 or -(-key_blocks // s) != -(-key_blocks // (s - 1))]
    best = max(efficiency(s) for s in useful)
    return next(s for s in useful if efficiency(s) >= 0.85 * best)


def _fwd_num_splits(num_splits: int, q: Tensor, blocks: int, key_blocks: int) -> int:
    """The forward's split count: num_splits if given (>= 1), else the heuristic over the
    GPU's SMs; 1 under the interpreter (a CPU has no SMs to fill; tests force a count)."""
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"attention (triton): num_splits must be an int in [0, {MAX_SPLITS}] "
                         f"(0 = choose), got {num_splits!r}")
    if num_splits > 0:
        return num_splits
    if q.device.type != "cuda":
        return 1
    workers = torch.cuda.get_device_properties(q.device).multi_processor_count
    return num_splits_heuristic(blocks, key_blocks, workers)


PACK_GQA_MAX_LQ = 16  # the longest query a GQA forward packs (decoding, speculative steps)


def pack_gqa(hq: int, hkv: int, lq: int) -> bool:
    """Whether the forward packs the query heads of a kv head into one tile's rows (the
    kernel's PACK_GQA): GQA/MQA with at most PACK_GQA_MAX_LQ query rows, where an unpacked tile
    would be mostly padding and each query head would read the shared K and V again; longer
    queries fill their own tiles and keep the causal block skipping. FUSEDFORMER_TRITON_PACK_GQA=0
    turns it off (read at each call)."""
    return (hkv < hq and lq <= PACK_GQA_MAX_LQ
            and os.environ.get("FUSEDFORMER_TRITON_PACK_GQA", "1") != "0")


def _pack_gqa_config(cfg: dict, rows: int) -> dict:
    """cfg with BLOCK_M sized to the packed rows (GROUP · LQ): 16 to 64, a power of 2 (tl.dot
    takes at least 16 rows), 4 warps."""
    return dict(cfg, BLOCK_M=min(64, max(16, triton.next_power_of_2(rows))), num_warps=4)


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                  is_causal: bool, dropout_p: float, seed: int, num_splits: int = 0) -> tuple[Tensor, Tensor]:
    """o = softmax(q kᵀ · scale + mask) v (dropout on the probabilities), and lse.

    Args:
        q: (B, HQ, LQ, D); k, v: (B, HKV, LK, D); fp16 / bf16 / fp32, any strides.
        mask: None or 4-D (B|1, HQ|1, LQ|1, LK|1), bool (True = attend) or q.dtype (added).
        scale: multiplies q kᵀ. is_causal: query i sees keys j <= i (top-left).
        dropout_p, seed: dropout probability in [0, 1) and the int seed of its keep-mask.
        num_splits: split-KV (FlashDecoding) for grids too small for the GPU, as in decoding:
            each query block's keys in num_splits ranges, one program each, merged by their
            lse. 0 chooses (num_splits_heuristic; 1 off a GPU), n in [1, MAX_SPLITS] forces n.
    Returns:
        o (B, HQ, LQ, D) in q.dtype, lse (B, HQ, LQ) float32 (-inf where every key is masked).
    """
    _check_inputs(q, k, v, mask)
    _check_dropout(dropout_p, seed)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    o = alloc.empty((b, hq, lq, d), q.dtype, q.device)  # (B, HQ, LQ, D)
    lse = alloc.empty((b, hq, lq), torch.float32, q.device)  # (B, HQ, LQ)
    if o.numel() == 0:
        return o, lse
    mask_t, mask_strides, has_mask, mask_bool = _mask_args(mask, q)
    block_d = max(16, triton.next_power_of_2(d))
    cfg = _attention_fwd_config(lq, lk, d, q.dtype)
    pack = pack_gqa(hq, hkv, lq)
    # The grid's row blocks and heads: packed, (GROUP · LQ rows, kv heads); else (LQ, HQ).
    grid_rows, grid_heads = (hq // hkv * lq, hkv) if pack else (lq, hq)
    if pack:
        cfg = _pack_gqa_config(cfg, grid_rows)
    row_blocks = triton.cdiv(grid_rows, cfg["BLOCK_M"])
    splits = _fwd_num_splits(num_splits, q, b * grid_heads * row_blocks, triton.cdiv(lk, cfg["BLOCK_N"]))
    split = splits > 1
    # Split-KV writes fp32 partials into a (splits, B, HQ, LQ, D) workspace that
    # _attn_fwd_combine_kernel merges into o and lse. Split and packed launches run the fixed
    # tiles of cfg (the count was chosen for them: no autotuning) through pointers (no TMA).
    descs = None if split or pack else _fwd_tma_descriptors(q, k, v, o)
    q_, k_, v_, o_ = descs if descs is not None else (q, k, v, o)
    lse_ = lse
    o_strides, split_strides = o.stride(), (0, 0)
    if split:
        o_ = torch.empty((splits, b, hq, lq, d), dtype=torch.float32, device=q.device)
        lse_ = torch.empty((splits, b, hq, lq), dtype=torch.float32, device=q.device)
        o_strides, split_strides = o_.stride()[1:], (o_.stride(0), lse_.stride(0))
    args = (q_, k_, v_, mask_t, o_, lse_, *q.stride(), *k.stride(), *v.stride(), *mask_strides,
            *o_strides, hq, lq, lk, d, hq // hkv, float(scale) * LOG2E, int(seed),
            float(dropout_p), triton.next_power_of_2(lq), triton.next_power_of_2(lk), splits, *split_strides)
    flags = dict(HAS_MASK=has_mask, MASK_BOOL=mask_bool, IS_CAUSAL=bool(is_causal),
                 DROPOUT=dropout_p > 0.0, BLOCK_D=block_d, USE_TMA=descs is not None, SPLIT=split,
                 PACK_GQA=pack, **_dot_flags(q.dtype))
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        if split or pack or not _autotuning(q.dtype):
            _set_fwd_blocks(dict(Q=q_, K=k_, V=v_, O=o_, BLOCK_D=block_d, **cfg))
            _attn_fwd_kernel[(row_blocks * splits, b, grid_heads)](*args, **flags, **cfg)
        else:
            grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b, hq)  # noqa: E731
            _fwd_kernel_autotuned()[grid](*args, **flags)
        if split:
            rows, block_r = b * hq * lq, 16
            _attn_fwd_combine_kernel[(triton.cdiv(rows, block_r),)](
                o_, lse_, o, lse, *o.stride(), hq, lq, d, rows, splits, RNE_BF16=flags["RNE_BF16"],
                BLOCK_R=block_r, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d)
    return o, lse


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                  mask: Optional[Tensor], scale: float, is_causal: bool, dropout_p: float,
                  seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention_fwd: (dq, dk, dv) shaped and typed as (q, k, v).

    Args: as attention_fwd, plus do (the gradient of o, any strides, stride 0 included), o
    and lse (attention_fwd's outputs for the same arguments).
    """
    _check_inputs(q, k, v, mask)
    _check_dropout(dropout_p, seed)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    for name, t, shape in (("do", do, q.shape), ("o", o, q.shape), ("lse", lse, q.shape[:3])):
        if tuple(t.shape) != tuple(shape) or t.device != q.device:
            raise ValueError(f"attention (triton): {name} must have shape {tuple(shape)} on "
                             f"{q.device}, got {tuple(t.shape)} on {t.device}")
    lse = lse.float().contiguous()  # (B, HQ, LQ); the kernels index it as contiguous
    dq = alloc.empty((b, hq, lq, d), q.dtype, q.device)  # (B, HQ, LQ, D)
    dk = alloc.empty((b, hkv, lk, d), k.dtype, k.device)  # (B, HKV, LK, D)
    dv = alloc.empty((b, hkv, lk, d), v.dtype, v.device)  # (B, HKV, LK, D)
    if dq.numel() == 0 or dk.numel() == 0:  # no queries or no keys: nothing flows back
        return dq.zero_(), dk.zero_(), dv.zero_()
    mask_t, mask_strides, has_mask, mask_bool = _mask_args(mask, q)
    block_d = max(16, triton.next_power_of_2(d))
    cfg = _attention_bwd_config(lq, lk, d, q.dtype)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    flags = dict(HAS_MASK=has_mask, MASK_BOOL=mask_bool, IS_CAUSAL=bool(is_causal),
                 DROPOUT=dropout_p > 0.0, BLOCK_D=block_d, **_dot_flags(q.dtype))
    group = hq // hkv
    qk_scale = float(scale) * LOG2E
    delta = torch.empty((b, hq, lq), dtype=torch.float32, device=q.device)  # (B, HQ, LQ)
    bm1, bn1, bm2, bn2 = cfg["BLOCK_M1"], cfg["BLOCK_N1"], cfg["BLOCK_M2"], cfg["BLOCK_N2"]
    tune = _autotuning(q.dtype) and block_d <= 128
    buckets = (triton.next_power_of_2(lq), triton.next_power_of_2(lk))
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _attn_bwd_preprocess_kernel[(triton.cdiv(lq, bm2), b, hq)](
            o, do, delta, *o.stride(), *do.stride(), hq, lq, d,
            BLOCK_M=bm2, BLOCK_D=block_d, **launch)
        common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *mask_strides)
        dkdv_args = (q, k, v, do, mask_t, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(),
                     hq, hkv, lq, lk, d, group, float(scale), qk_scale, int(seed), float(dropout_p),
                     *buckets)
        dq_args = (q, k, v, do, mask_t, lse, delta, dq, *common, *dq.stride(),
                   hq, lq, lk, d, group, float(scale), qk_scale, int(seed), float(dropout_p), *buckets)
        if tune:
            _bwd_dkdv_tuned[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), b, hkv)](*dkdv_args, **flags)
            _bwd_dq_tuned[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b, hq)](*dq_args, **flags)
        else:
            _attn_bwd_dkdv_kernel[(triton.cdiv(lk, bn1), b, hkv)](*dkdv_args, BLOCK_M=bm1, BLOCK_N=bn1,
                                                                  **flags, **launch)
            _attn_bwd_dq_kernel[(triton.cdiv(lq, bm2), b, hq)](*dq_args, BLOCK_M=bm2, BLOCK_N=bn2,
                                                               **flags, **launch)
    return dq, dk, dv


@triton.jit
def _dropout_mask_kernel(KEEP, HQ, LQ, LK, seed, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep (B, HQ, LQ, LK) as uint8, drawn exactly as the attention kernels draw it."""
    off_bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    start_n = tl.program_id(2) * BLOCK_N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    bh_offset = off_bh * LQ * LK
    keep = _dropout_keep(seed, bh_offset, offs_m[:, None], offs_n[None, :], LK, dropout_p)
    tl.store(KEEP + bh_offset + offs_m[:, None] * LK + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m[:, None] < LQ) & (offs_n[None, :] < LK))


def attention_dropout_mask(seed: int, shape: tuple[int, int, int, int], dropout_p: float,
                           device: torch.device | str) -> Tensor:
    """The keep-mask (B, HQ, LQ, LK) bool that attention_fwd / attention_bwd draw for `seed`
    (True = kept; kept probabilities are scaled by 1 / (1 - dropout_p)). For tests: hand it to
    reference.attention_ref(dropout_mask=...)."""
    _check_dropout(dropout_p, seed)
    if len(shape) != 4:
        raise ValueError(f"attention (triton): shape must be (B, HQ, LQ, LK), got {tuple(shape)}")
    b, hq, lq, lk = (int(s) for s in shape)
    keep = torch.empty((b, hq, lq, lk), dtype=torch.uint8, device=device)
    if keep.numel() == 0:
        return keep.bool()
    grid = (b * hq, triton.cdiv(lq, 32), triton.cdiv(lk, 32))
    _dropout_mask_kernel[grid](keep, hq, lq, lk, int(seed), float(dropout_p),
                               BLOCK_M=32, BLOCK_N=32)
    return keep.bool()
