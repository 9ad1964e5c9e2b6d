"""Attention on the compiled backends (cpu: csrc/cpu/attention.cpp; cuda: csrc/cuda/attention.cu
in the gpu tier): forward and dq/dk/dv vs the float64 oracle under the FlashAttention rule,
masks of every kind, GQA/MQA, fully masked rows, strides, Philox dropout, determinism,
torch.compile, and the error messages of both the public API and the C++ boundary."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_close, assert_rule, backend_params, require_backend

import fusedformer
from fusedformer.kernels import cpp_backend, reference, testing

BACKENDS = [p for p in backend_params("attention") if p.values[0] in ("cpu", "cuda")]

# (B, HQ, HKV, LQ, LK, D, causal, mask kind): T = 1, 97, 257; D = 32, 40, 80, 96, 128 and D = 7, 20
# (not a multiple of the CPU kernel's 8-wide vectors); LQ != LK; B·H = 1; GQA (HQ = 2·HKV) and
# MQA (HKV = 1); every mask kind, with and without causal.
CASES = [
    (1, 1, 1, 1, 1, 32, False, "none"),
    (1, 1, 1, 97, 97, 40, True, "none"),
    (2, 4, 2, 97, 257, 80, False, "key_padding"),
    (1, 4, 1, 257, 97, 128, True, "key_padding"),
    (2, 2, 2, 97, 130, 32, True, "bool_2d"),
    (1, 3, 3, 257, 257, 40, False, "bool_2d"),
    (1, 2, 1, 130, 97, 80, False, "float"),
    (1, 2, 2, 97, 70, 96, True, "key_padding"),
    (2, 4, 4, 97, 97, 128, True, "float"),
    (2, 2, 1, 70, 45, 20, True, "key_padding"),
    (1, 2, 2, 13, 150, 7, False, "float"),
]


def _mask(kind, b, hq, lq, lk, dtype, device):
    """A mask of `kind` that leaves key 0 visible to every row (so no row is fully masked and
    PyTorch's SDPA, the yardstick, is well defined)."""
    if kind == "none":
        return None
    if kind == "key_padding":  # (B, 1, 1, LK) bool
        m = torch.rand(b, 1, 1, lk, device=device) > 0.25
    elif kind == "bool_2d":  # (LQ, LK) bool
        m = torch.rand(lq, lk, device=device) > 0.3
    else:  # (1, HQ, LQ, LK) additive, with -inf entries
        m = torch.randn(1, hq, lq, lk, device=device).to(dtype)
        m = m.masked_fill(torch.rand(1, hq, lq, lk, device=device) < 0.2, float("-inf"))
        m[..., 0] = 0.5
        return m
    m[..., 0] = True
    return m


def _run(fn, inputs, do):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    o = fn(*leaves)
    return [o.detach(), *torch.autograd.grad(o, leaves, do.to(o.dtype))]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_rule(backend, device, dtype, case):
    """fused vs PyTorch's same-dtype SDPA, both against the float64 oracle: o, dq, dk, dv."""
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d, causal, kind = case
    q = torch.randn(b, hq, lq, d, dtype=dtype, device=device)
    k, v = (torch.randn(b, hkv, lk, d, dtype=dtype, device=device) for _ in range(2))
    do = torch.randn(b, hq, lq, d, dtype=dtype, device=device)
    mask = _mask(kind, b, hq, lq, lk, dtype, device)
    tril = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    if not causal or mask is None:
        sdpa_mask, sdpa_causal = mask, causal
    elif mask.dtype == torch.bool:
        sdpa_mask, sdpa_causal = mask & tril, False
    else:
        sdpa_mask, sdpa_causal = mask.masked_fill(~tril, float("-inf")), False

    def fused(q, k, v):
        return fusedformer.attention(q, k, v, mask, is_causal=causal, enable_gqa=True, backend=backend)

    def pytorch(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, sdpa_mask, is_causal=sdpa_causal, enable_gqa=True)

    def oracle(q, k, v):
        return reference.attention_ref(q, k, v, mask, is_causal=causal, enable_gqa=True)

    got, ours = _run(fused, (q, k, v), do), _run(pytorch, (q, k, v), do)
    truth = _run(oracle, [t.double() for t in (q, k, v)], do.double())
    assert_rule([testing.compare(*z) for z in zip(("o", "dq", "dk", "dv"), got, ours, truth)])


# Split-KV cases (B, HQ, HKV, LQ, LK, D, causal, mask kind): decoding (one query row against a
# long cache) with GQA and key padding; causal with LQ = LK, where the ranges past a query
# block's diagonal are empty; more ranges than key blocks; an additive mask.
SPLIT_CASES = [
    (2, 4, 2, 1, 517, 64, False, "key_padding"),
    (1, 2, 2, 150, 150, 40, True, "none"),
    (1, 1, 1, 5, 70, 128, False, "float"),
    (1, 2, 1, 3, 300, 80, False, "bool_2d"),
]


def _ext():
    from fusedformer.kernels.dispatch import extension

    return extension()[0]


def _fp32_atol(device: str, cpu: float, cuda: float) -> float:
    """The split-KV and decoding tests' fp32 tolerances. Worst errors of the CPU kernel measured
    on 5-20 seeds (2026-12-03): lse against fp64 7.3e-7 (fp32 rounding near 8); split against
    unsplit, o 1.8e-7 and lse 9.5e-7 (one ulp near 8); decoding o 5.7e-8, lse 3.7e-7, gradients
    8.6e-8. The CUDA kernels take exp and log through __expf / __logf, a few ulp more and
    growing with |x|, and have never run on a GPU: they keep the 2e-5 (5e-5 for gradients) this
    file uses for fp32 elsewhere until a GPU run measures them."""
    return cpu if device == "cpu" else cuda


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "-".join(map(str, c)))
def test_split_kv_forward(backend, device, dtype, splits, case):
    """The forward split into key ranges (each its own o and lse, merged by lse) vs PyTorch's
    same-dtype SDPA against the float64 oracle: o under the rule, lse to fp32 rounding."""
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d, causal, kind = case
    q = torch.randn(b, hq, lq, d, dtype=dtype, device=device)
    k, v = (torch.randn(b, hkv, lk, d, dtype=dtype, device=device) for _ in range(2))
    mask = _mask(kind, b, hq, lq, lk, dtype, device)
    wide = reference.attention_ref(q.double(), k.double(), v.double(), mask, is_causal=causal, enable_gqa=True,
                                   return_lse=True)
    kv = [t.repeat_interleave(hq // hkv, dim=1) for t in (k, v)]
    tril = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    sdpa_mask = tril if causal else mask
    ours = F.scaled_dot_product_attention(q, *kv, sdpa_mask)
    ext_mask = mask if mask is None or mask.dim() == 4 else mask[None, None]  # the binding takes 4-D masks
    o, lse = _ext().attention_fwd(q, k, v, ext_mask, d ** -0.5, causal, 0.0, 0, splits)
    assert_rule([testing.compare("o", o, ours, wide[0])])
    assert_close("lse", lse, wide[1].float(), atol=_fp32_atol(device, 2e-6, 2e-5))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_split_kv_keeps_dropout_bits_and_dead_rows(backend, device):
    """Each key's Philox keep bit is the same in every split (so split and unsplit outputs agree
    to rounding), and a row with every key masked is o = 0, lse = -inf after the merge, its
    ranges all empty."""
    require_backend("attention", backend, device)
    ext = _ext()
    q = torch.randn(1, 2, 40, 64, device=device)
    k, v = (torch.randn(1, 2, 600, 64, device=device) for _ in range(2))
    mask = torch.rand(1, 1, 40, 600, device=device) > 0.3
    mask[..., [0, 17, 39], :] = False
    whole = ext.attention_fwd(q, k, v, mask, 0.125, False, 0.3, 1234, 1)
    for splits in (2, 5, 9):
        o, lse = ext.attention_fwd(q, k, v, mask, 0.125, False, 0.3, 1234, splits)
        assert_close(f"o ({splits} splits)", o, whole[0], atol=_fp32_atol(device, 5e-7, 2e-5))
        assert torch.equal(torch.isneginf(lse), torch.isneginf(whole[1]))
        assert torch.isneginf(lse[:, :, [0, 17, 39]]).all()
        assert torch.equal(o[:, :, [0, 17, 39]], torch.zeros_like(o[:, :, [0, 17, 39]]))
        live = torch.isfinite(lse)
        assert_close(f"lse ({splits} splits)", lse[live], whole[1][live], atol=_fp32_atol(device, 2e-6, 2e-5))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_decoding_through_the_public_api_matches_the_oracle(backend, device):
    """One head's query row against a long cache, num_splits left to the backend (split-KV on a
    CPU with two or more threads, and on any GPU): o, lse and every gradient."""
    require_backend("attention", backend, device)
    if device == "cpu" and torch.get_num_threads() >= 2:  # the CPU kernel's 64-key blocks
        assert _ext().attention_num_splits(1, 16, torch.get_num_threads()) >= 2
    q = torch.randn(1, 1, 1, 64, device=device, requires_grad=True)
    k, v = (torch.randn(1, 1, 1000, 64, device=device, requires_grad=True) for _ in range(2))
    mask = torch.rand(1, 1, 1, 1000, device=device) > 0.2
    o, lse = fusedformer.attention(q, k, v, mask, return_lse=True, backend=backend)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = reference.attention_ref(*wide, mask, return_lse=True)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    refs = torch.autograd.grad(o_ref, wide, do.double())
    assert_close("o", o, o_ref, atol=_fp32_atol(device, 3e-7, 2e-5))
    assert_close("lse", lse, lse_ref, atol=_fp32_atol(device, 2e-6, 2e-5))
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
        assert_close(name, g, r, atol=_fp32_atol(device, 5e-7, 5e-5))


# (LQ, D, HQ, HKV, causal, mask kind), LK = 301. The CPU kernel's decoding forward packs the query
# heads of a kv head into one task, at most 64 rows: HQ = 20 on one kv head with LQ = 4 makes
# packs of 16 and 4 heads; 16-bit keys are converted in registers below 8 rows a task and
# into an fp32 tile from 8 on. Top-left causal with LQ < LK leaves query row 0 one key.
FEW_ROWS = [
    (1, 7, 3, 3, False, "key_padding"),
    (1, 40, 3, 1, False, "float"),
    (3, 80, 3, 3, True, "bool_2d"),
    (2, 128, 3, 3, False, "float"),
    (4, 64, 3, 1, False, "key_padding"),
    (1, 256, 3, 3, True, "key_padding"),
    (4, 32, 20, 1, True, "float"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FEW_ROWS, ids=lambda c: "-".join(map(str, c)))
def test_few_query_rows(backend, device, dtype, case):
    """Decoding shapes, through the CPU kernel's decoding forward (scores as dot products laid
    out a row per query, the softmax along the keys, P V by rows, GQA heads packed; head dims
    off its 16-wide vectors and 8-vector strips), forward and every gradient under the rule."""
    require_backend("attention", backend, device)
    lq, d, hq, hkv, causal, kind = case
    q = torch.randn(2, hq, lq, d, dtype=dtype, device=device)
    k, v = (torch.randn(2, hkv, 301, d, dtype=dtype, device=device) for _ in range(2))
    do = torch.randn(2, hq, lq, d, dtype=dtype, device=device)
    mask = _mask(kind, 2, hq, lq, 301, dtype, device)
    sdpa_mask = mask
    if causal:
        tril = torch.ones(lq, 301, dtype=torch.bool, device=device).tril()
        sdpa_mask = mask & tril if mask.dtype == torch.bool else mask.masked_fill(~tril, float("-inf"))
    got = _run(lambda q, k, v: fusedformer.attention(q, k, v, mask, is_causal=causal, enable_gqa=True, backend=backend),
               (q, k, v), do)
    ours = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, sdpa_mask, enable_gqa=True), (q, k, v), do)
    truth = _run(lambda q, k, v: reference.attention_ref(q, k, v, mask, is_causal=causal, enable_gqa=True),
                 [t.double() for t in (q, k, v)], do.double())
    assert_rule([testing.compare(*z) for z in zip(("o", "dq", "dk", "dv"), got, ours, truth)])


@pytest.mark.parametrize("blocks,key_blocks,workers,expected", [
    (132, 64, 132, 1),    # the grid fills the GPU: no split
    (106, 64, 132, 1),    # four fifths of it does too
    (16, 3, 132, 1),      # too few key blocks to share out
    (1, 1000, 2, 2),      # decoding one head on two CPU threads
    # 16 decoding heads on an H100: 7 ranges keep 112 of 132 SMs busy, within 85% of the best
    # (8: 128 busy), and leave less to merge
    (16, 64, 132, 7),
    (4, 11, 108, 4),      # 11 key blocks: 5 ranges would be as long as 4 (3 blocks), so 4
    (1, 4096, 132, 111),  # the smallest count within 85% of 128 ranges (the cap) that shortens a range
])
def test_split_heuristic(blocks, key_blocks, workers, expected):
    require_backend("attention", "cpu", "cpu")
    splits = _ext().attention_num_splits(blocks, key_blocks, workers)
    assert splits == expected
    assert splits == 1 or -(-key_blocks // splits) >= 2  # every range at least two key blocks


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lse_and_fully_masked_rows(backend, device):
    """A row with every key masked (by a bool row, an all -inf float row, or causal with a
    padded first key): o == 0, lse == -inf, finite zero dq; the other rows match the oracle."""
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 70, 75, 40
    q = torch.randn(b, hq, lq, d, device=device, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, device=device, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, device=device, requires_grad=True)
    masks = {
        "bool": torch.rand(b, 1, lq, lk, device=device) > 0.3,
        "float": torch.randn(1, hq, lq, lk, device=device),
        "causal": torch.ones(b, 1, 1, lk, dtype=torch.bool, device=device),
    }
    masks["bool"][:, :, [0, 33, 69]] = False
    masks["float"][:, :, [5, 64]] = float("-inf")
    masks["causal"][..., 0] = False  # causal row 0 sees only key 0
    dead_rows = {"bool": [0, 33, 69], "float": [5, 64], "causal": [0]}
    do = torch.randn(b, hq, lq, d, device=device)
    for name, mask in masks.items():
        causal = name == "causal"
        o, lse = fusedformer.attention(q, k, v, mask, is_causal=causal, enable_gqa=True,
                                       return_lse=True, backend=backend)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
        wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
        o_ref, lse_ref = reference.attention_ref(*wide, mask, is_causal=causal, enable_gqa=True,
                                                 return_lse=True)
        refs = torch.autograd.grad(o_ref, wide, do.double())
        rows = dead_rows[name]
        assert torch.equal(o[:, :, rows], torch.zeros_like(o[:, :, rows])), name
        assert torch.isneginf(lse[:, :, rows]).all(), name
        assert torch.equal(dq[:, :, rows], torch.zeros_like(dq[:, :, rows])), name
        assert all(torch.isfinite(g).all() for g in (dq, dk, dv)), name
        live = torch.isfinite(lse_ref)
        assert torch.equal(live, torch.isfinite(lse)), name
        assert_close(f"{name} lse", lse[live], lse_ref[live], atol=2e-5)
        assert_close(f"{name} o", o, o_ref, atol=2e-5)
        for gname, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), refs):
            assert_close(f"{name} {gname}", g, r, atol=5e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_inputs_and_expanded_grads(backend, device):
    """(B, L, H, D) storage seen as (B, H, L, D), a last-dim stride of 2, a stride-0 mask and
    the stride-0 gradient of o.sum(): read through strides (or copied), never as contiguous."""
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 33, 50, 32
    q = torch.randn(b, lq, hq, d, device=device).transpose(1, 2).requires_grad_()  # (B, HQ, LQ, D)
    k = torch.randn(b, hkv, lk, 2 * d, device=device)[..., ::2].requires_grad_()   # last stride 2
    v = torch.randn(lk, b, hkv, d, device=device).permute(1, 2, 0, 3).requires_grad_()
    keys = torch.rand(1, 1, 1, lk, device=device) > 0.2
    keys[..., 0] = True
    mask = keys.expand(b, hq, lq, lk)  # stride 0 on the first three dims
    o = fusedformer.attention(q, k, v, mask, enable_gqa=True, backend=backend)
    o.sum().backward()
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o_ref = reference.attention_ref(*wide, mask, enable_gqa=True)
    o_ref.sum().backward()
    assert_close("o", o, o_ref, atol=2e-5)
    for name, g, w in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), wide):
        assert_close(name, g, w.grad, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strides_change_nothing(backend, device, dtype):
    """The same values through the strided views of test_strided_inputs_and_expanded_grads and
    contiguous: bitwise the same output, lse and gradients (strides only move the reads; bf16
    runs the tile kernels on a CPU with AVX512_BF16, which stage their operands through strides)."""
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 70, 97, 40
    q = torch.randn(b, lq, hq, d, device=device).to(dtype).transpose(1, 2)
    k = torch.randn(b, hkv, lk, 2 * d, device=device).to(dtype)[..., ::2]
    v = torch.randn(lk, b, hkv, d, device=device).to(dtype).permute(1, 2, 0, 3)
    do = torch.randn(b, lq, hq, d, device=device).to(dtype).transpose(1, 2)
    results = []
    for qkv, g in (((q, k, v), do), ((q.contiguous(), k.contiguous(), v.contiguous()), do.contiguous())):
        leaves = [t.detach().requires_grad_() for t in qkv]
        o, lse = fusedformer.attention(*leaves, is_causal=True, enable_gqa=True, return_lse=True, backend=backend)
        results.append([o, lse, *torch.autograd.grad(o, leaves, g)])
    for name, a, c in zip(("o", "lse", "dq", "dk", "dv"), *results):
        assert torch.equal(a, c), name


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_bf16_on_the_fma_kernels(case, monkeypatch):
    """FUSEDFORMER_CPU_BF16=fma keeps bf16 on the fp32 FMA forward and backward (the path of a
    CPU without AVX512_BF16, which a machine with it would otherwise never run for bf16): under
    the rule too. The backward takes the tile kernels for every query length, so the
    decoding-sized cases count here as well."""
    require_backend("attention", "cpu", "cpu")
    monkeypatch.setenv("FUSEDFORMER_CPU_BF16", "fma")
    test_rule("cpu", "cpu", torch.bfloat16, case)


def _bf16_units() -> list[str]:
    from fusedformer.kernels.dispatch import extension

    return extension()[0].build_info()["cpu_bf16_units"].split(", ")


@pytest.mark.parametrize("unit", ["dpbf16", "amx"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_bf16_tile_units_under_the_rule(unit, case, monkeypatch):
    """The tile kernels (fwd_amx, bwd_amx_*) on each unit that runs them, forced: AMX's tiles,
    or vdpbf16ps on the same staged operands (the default on a CPU with AVX512_BF16 and no AMX)."""
    require_backend("attention", "cpu", "cpu")
    if unit not in _bf16_units():
        pytest.skip(f"this build or CPU has no {unit} (has {', '.join(_bf16_units())})")
    monkeypatch.setenv("FUSEDFORMER_CPU_BF16", unit)
    test_rule("cpu", "cpu", torch.bfloat16, case)


def test_bf16_unit_errors_are_clear(monkeypatch):
    require_backend("attention", "cpu", "cpu")
    q = torch.randn(1, 2, 70, 16, dtype=torch.bfloat16)
    monkeypatch.setenv("FUSEDFORMER_CPU_BF16", "tensor-cores")
    with pytest.raises(ValueError, match="FUSEDFORMER_CPU_BF16 must be fma, dpbf16 or amx, got 'tensor-cores'"):
        fusedformer.attention(q, q, q, backend="cpu")
    missing = [u for u in ("dpbf16", "amx") if u not in _bf16_units()]
    for unit in missing:
        monkeypatch.setenv("FUSEDFORMER_CPU_BF16", unit)
        with pytest.raises(ValueError, match=f"FUSEDFORMER_CPU_BF16={unit}: this build or CPU lacks it"):
            fusedformer.attention(q, q, q, backend="cpu")


# (B, HQ, HKV, LQ, LK, D, causal, mask, scale): head dims the rule cases skip (200, 256, 33),
# one key, key counts around the AMX tiles (127, 128, 129), negative and small scales.
AMX_CASES = [
    (1, 2, 1, 65, 1, 256, False, None, None),
    (2, 4, 2, 129, 128, 200, True, "bool", None),
    (1, 3, 1, 64, 129, 33, False, "float", -0.3),
    (1, 2, 2, 5, 127, 128, True, None, 0.05),
]


@pytest.mark.parametrize("unit", ["dpbf16", "amx"])
@pytest.mark.parametrize("case", AMX_CASES, ids=lambda c: "-".join(map(str, c)))
def test_tile_units_within_twice_the_fma_error(unit, case, monkeypatch):
    """bf16 on the tile kernels (fwd_amx, bwd_amx_*: bf16 P and dS), on AMX or vdpbf16ps, against
    the fp32 FMA kernels on the same inputs: o, lse and every gradient within 2x the FMA path's
    error vs float64 plus 5e-5, and finite exactly where the oracle is. The floor, measured on
    AMX: with one key the FMA path's dq and dk are exactly 0 and AMX's 1.6e-6 and 3.7e-6 (its P
    is 2^x to 8e-8, not exactly 1); in a 66-case random sweep of shapes, masks and scales the
    tightest case needed 2.4e-5 (dq 9.9e-4 against the FMA path's 4.8e-4, D = 7, scale -0.3).
    On vdpbf16ps (2-core AMD EPYC) these cases pass, but a 44-case random sweep had 4 MHA cases
    over the bound by one bf16 rounding of an output element (dk 6.07e-3 against the FMA
    path's 2.72e-3 at 33 x 40, D = 33, bool mask); each was within 1.0x torch's bf16 SDPA
    error there, which is the rule test_bf16_tile_units_under_the_rule holds every case to."""
    require_backend("attention", "cpu", "cpu")
    if unit not in _bf16_units():
        pytest.skip(f"this build or CPU has no {unit} (has {', '.join(_bf16_units())})")
    b, hq, hkv, lq, lk, d, causal, kind, scale = case
    torch.manual_seed(lq + lk + d)
    q = torch.randn(b, hq, lq, d).bfloat16()
    k, v = (torch.randn(b, hkv, lk, d).bfloat16() for _ in range(2))
    mask = {None: None, "bool": torch.rand(b, 1, lq, lk) > 0.3,
            "float": torch.randn(1, hq, lq, lk).bfloat16()}[kind]
    if kind == "bool":
        mask[..., 0] = True
    do = torch.randn(b, hq, lq, d).bfloat16()

    def outputs(unit: str, dtype=torch.bfloat16):
        monkeypatch.setenv("FUSEDFORMER_CPU_BF16", unit)
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        m = mask.to(dtype) if mask is not None and mask.is_floating_point() else mask
        if dtype == torch.float64:
            o, lse = reference.attention_ref(*leaves, m, 0.0, causal, scale, True, return_lse=True)
        else:
            o, lse = fusedformer.attention(*leaves, m, is_causal=causal, scale=scale, enable_gqa=True,
                                           return_lse=True, backend="cpu")
        return [o, lse, *torch.autograd.grad(o, leaves, do.to(dtype))]

    failed = []
    for name, tiles, fma, truth in zip(("o", "lse", "dq", "dk", "dv"), outputs(unit), outputs("fma"),
                                       outputs(unit, torch.float64)):
        live = torch.isfinite(truth)
        if not torch.equal(torch.isfinite(tiles), live):
            failed.append(f"{name}: finite elsewhere than the oracle")
            continue
        err_tiles = (tiles.double() - truth)[live].abs().max().item()
        err_fma = (fma.double() - truth)[live].abs().max().item()
        if err_tiles > 2 * err_fma + 5e-5:
            failed.append(f"{name}: {unit} {err_tiles:.3g} > 2 x FMA {err_fma:.3g} + 5e-5")
    assert not failed, "; ".join(failed)


SCHEDULE_CASES = [(1, 4, 1, 100, 130, 64, True), (2, 2, 2, 65, 200, 40, False), (1, 3, 1, 5, 70, 128, False)]


def _schedule_grads(case, dtype, schedule, monkeypatch):
    """dq, dk, dv of `case` (B, HQ, HKV, LQ, LK, D, causal) on the cpu backend with the backward
    forced to `schedule` (FUSEDFORMER_CPU_BWD_SCHEDULE), from inputs seeded by the case."""
    b, hq, hkv, lq, lk, d, causal = case
    torch.manual_seed(lq + lk)
    q = torch.randn(b, hq, lq, d).to(dtype)
    k, v = (torch.randn(b, hkv, lk, d).to(dtype) for _ in range(2))
    do = torch.randn(b, hq, lq, d).to(dtype)
    monkeypatch.setenv("FUSEDFORMER_CPU_BWD_SCHEDULE", schedule)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = fusedformer.attention(*leaves, is_causal=causal, enable_gqa=True, backend="cpu")
    return torch.autograd.grad(o, leaves, do)


@pytest.mark.parametrize("dtype,unit", [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None),
                                        (torch.bfloat16, "fma")], ids=str)
@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_backward_schedules_agree(dtype, unit, case, monkeypatch):
    """The fused schedule (one task per (batch, kv head)) and the split one (dK/dV and dQ passes
    for small grids) add every tile's products in the same order: bitwise the same gradients,
    for the fp32 FMA kernels (every dtype) and the bf16 tile kernels. The per-head schedule sums each head's
    dK, dV apart before the group's sum, so its bits differ, but two of its runs agree bitwise
    (no atomics); test_rule_per_schedule holds each schedule to the rule."""
    require_backend("attention", "cpu", "cpu")
    if unit:
        monkeypatch.setenv("FUSEDFORMER_CPU_BF16", unit)
    fused, split, heads, again = (_schedule_grads(case, dtype, s, monkeypatch)
                                  for s in ("fused", "split", "heads", "heads"))
    for name, a, b, c, c2 in zip(("dq", "dk", "dv"), fused, split, heads, again):
        assert torch.equal(a, b), name
        assert torch.equal(c, c2), name


@pytest.mark.parametrize("schedule", ["fused", "split", "heads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_rule_per_schedule(schedule, dtype, case, monkeypatch):
    """Each backward schedule, forced whatever the grid and thread count would choose, under
    the rule on every rule case (bf16: on the tile kernels where the CPU has them)."""
    require_backend("attention", "cpu", "cpu")
    monkeypatch.setenv("FUSEDFORMER_CPU_BWD_SCHEDULE", schedule)
    test_rule("cpu", "cpu", dtype, case)


def test_unknown_schedule_is_a_clear_error(monkeypatch):
    require_backend("attention", "cpu", "cpu")
    monkeypatch.setenv("FUSEDFORMER_CPU_BWD_SCHEDULE", "fastest")
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    o = fusedformer.attention(q, q, q, backend="cpu")
    with pytest.raises(ValueError, match="FUSEDFORMER_CPU_BWD_SCHEDULE must be fused, split or heads, got 'fastest'"):
        o.sum().backward()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lq", [70, 3])  # the 16-bit forwards: bf16 on the tile kernels where the CPU has them; decoding
def test_fully_masked_rows_16bit(backend, device, dtype, lq):
    """16-bit inputs, rows with every key masked (bool, all -inf float, causal with a padded first
    key): o == 0 and lse == -inf there, every output and gradient finite, the live rows' lse
    within 2e-6 of the float64 oracle on the same rounded inputs on the CPU (max 6.1e-7 measured
    over 10 seeds, bool masks, causal and not; cuda keeps _fp32_atol's 2e-5 until measured)."""
    require_backend("attention", backend, device)
    b, hq, hkv, lk, d = 2, 4, 2, 300, 40
    q = torch.randn(b, hq, lq, d, device=device).to(dtype).requires_grad_()
    k, v = (torch.randn(b, hkv, lk, d, device=device).to(dtype).requires_grad_() for _ in range(2))
    dead = [0, lq - 1]
    masks = {"bool": torch.rand(b, 1, lq, lk, device=device) > 0.3,
             "float": torch.randn(1, hq, lq, lk, device=device).to(dtype),
             "causal": torch.ones(b, 1, 1, lk, dtype=torch.bool, device=device)}
    masks["bool"][:, :, dead] = False
    masks["float"][:, :, dead] = float("-inf")
    masks["causal"][..., 0] = False  # causal row 0 sees only key 0
    for name, mask in masks.items():
        causal, rows = name == "causal", [0] if name == "causal" else dead
        o, lse = fusedformer.attention(q, k, v, mask, is_causal=causal, enable_gqa=True, return_lse=True,
                                       backend=backend)
        grads = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
        wide_mask = mask.double() if mask.is_floating_point() else mask
        _, lse_ref = reference.attention_ref(q.double(), k.double(), v.double(), wide_mask, is_causal=causal,
                                             enable_gqa=True, return_lse=True)
        assert torch.equal(o[:, :, rows], torch.zeros_like(o[:, :, rows])), name
        assert torch.isneginf(lse[:, :, rows]).all(), name
        assert all(torch.isfinite(t).all() for t in (o, *grads)), name
        live = torch.isfinite(lse_ref)
        assert torch.equal(live, torch.isfinite(lse)), name
        assert_close(f"{name} lse", lse[live], lse_ref[live].float(), atol=_fp32_atol(device, 2e-6, 2e-5))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_16bit_under_the_rule(backend, device, dtype, causal):
    """16-bit forward with dropout (on the CPU, bf16 runs the tile forward where the CPU has it):
    o against PyTorch's same-dtype ops fed the kernels' keep-mask, both against float64."""
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d, p, seed = 2, 4, 2, 77, 300, 40, 0.3, 20261203
    q = torch.randn(b, hq, lq, d, device=device).to(dtype)
    k, v = (torch.randn(b, hkv, lk, d, device=device).to(dtype) for _ in range(2))
    o, _ = cpp_backend.attention_fwd(q, k, v, None, d ** -0.5, causal, p, seed)
    keep = cpp_backend.attention_dropout_mask(seed, (b, hq, lq, lk), p, device)
    ours = reference.attention_ref(q, k, v, None, p, causal, d ** -0.5, enable_gqa=True, dropout_mask=keep)
    wide = reference.attention_ref(q.double(), k.double(), v.double(), None, p, causal, d ** -0.5,
                                   enable_gqa=True, dropout_mask=keep)
    assert_rule([testing.compare("o", o, ours, wide)])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,hkv", [(77, 2), (3, 2), (1, 4), (4, 1)])  # and the decoding forward's packs
def test_dropout_matches_oracle_with_its_mask(backend, device, causal, lq, hkv):
    """The kernels draw Philox keep-masks: output and grads equal the oracle fed the mask from
    attention_dropout_mask(seed, ...); the same seed gives the same result."""
    require_backend("attention", backend, device)
    b, hq, lk, d, p, seed = 2, 4, 70, 40, 0.3, 20261123
    q = torch.randn(b, hq, lq, d, device=device)
    k, v = torch.randn(b, hkv, lk, d, device=device), torch.randn(b, hkv, lk, d, device=device)
    do = torch.randn(b, hq, lq, d, device=device)
    scale = d ** -0.5
    o, lse = cpp_backend.attention_fwd(q, k, v, None, scale, causal, p, seed)
    o2, _ = cpp_backend.attention_fwd(q, k, v, None, scale, causal, p, seed)
    o3, _ = cpp_backend.attention_fwd(q, k, v, None, scale, causal, p, seed + 1)
    assert torch.equal(o, o2) and not torch.equal(o, o3)
    grads = cpp_backend.attention_bwd(do, q, k, v, o, lse, None, scale, causal, p, seed)
    keep = cpp_backend.attention_dropout_mask(seed, (b, hq, lq, lk), p, device)
    wide = [t.double().requires_grad_() for t in (q, k, v)]
    o_ref = reference.attention_ref(*wide, None, p, causal, scale, enable_gqa=True, dropout_mask=keep)
    refs = torch.autograd.grad(o_ref, wide, do.double())
    assert_close("o", o, o_ref, atol=2e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
        assert_close(name, g, r, atol=1e-4)
    # Through the public API: torch.manual_seed governs the seed.
    qg = q.clone().requires_grad_()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        out = fusedformer.attention(qg, k, v, dropout_p=p, is_causal=causal, enable_gqa=True, backend=backend)
        runs.append((out, torch.autograd.grad(out, qg, do)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_dropout_mask_statistics():
    require_backend("attention", "cpu", "cpu")
    keep = cpp_backend.attention_dropout_mask(5, (2, 4, 128, 160), 0.3)
    assert keep.shape == (2, 4, 128, 160) and keep.dtype == torch.bool
    rate = keep.float().mean().item()
    assert abs(rate - 0.7) < 0.01, rate  # 163840 draws: std of the rate 0.0011
    assert abs(keep[0, 0].float().mean().item() - 0.7) < 0.03  # no head or row pattern
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])
    assert cpp_backend.attention_dropout_mask(5, (1, 1, 4, 4), 0.0).all()
    # Philox4x32-10 itself: Random123's known answer for counter 0, key 0 is (0x6627e8d5,
    # 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8), i.e. uniforms 0.399, 0.881, 0.736, 0.605 for
    # elements 0..3 of seed 0 (csrc/philox.h: u = (r >> 8) / 2^24, keep = u >= p).
    first4 = lambda p: cpp_backend.attention_dropout_mask(0, (1, 1, 1, 4), p).flatten().tolist()  # noqa: E731
    assert first4(0.5) == [False, True, True, True]
    assert first4(0.7) == [False, True, True, False]
    assert first4(0.39) == [True, True, True, True] and first4(0.9) == [False] * 4


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_sequences(backend, device):
    """LK = 0: every row fully masked (o = 0, lse = -inf, dq = 0); LQ = 0: dk = dv = 0."""
    require_backend("attention", backend, device)
    q = torch.randn(2, 2, 5, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 0, 16, device=device, requires_grad=True)
    o, lse = fusedformer.attention(q, k, k, return_lse=True, backend=backend)
    o.sum().backward()
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    assert torch.equal(q.grad, torch.zeros_like(q))
    q0 = torch.randn(2, 2, 0, 16, device=device, requires_grad=True)
    k0 = torch.randn(2, 2, 7, 16, device=device, requires_grad=True)
    o0 = fusedformer.attention(q0, k0, k0, is_causal=True, backend=backend)
    o0.sum().backward()
    assert o0.shape == (2, 2, 0, 16) and torch.equal(k0.grad, torch.zeros_like(k0))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic_backward(backend, device):
    """No atomics: two backward passes are bitwise equal (GQA, so dk/dv sum over heads)."""
    require_backend("attention", backend, device)
    q = torch.randn(2, 8, 150, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 140, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, 2, 140, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(2, 8, 150, 64, device=device, dtype=torch.bfloat16)
    runs = [torch.autograd.grad(fusedformer.attention(q, k, v, is_causal=True, enable_gqa=True,
                                                      backend=backend), (q, k, v), do)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    """The custom ops have fake implementations: no graph break, same numbers, fwd + bwd."""
    require_backend("attention", backend, device)
    torch._dynamo.reset()
    mask = torch.rand(2, 1, 1, 40, device=device) > 0.2
    mask[..., 0] = True

    def f(q, k, v):
        o = fusedformer.attention(q, k, v, mask, is_causal=True, enable_gqa=True, backend=backend)
        return (o * o).sum()

    q = torch.randn(2, 4, 31, 32, device=device, requires_grad=True)
    k = torch.randn(2, 2, 40, 32, device=device, requires_grad=True)
    v = torch.randn(2, 2, 40, 32, device=device, requires_grad=True)
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e = f(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    assert_close("loss", loss, loss_e, atol=1e-4)
    for name, a, e in zip(("dq", "dk", "dv"), grads, grads_e):
        assert_close(name, a, e, atol=1e-5)


def _qkv(b=1, hq=2, hkv=2, lq=8, lk=8, d=16, dtype=torch.float32):
    return (torch.randn(b, hq, lq, d, dtype=dtype), torch.randn(b, hkv, lk, d, dtype=dtype),
            torch.randn(b, hkv, lk, d, dtype=dtype))


@pytest.mark.parametrize("call,exc,match", [
    (lambda q, k, v: fusedformer.attention(q[0, 0], k, v), ValueError, "query must be"),
    (lambda q, k, v: fusedformer.attention(q, k.half(), v), TypeError, "key must have the dtype of query"),
    (lambda q, k, v: fusedformer.attention(q, k[:, :, :, :8], v), ValueError, "key head dim must equal"),
    (lambda q, k, v: fusedformer.attention(torch.randn(1, 3, 8, 16), k[:, :2], v[:, :2], enable_gqa=True),
     ValueError, r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    (lambda q, k, v: fusedformer.attention(q, k[:, :1], v[:, :1]), ValueError, "pass enable_gqa=True"),
    (lambda q, k, v: fusedformer.attention(q, k, v, torch.ones(8, 8, dtype=torch.int32)), TypeError,
     "attn_mask must be bool"),
    (lambda q, k, v: fusedformer.attention(q, k, v, torch.ones(3, 8, dtype=torch.bool)), ValueError,
     "does not broadcast"),
    (lambda q, k, v: fusedformer.attention(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda q, k, v: fusedformer.attention(q.double(), k.double(), v.double()), TypeError,
     "backend 'cpu' supports float16, bfloat16 and float32"),
    (lambda q, k, v: fusedformer.attention(*_qkv(d=264)), RuntimeError, r"head dim must be in \[1, 256\], got 264"),
])
def test_bad_input_public_api(call, exc, match):
    require_backend("attention", "cpu", "cpu")
    with fusedformer.use_backend("cpu"), pytest.raises(exc, match=match):
        call(*_qkv())


def test_cpp_checks_have_clear_messages():
    """The pybind11 boundary on its own, below the Python validation."""
    require_backend("attention", "cpu", "cpu")
    from fusedformer.kernels.dispatch import extension

    ext, _ = extension()
    q, k, v = _qkv(hq=4, hkv=2)
    fwd = lambda *a, mask=None, p=0.0: ext.attention_fwd(*a, mask, 0.25, False, p, 0)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"attention_fwd: q must be 4-D \(B, HQ, LQ, D\), got 3-D"):
        fwd(q[0], k, v)
    with pytest.raises(RuntimeError, match="q must be float32, bfloat16 or float16, got Double"):
        fwd(q.double(), k.double(), v.double())
    with pytest.raises(RuntimeError, match="k must have the same dtype as q"):
        fwd(q, k.half(), v)
    with pytest.raises(RuntimeError, match=r"v must have shape \(b, hkv, lk, d\) = \[1, 2, 8, 16\], got \[1, 2, 7, 16\]"):
        fwd(q, k, v[:, :, :7])
    with pytest.raises(RuntimeError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        fwd(q, *_qkv(hq=3, hkv=3)[1:])
    with pytest.raises(RuntimeError, match=r"head dim must be in \[1, 256\], got 300"):
        fwd(*_qkv(d=300))
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        fwd(q, k, v, p=1.5)
    for splits in (-1, 129):
        with pytest.raises(RuntimeError, match=rf"num_splits must be in \[0, 128\] \(0: the backend chooses\), got {splits}"):
            ext.attention_fwd(q, k, v, None, 0.25, False, 0.0, 0, splits)
    with pytest.raises(RuntimeError, match=r"mask must be bool \(True = attend\) or Float"):
        fwd(q, k, v, mask=torch.ones(1, 1, 8, 8, dtype=torch.half))
    with pytest.raises(RuntimeError, match=r"mask must be 4-D"):
        fwd(q, k, v, mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"mask of shape \[1, 3, 8, 8\] does not broadcast to the scores"):
        fwd(q, k, v, mask=torch.ones(1, 3, 8, 8, dtype=torch.bool))
    o, lse = fwd(q, k, v)
    with pytest.raises(RuntimeError, match="attention_bwd: lse must be float32"):
        ext.attention_bwd(o, q, k, v, o, lse.double(), None, 0.25, False, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(b, hq, lq\)"):
        ext.attention_bwd(o, q, k, v, o, lse[..., :3], None, 0.25, False, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"do must have the shape of q \(b, hq, lq, d\) = \[1, 4, 8, 16\], got \[1, 2, 8, 16\]"):
        ext.attention_bwd(o[:, :2], q, k, v, o, lse, None, 0.25, False, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"attention_dropout_mask: dropout_p must be in \[0, 1\)"):
        ext.attention_dropout_mask(0, 1, 1, 2, 2, -0.1)
