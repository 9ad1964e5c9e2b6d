"""Attention on the triton backend (kernels/attention.py, FlashAttention-2 forward and backward)
vs the float64 oracle under the FlashAttention rule: the output and dq, dk, dv, through the
public API. Shapes, masks, GQA/MQA, fully masked rows, lse, strides, dropout, compile, errors.

On this CPU-only machine the kernels run under TRITON_INTERPRET=1 (set by conftest.py), where
bf16 tl.dot is broken and the fp32 -> bf16 cast truncates: for bf16 the launcher upcasts the
dot operands to fp32 (DOT_FP32) and rounds to nearest in bit arithmetic before each cast
(RNE_BF16), so the bf16 cases test the kernels' bf16 rounding of loads, probabilities and
stores as a GPU does them, but not a bf16 mma. The `gpu` tier runs the same tests on CUDA
tensors with the real bf16 dot. Shapes are small (T <= 80 but for one T = 97 and one T = 257
case) to keep the interpreted file at ~50 s of CPU time on 2 cores.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_close, assert_rule, backend_params, require_backend

import fusedformer
from fusedformer.kernels import reference, testing

BACKENDS = [p for p in backend_params("attention") if p.values[0] == "triton"]


def _launchers():
    from fusedformer.kernels import attention

    return attention


def _randn(*shape, dtype, device):
    return torch.randn(*shape, device=device).to(dtype)


def _qkv(b, hq, hkv, lq, lk, d, dtype, device):
    return (_randn(b, hq, lq, d, dtype=dtype, device=device),
            _randn(b, hkv, lk, d, dtype=dtype, device=device),
            _randn(b, hkv, lk, d, dtype=dtype, device=device))


def _grads(fn, inputs, do):
    """[o, dq, dk, dv] of fn(q, k, v) with upstream gradient do."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    o = fn(*leaves)
    o.backward(do.to(o.dtype))
    return [o.detach()] + [t.grad for t in leaves]


def _sdpa_mask(mask, causal, lq, lk, device):
    """The mask SDPA needs for `mask` combined with `causal` (SDPA takes one or the other)."""
    if not causal:
        return mask
    tril = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
    if mask is None:
        return tril
    if mask.dtype == torch.bool:
        return mask & tril
    return mask.masked_fill(~tril, -math.inf)


