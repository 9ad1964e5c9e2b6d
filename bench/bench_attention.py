"""Attention benchmarks: fusedformer's backends vs torch's SDPA (each backend on a GPU) and
FlexAttention (torch.compile'd, causal as a block mask).

FLOPs (DESIGN.md section 6): forward 4 * B * H * LQ * LK * D, half when causal; backward 2.5x
forward. Report TFLOP/s and, on a GPU, the ratio to SDPA-flash measured in the same run.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fusedformer
from bench.common import (DEVICE, ON_GPU, backend_of, fused_providers, grads, measure, switches,
                          variant_providers)

if ON_GPU:  # the target grid: bf16, D = 128, H * D = 2048, B * T = 16k
    SHAPES = [(4, 16, 4096, 128), (2, 16, 8192, 128), (1, 16, 16384, 128), (8, 32, 2048, 64)]
    DTYPES = [torch.bfloat16]
    PEERS = ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex"]
else:
    # (B, H, T, D), or (B, HQ, HKV, T, D) for GQA/MQA: a Llama head dim; MQA at batch 1 (the
    # backward's split schedule)
    SHAPES = [(1, 8, 512, 64), (2, 4, 1024, 64), (1, 16, 1024, 128), (1, 8, 1, 1024, 128)]
    DTYPES = [torch.float32, torch.bfloat16]
    PEERS = ["sdpa", "flex"]


_flex_compiled = None
_block_masks: dict = {}


def _flex(q, k, v, causal: bool):
    """FlexAttention, compiled once; the causal mask as a block mask, built once per length
    (outside the timing after the first call, as a user would keep it)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = None
    if causal:
        t = q.shape[2]
        if t not in _block_masks:
            _block_masks[t] = create_block_mask(lambda b, h, i, j: i >= j, B=None, H=None, Q_LEN=t,
                                                KV_LEN=t, device=q.device)
        block_mask = _block_masks[t]
    if not torch.is_grad_enabled():  # the forward rows: on the CPU flex refuses inputs that need grad
        q, k, v = q.detach(), k.detach(), v.detach()
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def _attend(provider: str, q, k, v, causal: bool = False):
    """Attention of q, k, v by `provider`: a fusedformer backend, FlexAttention, or SDPA
    (pinned to one of its backends on a GPU). GQA when k and v have fewer heads than q."""
    gqa = k.shape[1] != q.shape[1]
    if provider.startswith("fusedformer-"):
        with switches(provider):
            return fusedformer.attention(q, k, v, is_causal=causal, enable_gqa=gqa, backend=backend_of(provider))
    if provider == "flex":
        return _flex(q, k, v, causal)
    with _sdpa_context(provider):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def _sdpa_context(provider: str):
    if provider == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}[provider]
    return sdpa_kernel([kind])


@pytest.mark.parametrize("provider", fused_providers("attention") + variant_providers("attention")
                         + PEERS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention(benchmark, provider, causal, dtype, shape, mode):
    b, h, hkv, t, d = shape if len(shape) == 5 else (shape[0], shape[1], shape[1], *shape[2:])
    if provider == "sdpa-math" and t > 4096:
        pytest.skip("the math backend materializes B*H*T*T scores")
    q = torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, hkv, t, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0) * (3.5 if mode == "fwd+bwd" else 1.0)

    def run():
        if mode == "fwd":
            with torch.no_grad():
                return _attend(provider, q, k, v, causal)
        grads(_attend(provider, q, k, v, causal), (q, k, v), do)

    try:
        run()
    except RuntimeError as e:  # an SDPA backend that does not take this shape/dtype here
        pytest.skip(f"{provider}: {e}")
    measure(benchmark, run, provider=provider, dtype=str(dtype), shape=shape, mode=mode,
            causal=causal, flops=flops)


# Decoding: one query row a head against a KV cache, shapes (B, HQ, HKV, LK, D), GQA where
# HKV < HQ (Llama's 32 query heads on 8 kv heads). Memory-bound: the floor is reading K and V
# once (the bytes below), so "% ceil" is against the copy rate; the fused forwards split the
# keys across SMs or threads (split-KV) when the heads alone would leave them idle.
if ON_GPU:
    DECODE_SHAPES = [(1, 16, 16, 32768, 128), (8, 32, 32, 8192, 128), (8, 32, 8, 8192, 128)]
    DECODE_DTYPES = [torch.bfloat16]
else:
    DECODE_SHAPES = [(1, 1, 1, 32768, 128), (4, 16, 16, 2048, 128), (4, 32, 8, 2048, 128)]
    DECODE_DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("provider", fused_providers("attention") + variant_providers("attention")
                         + [p for p in PEERS if p not in ("flex", "sdpa-math")])
@pytest.mark.parametrize("dtype", DECODE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=str)
def test_attention_decode(benchmark, provider, dtype, shape):
    b, hq, hkv, lk, d = shape
    q = torch.randn(b, hq, 1, d, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(b, hkv, lk, d, device=DEVICE, dtype=dtype) for _ in range(2))

    def run():
        return _attend(provider, q, k, v)

    try:
        run()
    except RuntimeError as e:
        pytest.skip(f"{provider}: {e}")
    measure(benchmark, run, provider=provider, dtype=str(dtype), shape=shape, mode="decode",
            bytes=2 * k.numel() * k.element_size())


# A learned additive bias (T5's relative position bias: one (T, T) table per head, broadcast
# over the batch) trained with the model: fwd+bwd with the gradients of q, k, v and the bias.
# SDPA differentiates the bias itself; the fused backends take dq, dk, dv from their kernels
# and the bias's gradient from torch ops over blocks of query rows (ops._attention_mask_grad).
BIAS_SHAPES = [(4, 16, 2048, 128)] if ON_GPU else [(2, 8, 1024, 64)]


@pytest.mark.parametrize("provider", fused_providers("attention") + ["sdpa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
def test_attention_bias_grad(benchmark, provider, dtype, shape):
    b, h, t, d = shape
    q, k, v = (torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, h, t, t, device=DEVICE, dtype=dtype, requires_grad=True)
    do = torch.randn_like(q)
    flops = 4 * b * h * t * t * d * 3.5

    def run():
        if provider == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, bias)
        else:
            o = fusedformer.attention(q, k, v, bias, backend=backend_of(provider))
        grads(o, (q, k, v, bias), do)

    measure(benchmark, run, provider=provider, dtype=str(dtype), shape=shape, mode="fwd+bwd",
            flops=flops)