def _check_rule(backend, q, k, v, mask=None, causal=False, yardstick="sdpa", dropout_p=0.0,
                torch_seed=None):
    """The rule on o, dq, dk, dv. yardstick: "sdpa" (PyTorch's F.scaled_dot_product_attention
    in the same dtype) or "ref" (attention_ref(upcast=False): PyTorch ops in the same dtype,
    where SDPA cannot express the case: fully masked rows, an explicit dropout mask).
    With dropout, torch_seed makes the fused op draw a known seed (see _dropout_seed) and the
    oracle and yardstick get the kernels' keep-mask. Returns the fused [o, dq, dk, dv]."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    gqa = hq != k.shape[1]
    do = torch.randn(q.shape, device=q.device).to(q.dtype)
    keep = None
    if dropout_p > 0:
        keep = _launchers().attention_dropout_mask(_dropout_seed(torch_seed), (b, hq, lq, lk),
                                                   dropout_p, q.device)

    def fused(q, k, v):
        if torch_seed is not None:
            torch.manual_seed(torch_seed)
        with fusedformer.use_backend(backend):
            return fusedformer.scaled_dot_product_attention(q, k, v, mask, dropout_p, causal,
                                                            enable_gqa=gqa)

    def pytorch(q, k, v):
        if yardstick == "sdpa":
            m = _sdpa_mask(mask, causal, lq, lk, q.device)
            return F.scaled_dot_product_attention(q, k, v, m, enable_gqa=gqa)
        return reference.attention_ref(q, k, v, mask, dropout_p, causal, None, gqa,
                                       dropout_mask=keep, upcast=False)

    def oracle(q, k, v):
        m = mask.double() if mask is not None and mask.is_floating_point() else mask
        return reference.attention_ref(q, k, v, m, dropout_p, causal, None, gqa, dropout_mask=keep)

    got = _grads(fused, (q, k, v), do)
    ours = _grads(pytorch, (q, k, v), do)
    truth = _grads(oracle, [t.double() for t in (q, k, v)], do.double())
    assert_rule([testing.compare(*z) for z in zip(("o", "dq", "dk", "dv"), got, ours, truth)])
    return got


# ----------------------------------------------------------------------------------------
# Shapes and dtypes

# (B, HQ, HKV, LQ, LK, D, causal): T = 1, non-multiples of every block (37, 45, 97), LQ != LK
# both ways, the padded head dims 40 and 80, B·H = 1, GQA (4 query heads on 2 kv heads), MQA.
SHAPES = [
    (1, 1, 1, 1, 1, 32, False),
    (1, 2, 2, 1, 9, 64, True),
    (1, 1, 1, 97, 97, 64, True),
    (2, 2, 2, 37, 80, 40, True),
    (1, 2, 2, 80, 37, 80, True),
    (1, 4, 2, 45, 37, 32, False),
    (1, 3, 1, 50, 64, 64, True),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rule_shapes(backend, device, dtype, shape):
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d, causal = shape
    torch.manual_seed(hash(shape) % 1000)
    _check_rule(backend, *_qkv(b, hq, hkv, lq, lk, d, dtype, device), causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,shape", [
    (torch.float32, (1, 1, 1, 33, 40, 128, True)),    # the one D = 128 case
    (torch.float32, (1, 1, 1, 17, 20, 256, False)),   # the largest head dim
    (torch.float16, (1, 1, 1, 257, 257, 32, True)),   # the one T = 257 case: 9 key blocks
], ids=str)
def test_rule_large_dims(backend, device, dtype, shape):
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d, causal = shape
    torch.manual_seed(11)
    _check_rule(backend, *_qkv(b, hq, hkv, lq, lk, d, dtype, device), causal=causal)


def _bwd_tune_candidates() -> list:
    att = _launchers()
    return [pytest.param(dkdv, dq, id=f"dkdv{dkdv[:2]}-w{dkdv[2]}-dq{dq[:2]}")
            for dkdv, dq in zip(att._BWD_DKDV_TUNE_TILES, att._BWD_DQ_TUNE_TILES)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dkdv,dq", _bwd_tune_candidates())
@pytest.mark.parametrize("shape", [(1, 2, 1, 150, 150, 64, True), (1, 2, 2, 70, 140, 40, False)], ids=str)
def test_backward_autotune_candidates(backend, device, dkdv, dq, shape, monkeypatch):
    """Every tile pair the backward's autotuner may pick on a GPU, forced as the fixed config
    (here under the interpreter, in the gpu tier compiled): 150 keys span two of the tallest
    dK/dV tiles (128 keys), and causal puts the stage boundary inside them."""
    require_backend("attention", backend, device)
    att = _launchers()
    (bm1, bn1, w, st), (bm2, bn2, *dq_launch) = dkdv, dq
    assert dq_launch == [w, st], "a forced fixed config launches both kernels alike"
    monkeypatch.setattr(att, "_attention_bwd_config", lambda *a: dict(
        BLOCK_M1=bm1, BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2, num_warps=w, num_stages=st))
    b, hq, hkv, lq, lk, d, causal = shape
    torch.manual_seed(bn1 + bm2 + w + st)
    _check_rule(backend, *_qkv(b, hq, hkv, lq, lk, d, torch.float16, device), causal=causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_check(backend, device, dtype):
    """The check `fusedformer check` runs: GQA, causal, key padding, LQ 37 / LK 45."""
    require_backend("attention", backend, device)
    torch.manual_seed(5)
    assert_rule(testing.check_attention(backend, dtype, device))


# ----------------------------------------------------------------------------------------
# Masks


def _mask(kind, b, hq, lq, lk, dtype, device):
    """Every mask kind the op takes; key 0 is always visible, so no row is fully masked
    (SDPA, the yardstick here, returns NaN for those: see test_fully_masked_rows)."""
    if kind == "bool_key_padding":  # (B, 1, 1, LK)
        m = torch.rand(b, 1, 1, lk, device=device) > 0.3
    elif kind == "bool_2d":  # (LQ, LK), broadcast over B and H
        m = torch.rand(lq, lk, device=device) > 0.3
    elif kind == "float":  # (1, HQ, LQ, LK) in q.dtype, added to the scores
        m = torch.randn(1, hq, lq, lk, device=device).to(dtype)
    else:  # "float_neg_inf": float with -inf entries
        m = torch.randn(1, hq, lq, lk, device=device)
        m = m.masked_fill(torch.rand(1, hq, lq, lk, device=device) < 0.3, -math.inf).to(dtype)
    m[..., 0] = True if m.dtype == torch.bool else 0.0
    return m


MASK_KINDS = ["bool_key_padding", "bool_2d", "float", "float_neg_inf"]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype,causal", [(torch.float32, False), (torch.float32, True),
                                          (torch.bfloat16, True), (torch.float16, False)], ids=str)
def test_rule_masks(backend, device, kind, dtype, causal):
    require_backend("attention", backend, device)
    torch.manual_seed(MASK_KINDS.index(kind) + 10 * causal)
    b, hq, hkv, lq, lk, d = 2, 2, 1, 37, 45, 32
    mask = _mask(kind, b, hq, lq, lk, dtype, device)
    _check_rule(backend, *_qkv(b, hq, hkv, lq, lk, d, dtype, device), mask, causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows(backend, device, dtype, kind):
    """Rows with every key masked: o == 0 exactly, lse == -inf, their dq == 0 exactly, every
    gradient finite, and the other rows still within the rule."""
    require_backend("attention", backend, device)
    torch.manual_seed(21)
    b, hq, lq, lk, d = 1, 2, 70, 50, 32
    rows = [0, 3, 33, 69]  # in the first, second and last query blocks
    keep = torch.rand(b, 1, lq, lk, device=device) > 0.2
    keep[..., 0] = True
    keep[:, :, rows] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device=device).masked_fill(
        ~keep, -math.inf).to(dtype)
    q, k, v = _qkv(b, hq, hq, lq, lk, d, dtype, device)
    o, dq, dk, dv = _check_rule(backend, q, k, v, mask, causal=True, yardstick="ref")
    assert torch.equal(o[:, :, rows], torch.zeros_like(o[:, :, rows]))
    assert torch.equal(dq[:, :, rows], torch.zeros_like(dq[:, :, rows]))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), f"{name} has non-finite entries"
    _, lse = fusedformer.attention(q, k, v, mask, is_causal=True, return_lse=True, backend=backend)
    assert torch.isneginf(lse[:, :, rows]).all()
    assert torch.isfinite(lse[:, :, [1, 2, 34]]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lse(backend, device, dtype):
    """return_lse: the natural-log log-sum-exp of the scaled, masked scores, float32.
    There is no same-dtype PyTorch lse to hold it to, so a fixed bound from measurement:
    max |err| vs the float64 oracle on the same rounded inputs (|lse| up to 6) was 8.1e-7
    for fp32, 5.6e-7 for fp16 and bf16 (products of 16-bit values are exact in fp32);
    3e-6 leaves ~4x margin."""
    require_backend("attention", backend, device)
    torch.manual_seed(31)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 45, 37, 64
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, device)
    mask = _mask("float_neg_inf", b, hq, lq, lk, dtype, device)
    mask[0, 1, 5] = -math.inf  # one fully masked row
    o, lse = fusedformer.attention(q, k, v, mask, is_causal=True, enable_gqa=True,
                                   return_lse=True, backend=backend)
    _, lse_ref = reference.attention_ref(q.double(), k.double(), v.double(), mask.double(),
                                         is_causal=True, enable_gqa=True, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, lq)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert_close("lse", lse[finite], lse_ref[finite], atol=3e-6)


# ----------------------------------------------------------------------------------------
# Split-KV (the forward's FlashDecoding path: forced here, chosen by SM count on a GPU)

# (B, HQ, HKV, LQ, LK, D, causal, mask kind): decoding rows against a cache of several key
# blocks (the interpreter's are 32 keys) with GQA and key padding; causal with LQ = LK, where
# ranges past a query block's diagonal are empty; more ranges than key blocks, an additive mask.
SPLIT_CASES = [
    (2, 4, 2, 1, 150, 64, False, "bool_key_padding"),
    (1, 2, 2, 70, 70, 40, True, None),
    (1, 1, 1, 3, 70, 32, False, "float"),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_split_kv_forward(backend, device, dtype, splits, case):
    """The forward split into key ranges (fp32 partials merged by lse) vs PyTorch's same-dtype
    SDPA against the float64 oracle: o under the rule, lse within test_lse's bound."""
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d, causal, kind = case
    torch.manual_seed(splits + 7 * lq)
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, device)
    mask = _mask(kind, b, hq, lq, lk, dtype, device) if kind else None
    o, lse = _launchers().attention_fwd(q, k, v, mask, d ** -0.5, causal, 0.0, 0, num_splits=splits)
    ours = F.scaled_dot_product_attention(q, k, v, _sdpa_mask(mask, causal, lq, lk, device), enable_gqa=hq != hkv)
    wide_mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    o_ref, lse_ref = reference.attention_ref(q.double(), k.double(), v.double(), wide_mask, is_causal=causal,
                                             enable_gqa=True, return_lse=True)
    assert_rule([testing.compare("o", o, ours, o_ref)])
    assert_close("lse", lse, lse_ref, atol=3e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_split_kv_keeps_dropout_bits_and_dead_rows(backend, device):
    """Each key's Philox keep bit is the same whichever range holds it, so split and unsplit
    outputs agree to fp32 rounding (6 seeds measured o 3.0e-7, lse 4.8e-7 apart); a row with
    every key masked is o = 0, lse = -inf after the merge, all of its ranges empty."""
    require_backend("attention", backend, device)
    torch.manual_seed(3)
    launch = _launchers().attention_fwd
    q, k, v = _qkv(1, 2, 2, 3, 100, 32, torch.float32, device)
    mask = torch.rand(1, 1, 3, 100, device=device) > 0.3
    mask[..., 1, :] = False
    whole = launch(q, k, v, mask, 0.2, False, 0.3, 1234)
    for splits in (2, 4):
        o, lse = launch(q, k, v, mask, 0.2, False, 0.3, 1234, num_splits=splits)
        assert torch.equal(o[:, :, 1], torch.zeros_like(o[:, :, 1])) and torch.isneginf(lse[:, :, 1]).all()
        assert_close(f"o ({splits} splits)", o, whole[0], atol=5e-7)
        assert_close(f"lse ({splits} splits)", lse[:, :, [0, 2]], whole[1][:, :, [0, 2]], atol=1e-6)


# ----------------------------------------------------------------------------------------
# Packed GQA (the forward's decoding path: a kv head's query heads share one tile's rows)

# (B, HQ, HKV, LQ, LK, D, causal, mask kind, dropout_p): one decoding row on 4 heads a kv
# head; 3 rows on a group of 3 (9 rows: a group and LQ not powers of 2) with a per-head
# additive mask and causal; MQA on 5 heads with dropout (20 rows in a 32-row tile); 16 heads
# of 16 rows (256 rows: four row blocks) causal with -inf in the mask.
PACK_CASES = [
    (2, 8, 2, 1, 150, 64, False, "bool_key_padding", 0.0),
    (1, 6, 2, 3, 70, 40, True, "float", 0.0),
    (1, 5, 1, 4, 45, 32, False, None, 0.3),
    (1, 16, 1, 16, 50, 32, True, "float_neg_inf", 0.0),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PACK_CASES, ids=str)
def test_packed_gqa_forward(backend, device, dtype, case):
    """Packed GQA decoding under the rule, o and every gradient (the backward reads the packed
    forward's lse); with dropout the kernels' keep-mask is the oracle's."""
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d, causal, kind, dropout_p = case
    assert _launchers().pack_gqa(hq, hkv, lq)
    torch.manual_seed(hq + lq)
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, device)
    mask = _mask(kind, b, hq, lq, lk, dtype, device) if kind else None
    if dropout_p:
        _check_rule(backend, q, k, v, mask, causal, yardstick="ref", dropout_p=dropout_p, torch_seed=99)
    else:
        _check_rule(backend, q, k, v, mask, causal)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", PACK_CASES, ids=str)
def test_packed_gqa_matches_unpacked(backend, device, splits, case, monkeypatch):
    """fp32, packed and unpacked (FUSEDFORMER_TRITON_PACK_GQA=0), alone and split: the same
    rows, keys, mask entries and dropout bits, so o and lse agree to fp32 rounding (the tiles
    differ, and so does the order of the sums; measured over 3 seeds: max 3.6e-7 (o), 4.8e-7 (lse))."""
    require_backend("attention", backend, device)
    b, hq, hkv, lq, lk, d, causal, kind, dropout_p = case
    torch.manual_seed(5 + hq)
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, torch.float32, device)
    mask = _mask(kind, b, hq, lq, lk, torch.float32, device) if kind else None
    launch = _launchers().attention_fwd
    packed = launch(q, k, v, mask, d ** -0.5, causal, dropout_p, 77, num_splits=splits)
    monkeypatch.setenv("FUSEDFORMER_TRITON_PACK_GQA", "0")
    assert not _launchers().pack_gqa(hq, hkv, lq)
    whole = launch(q, k, v, mask, d ** -0.5, causal, dropout_p, 77, num_splits=splits)
    assert_close("o", packed[0], whole[0], atol=1e-6)
    assert_close("lse", packed[1], whole[1], atol=1e-6)


def test_pack_gqa_rule():
    """Packing is for GQA/MQA with at most PACK_GQA_MAX_LQ query rows."""
    pack = _launchers().pack_gqa
    assert pack(8, 2, 1) and pack(8, 1, 16) and pack(2, 1, 3)
    assert not pack(8, 8, 1)  # MHA: no heads to share a tile
    assert not pack(8, 2, 17)  # a prefill fills its own tiles


@pytest.mark.parametrize("blocks,key_blocks,workers", [
    (132, 64, 132), (106, 64, 132), (16, 3, 132), (1, 1000, 2), (16, 64, 132), (4, 11, 108),
    (1, 4096, 132), (8, 256, 132), (32, 128, 132), (3, 7, 16), (0, 10, 132), (5, 10, 0),
])
def test_split_heuristic_matches_the_cpp_one(blocks, key_blocks, workers):
    """kernels/attention.py's num_splits_heuristic is csrc/attention.h's attention_num_splits
    (the cpu and cuda forwards' count) written in Python: they agree."""
    require_backend("attention", "cpu", "cpu")
    from fusedformer.kernels.dispatch import extension

    expected = extension()[0].attention_num_splits(blocks, key_blocks, workers)
    assert _launchers().num_splits_heuristic(blocks, key_blocks, workers) == expected


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 129, 2.0, True])
def test_split_count_errors(backend, device, bad):
    require_backend("attention", backend, device)
    q = torch.randn(1, 1, 1, 16, device=device)
    with pytest.raises(ValueError, match=rf"num_splits must be an int in \[0, 128\] \(0 = choose\), got {bad!r}"):
        _launchers().attention_fwd(q, q, q, None, 1.0, False, 0.0, 0, num_splits=bad)


# ----------------------------------------------------------------------------------------
# Strides


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_inputs_and_expanded_grads(backend, device):
    """(B, L, H, D) storage seen through transposes, kv heads expanded with stride 0, a
    broadcast mask, the stride-0 gradient of o.sum() and a transposed upstream gradient:
    none may be read as contiguous."""
    require_backend("attention", backend, device)
    torch.manual_seed(41)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 37, 45, 40
    q = torch.randn(b, lq, hq, d, device=device).transpose(1, 2).requires_grad_()
    k1 = torch.randn(b, 1, lk, d, device=device, requires_grad=True)
    v = torch.randn(b, lk, hkv, d, device=device).transpose(1, 2).requires_grad_()
    k = k1.expand(b, hkv, lk, d)  # stride 0 over the kv heads
    keys = (torch.rand(lk, device=device) > 0.3) | (torch.arange(lk, device=device) == 0)
    mask = keys.expand(lq, lk)  # stride 0 over the queries
    w = torch.randn(b, lq, hq, d, device=device).transpose(1, 2)  # transposed upstream grad
    for upstream in ("sum", "transposed"):
        for t in (q, k1, v):
            t.grad = None
        with fusedformer.use_backend(backend):
            o = fusedformer.scaled_dot_product_attention(q, k, v, mask, is_causal=True,
                                                         enable_gqa=True)
        (o.sum() if upstream == "sum" else (o * w).sum()).backward()
        qr, k1r, vr = (t.detach().double().requires_grad_() for t in (q, k1, v))
        o_ref = reference.attention_ref(qr, k1r.expand(b, hkv, lk, d), vr, mask, is_causal=True,
                                        enable_gqa=True)
        (o_ref.sum() if upstream == "sum" else (o_ref * w.double()).sum()).backward()
        assert_close("o", o, o_ref, atol=1e-5)
        for name, a, e in (("dq", q.grad, qr.grad), ("dk", k1.grad, k1r.grad),
                           ("dv", v.grad, vr.grad)):
            assert_close(f"{name} ({upstream})", a, e, atol=2e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("lq,lk", [(0, 5), (5, 0)])
def test_empty_lengths(backend, device, lq, lk):
    """No queries: empty outputs, zero dk, dv. No keys: every row fully masked, so o = 0,
    lse = -inf and zero dq (the oracle's semantics too)."""
    require_backend("attention", backend, device)
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, lq, lk, 32, torch.float32, device))
    o, lse = fusedformer.attention(q, k, v, return_lse=True, backend=backend)
    o.sum().backward()
    assert o.shape == (1, 2, lq, 32) and lse.shape == (1, 2, lq)
    assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    for name, g, t in (("dq", q.grad, q), ("dk", k.grad, k), ("dv", v.grad, v)):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g)), name


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device):
    """No atomics: dK/dV are reduced over the query heads of a group inside one program."""
    require_backend("attention", backend, device)
    torch.manual_seed(51)
    q, k, v = _qkv(1, 4, 1, 50, 70, 32, torch.float32, device)
    do = torch.randn_like(q)

    def fused(q, k, v):
        return fusedformer.attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)

    first, second = _grads(fused, (q, k, v), do), _grads(fused, (q, k, v), do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# ----------------------------------------------------------------------------------------
# Dropout


def _dropout_seed(torch_seed):
    """The seed that fusedformer.attention draws after torch.manual_seed(torch_seed):
    ops._new_seed draws one int64 in [0, 2^62) from torch's default generator. If that ever
    changes, the keep-mask below stops matching and the dropout tests fail loudly."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype,causal", [(torch.float32, True), (torch.float16, False),
                                          (torch.bfloat16, True)], ids=str)
def test_dropout_matches_oracle(backend, device, dtype, causal):
    """Forward and backward regenerate attention_dropout_mask(seed)'s keep-mask: the output
    and every gradient match the oracle given that mask (GQA, a key-padding mask too)."""
    require_backend("attention", backend, device)
    torch.manual_seed(61)
    b, hq, hkv, lq, lk, d = 1, 2, 1, 37, 45, 32
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dtype, device)
    mask = _mask("bool_key_padding", b, hq, lq, lk, dtype, device)
    _check_rule(backend, q, k, v, mask, causal, yardstick="ref", dropout_p=0.25, torch_seed=1234)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dropout_same_seed_same_output(backend, device):
    require_backend("attention", backend, device)
    torch.manual_seed(71)
    q, k, v = _qkv(1, 2, 2, 40, 40, 32, torch.float32, device)
    do = torch.randn_like(q)

    def run(torch_seed):
        def fused(q, k, v):
            torch.manual_seed(torch_seed)
            return fusedformer.attention(q, k, v, dropout_p=0.3, backend=backend)
        return _grads(fused, (q, k, v), do)

    first, again, other = run(1), run(1), run(2)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), first, again, other):
        assert torch.equal(a, b), f"{name}: same seed, different result"
        assert not torch.equal(a, c), f"{name}: different seeds, same result"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_dropout_keep_rate(backend, device):
    """keep ~ Bernoulli(1 - p): the rate within 5 sigma, and independent across heads,
    batches and seeds (no two (b, h) slices or seeds share a mask)."""
    require_backend("attention", backend, device)
    draw = _launchers().attention_dropout_mask
    p, shape = 0.3, (2, 3, 40, 64)
    keep = draw(12345, shape, p, device)
    assert keep.dtype == torch.bool and keep.shape == shape
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    slices = keep.reshape(6, -1)
    agree_rate = p * p + (1 - p) ** 2  # two independent slices agree this often (1 if equal)
    agree_sigma = math.sqrt(agree_rate * (1 - agree_rate) / slices.shape[1])
    for i in range(6):
        for j in range(i + 1, 6):
            agree = (slices[i] == slices[j]).float().mean().item()
            assert abs(agree - agree_rate) < 5 * agree_sigma, f"slices {i}, {j} agree {agree:.3f}"
    assert torch.equal(keep, draw(12345, shape, p, device))
    assert not torch.equal(keep, draw(12346, shape, p, device))
    assert draw(7, (1, 1, 5, 7), 0.0, device).all()


# ----------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    """The custom ops (with fake implementations) trace without graph breaks, forward and
    backward, with the same numbers as eager; a dropout call in the same graph draws its seed
    inside the graph. One compiled function for both (each compile costs ~4 s here)."""
    require_backend("attention", backend, device)
    torch._dynamo.reset()
    torch.manual_seed(81)
    mask = _mask("bool_key_padding", 2, 4, 33, 40, torch.float32, device)

    def block(q, k, v, qd):
        o = fusedformer.attention(q, k, v, mask, is_causal=True, enable_gqa=True, backend=backend)
        od = fusedformer.attention(qd, k.detach(), v.detach(), dropout_p=0.2, enable_gqa=True,
                                   backend=backend)
        return (o * o).sum(), (od * od).sum()

    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 2, 33, 40, 32, torch.float32, device))
    qd = torch.randn(2, 4, 33, 32, device=device, requires_grad=True)
    loss, loss_dropout = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v, qd)
    (loss + loss_dropout).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    assert torch.isfinite(loss_dropout) and torch.isfinite(qd.grad).all()
    for t in (q, k, v):
        t.grad = None
    eager, _ = block(q, k, v, qd)
    eager.backward()
    assert_close("compiled loss", loss, eager, atol=1e-4, rtol=1e-6)
    for name, a, t in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert_close(f"compiled {name}", a, t.grad, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("call,exc,match", [
    (lambda q: fusedformer.attention(q(d=512), q(d=512), q(d=512), backend="triton"),
     ValueError, r"head dim must be in \[1, 256\] .* got 512"),
    (lambda q: fusedformer.attention(q(dtype=torch.float64), q(dtype=torch.float64),
                                     q(dtype=torch.float64), backend="triton"),
     TypeError, "backend 'triton' supports float16, bfloat16 and float32"),
    (lambda q: fusedformer.attention(q(), q(), q(), torch.ones(8, 8, dtype=torch.int32),
                                     backend="triton"),
     TypeError, "attn_mask must be bool"),
    (lambda q: fusedformer.attention(q(), q(h=1), q(h=1), backend="triton"),
     ValueError, "pass enable_gqa=True"),
    (lambda q: fusedformer.attention(q(), q(), q(), dropout_p=1.0, backend="triton"),
     ValueError, r"dropout_p must be in \[0, 1\)"),
])
def test_bad_input(backend, device, call, exc, match):
    require_backend("attention", backend, device)

    def q(d=16, h=2, dtype=torch.float32):
        return torch.randn(1, h, 8, d, dtype=dtype, device=device)

    with pytest.raises(exc, match=match):
        call(q)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_launcher_checks(backend, device):
    """The launchers' own checks, below the public function's validation."""
    require_backend("attention", backend, device)
    att = _launchers()
    q = torch.randn(1, 4, 8, 16, device=device)
    k = torch.randn(1, 2, 9, 16, device=device)
    fwd = lambda *a, mask=None: att.attention_fwd(*a, mask, 0.25, False, 0.0, 0)  # noqa: E731
    with pytest.raises(TypeError, match=r"mask must be bool \(True = attend\) or torch.float32"):
        fwd(q, k, k, mask=torch.zeros(1, 1, 8, 9, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match=r"mask must be 4-D with each dim 1 .* \(1, 1, 8, 7\)"):
        fwd(q, k, k, mask=torch.ones(1, 1, 8, 7, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of kv heads \(3\)"):
        fwd(q, torch.randn(1, 3, 9, 16, device=device), torch.randn(1, 3, 9, 16, device=device))
    with pytest.raises(ValueError, match=r"q must be 4-D \(B, H, L, D\), got shape \(4, 8, 16\)"):
        fwd(q[0], k, k)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        fwd(q, k.half(), k)
    with pytest.raises(ValueError, match="v must be on the device of q"):
        fwd(q, k, torch.empty(k.shape, device="meta"))
    with pytest.raises(ValueError, match=r"v must have the shape of k"):
        fwd(q, k, k[:, :, :5])
    with pytest.raises(ValueError, match=r"head dim must be in \[1, 256\]"):
        fwd(torch.randn(1, 1, 2, 300, device=device), torch.randn(1, 1, 2, 300, device=device),
            torch.randn(1, 1, 2, 300, device=device))
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\^63\)"):
        att.attention_fwd(q, k, k, None, 0.25, False, 0.1, -1)
    with pytest.raises(ValueError, match=r"shape must be \(B, HQ, LQ, LK\)"):
        att.attention_dropout_mask(0, (2, 8, 8), 0.1, device)


# ----------------------------------------------------------------------------------------
# The opt-in TMA forward (FUSEDFORMER_TRITON_TMA=1): the interpreter runs tensor descriptors


@pytest.fixture
def tma_forward(monkeypatch):
    """Turns the TMA forward on and records, per forward launch, whether it took it."""
    att = _launchers()
    if att.TensorDescriptor is None:
        pytest.skip("this Triton has no host-side tensor descriptors")
    monkeypatch.setenv("FUSEDFORMER_TRITON_TMA", "1")
    taken = []
    real = att._fwd_tma_descriptors

    def spy(*tensors):
        descs = real(*tensors)
        taken.append(descs is not None)
        return descs

    monkeypatch.setattr(att, "_fwd_tma_descriptors", spy)
    return taken


def _require_tma_device(device):
    if device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90 or newer")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 2, 37, 80, 40, True), (1, 2, 2, 80, 37, 80, True),
                                   (1, 4, 2, 45, 37, 32, False)], ids=str)
def test_tma_forward_rule(backend, device, dtype, shape, tma_forward):
    """Rows past L and columns past D (40 and 80 run in 64- and 128-wide tiles) come from the
    descriptors' zero fill and clipped stores, GQA from the kv-head coordinate."""
    require_backend("attention", backend, device)
    _require_tma_device(device)
    b, hq, hkv, lq, lk, d, causal = shape
    torch.manual_seed(hash(shape) % 1000)
    _check_rule(backend, *_qkv(b, hq, hkv, lq, lk, d, dtype, device), causal=causal)
    assert tma_forward and all(tma_forward), "the forward did not take the TMA path"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tma_forward_strided_masked_dropout(backend, device, tma_forward):
    """(B, L, H, D) storage seen through a transpose, a float mask and dropout, on TMA."""
    require_backend("attention", backend, device)
    _require_tma_device(device)
    torch.manual_seed(71)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 37, 45, 32
    q = torch.randn(b, lq, hq, d, device=device).transpose(1, 2)
    k, v = (torch.randn(b, lk, hkv, d, device=device).transpose(1, 2) for _ in range(2))
    _check_rule(backend, q, k, v, _mask("float", b, hq, lq, lk, torch.float32, device),
                yardstick="ref", dropout_p=0.25, torch_seed=4321)
    assert tma_forward and all(tma_forward), "the forward did not take the TMA path"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tma_falls_back_where_tma_cannot_address(backend, device, tma_forward):
    """Rows of 36 fp16 (72 bytes, not a multiple of 16) and kv heads expanded with stride 0
    (the autograd path clones them, so the launcher is called directly) take the pointer
    path, with the right answer."""
    require_backend("attention", backend, device)
    _require_tma_device(device)
    att = _launchers()
    torch.manual_seed(72)
    q, k, v = _qkv(1, 2, 2, 17, 19, 36, torch.float16, device)
    assert att._tma_descriptor(q) is None
    _check_rule(backend, q, k, v)
    q, k, v = _qkv(1, 2, 1, 17, 19, 32, torch.float32, device)
    assert att._tma_descriptor(k) is not None  # size-1 dims: any stride will do
    k, v = k.expand(1, 2, 19, 32), v.expand(1, 2, 19, 32)
    assert att._tma_descriptor(k) is None and att._tma_descriptor(k.contiguous()) is not None
    o, _ = att.attention_fwd(q, k, v, None, 32 ** -0.5, False, 0.0, 0)  # as the launcher sees it
    o_ref = reference.attention_ref(q.double(), k.double(), v.double())
    assert_close("o", o, o_ref, atol=1e-5)
    assert tma_forward == [False, False]
