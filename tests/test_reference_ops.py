"""Tests of the plain-PyTorch oracle ``fusedformer.kernels.reference`` against
PyTorch's own built-ins (SDPA, F.softmax, F.layer_norm, nn.Linear + activations).

fp64 inputs give tight comparisons (atol ~1e-10); bf16/fp32 cases check the
``upcast`` switch. CPU only, small shapes.
"""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from fusedformer.kernels import reference as ref

F64 = torch.float64
TIGHT = dict(atol=1e-10, rtol=1e-9)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible random inputs for every test (seed from the test id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _randn(*shape, dtype=F64, grad=True, scale=1.0):
    t = torch.randn(*shape, dtype=dtype) * scale
    return t.requires_grad_(grad)


def _run(fn, inputs, upstream=None):
    """Evaluate fn(*inputs), backprop ``upstream`` (random if None); return (out, grads)."""
    out = fn(*inputs)
    if upstream is None:
        upstream = torch.randn_like(out)
    out.backward(upstream)
    grads = [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out.detach(), grads, upstream


def _clone(*ts):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


def _tril(lq, lk):
    return torch.ones(lq, lk, dtype=torch.bool).tril()


# ----------------------------------------------------------------------------------------
# attention_ref vs F.scaled_dot_product_attention
# ----------------------------------------------------------------------------------------

# (id, B or None for 3-D inputs, Hq, Hkv, Lq, Lk, D, Dv, is_causal, enable_gqa, scale)
ATTN_CASES = [
    ("plain", 2, 4, 4, 16, 16, 32, 32, False, False, None),
    ("causal_square", 2, 4, 4, 33, 33, 32, 32, True, False, None),
    ("causal_lq_lt_lk", 2, 2, 2, 17, 40, 32, 32, True, False, None),
    ("causal_lq_gt_lk", 2, 2, 2, 40, 17, 32, 32, True, False, None),
    ("lq_ne_lk", 2, 3, 3, 7, 29, 40, 40, False, False, None),
    ("gqa_8_2", 2, 8, 2, 16, 24, 32, 32, False, True, None),
    ("gqa_8_2_causal", 1, 8, 2, 20, 20, 16, 16, True, True, None),
    ("mqa_8_1", 2, 8, 1, 16, 24, 32, 32, True, True, None),
    ("custom_scale", 2, 2, 2, 16, 16, 32, 32, False, False, 0.3),
    ("scale_causal_gqa", 1, 4, 2, 12, 18, 24, 24, True, True, 1.7),
    ("T1", 2, 2, 2, 1, 1, 32, 32, False, False, None),
    ("T1_causal", 2, 2, 2, 1, 1, 32, 32, True, False, None),
    ("one_query_97_keys", 1, 2, 2, 1, 97, 40, 40, True, False, None),
    ("T97_D80_causal", 1, 2, 2, 97, 97, 80, 80, True, False, None),
    ("T97_D40", 1, 2, 2, 97, 97, 40, 40, False, False, None),
    ("Dv_ne_D", 2, 2, 2, 13, 19, 40, 24, False, False, None),
    ("3d", None, 4, 4, 15, 21, 32, 32, False, False, None),
    ("3d_causal_gqa", None, 8, 2, 21, 15, 32, 16, True, True, None),
]


def _qkv(b, hq, hkv, lq, lk, d, dv, dtype=F64):
    lead = () if b is None else (b,)
    return (
        _randn(*lead, hq, lq, d, dtype=dtype),
        _randn(*lead, hkv, lk, d, dtype=dtype),
        _randn(*lead, hkv, lk, dv, dtype=dtype),
    )


@pytest.mark.parametrize("case", ATTN_CASES, ids=[c[0] for c in ATTN_CASES])
def test_attention_matches_sdpa(case):
    _, b, hq, hkv, lq, lk, d, dv, causal, gqa, scale = case
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, dv)
    kw = dict(is_causal=causal, scale=scale, enable_gqa=gqa)
    o, grads, g = _run(lambda q, k, v: ref.attention_ref(q, k, v, **kw), [q, k, v])
    o_t, grads_t, _ = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw), _clone(q, k, v), g)
    assert o.shape == o_t.shape and o.dtype == F64
    torch.testing.assert_close(o, o_t, **TIGHT)
    for name, a, e in zip("qkv", grads, grads_t):
        torch.testing.assert_close(a, e, **TIGHT, msg=lambda m: f"grad {name}: {m}")


MASK_SHAPES = {
    "Lk": lambda b, h, lq, lk: (lk,),
    "Lq_Lk": lambda b, h, lq, lk: (lq, lk),
    "key_padding_B11Lk": lambda b, h, lq, lk: (b, 1, 1, lk),
    "full_BHLqLk": lambda b, h, lq, lk: (b, h, lq, lk),
    "1HLqLk": lambda b, h, lq, lk: (1, h, lq, lk),
}


def _random_mask(shape, kind, keep_prob=0.7):
    """Random bool (True = attend) or float mask; column 0 always attended, so no row
    is fully masked. Float masks mix finite values and -inf."""
    keep = torch.rand(shape) < keep_prob
    keep[..., 0] = True
    if kind == "bool":
        return keep
    return torch.where(keep, torch.randn(shape, dtype=F64) * 2.0, float("-inf"))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape_name", list(MASK_SHAPES))
def test_attention_masks_match_sdpa(kind, shape_name):
    b, h, lq, lk, d = 2, 4, 12, 20, 32
    q, k, v = _qkv(b, h, h, lq, lk, d, d)
    mask = _random_mask(MASK_SHAPES[shape_name](b, h, lq, lk), kind)
    mask_t = mask.expand(lq, lk) if mask.dim() == 1 else mask  # SDPA wants >= 2-D masks
    o, grads, g = _run(lambda q, k, v: ref.attention_ref(q, k, v, attn_mask=mask), [q, k, v])
    o_t, grads_t, _ = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask_t), _clone(q, k, v), g)
    torch.testing.assert_close(o, o_t, **TIGHT)
    for a, e in zip(grads, grads_t):
        torch.testing.assert_close(a, e, **TIGHT)


@pytest.mark.parametrize("shape_name", ["Lq_Lk", "key_padding_B11Lk", "full_BHLqLk"])
def test_attention_float_mask_grad_matches_sdpa(shape_name):
    b, h, lq, lk, d = 2, 3, 9, 14, 16
    q, k, v = _qkv(b, h, h, lq, lk, d, d)
    mask = _randn(*MASK_SHAPES[shape_name](b, h, lq, lk))
    _, grads, g = _run(lambda q, k, v, m: ref.attention_ref(q, k, v, attn_mask=m), [q, k, v, mask])
    _, grads_t, _ = _run(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m), _clone(q, k, v, mask), g)
    for a, e in zip(grads, grads_t):
        torch.testing.assert_close(a, e, **TIGHT)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("lq,lk", [(12, 12), (8, 20), (20, 8)])
def test_attention_causal_and_mask_combined(kind, lq, lk):
    """SDPA forbids is_causal together with attn_mask; we apply both. Compare with SDPA
    given the explicitly combined mask."""
    b, h, d = 2, 2, 16
    q, k, v = _qkv(b, h, h, lq, lk, d, d)
    mask = _random_mask((b, 1, lq, lk), kind)
    if kind == "bool":
        combined = mask & _tril(lq, lk)
    else:
        combined = mask + torch.zeros(lq, lk, dtype=F64).masked_fill(~_tril(lq, lk), float("-inf"))
    o, grads, g = _run(lambda q, k, v: ref.attention_ref(q, k, v, attn_mask=mask, is_causal=True), [q, k, v])
    o_t, grads_t, _ = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=combined), _clone(q, k, v), g)
    torch.testing.assert_close(o, o_t, **TIGHT)
    for a, e in zip(grads, grads_t):
        torch.testing.assert_close(a, e, **TIGHT)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("scenario", ["random_rows", "key_padding_whole_batch", "causal_plus_mask"])
def test_attention_fully_masked_rows(kind, scenario):
    b, h, lq, lk, d = 2, 3, 10, 14, 16
    q, k, v = _qkv(b, h, h, lq, lk, d, d)
    causal = scenario == "causal_plus_mask"
    if scenario == "random_rows":
        keep = _random_mask((b, h, lq, lk), "bool")
        keep[0, 1, 3, :] = False
        keep[1, :, 7, :] = False
    elif scenario == "key_padding_whole_batch":
        keep = _random_mask((b, 1, 1, lk), "bool")
        keep[1] = False  # every query of batch 1 sees nothing
    else:  # causal: query 0 sees only key 0, which the mask removes
        keep = _random_mask((1, 1, lq, lk), "bool")
        keep[..., 0] = False
        keep[..., 1:, 1] = True
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=F64).masked_fill(~keep, float("-inf"))

    effective = keep & _tril(lq, lk) if causal else keep
    effective = effective.expand(b, h, lq, lk)
    dead = ~effective.any(-1)  # (B, H, Lq) fully masked rows
    assert dead.any() and not dead.all()

    o, grads, g = _run(lambda q, k, v: ref.attention_ref(q, k, v, attn_mask=mask, is_causal=causal), [q, k, v])
    assert torch.isfinite(o).all()
    assert (o[dead] == 0).all()
    for t in grads:
        assert torch.isfinite(t).all()
    assert (grads[0][dead] == 0).all()  # dq of dead rows

    # Reference: SDPA with the dead rows un-masked, and the loss restricted to live rows.
    # (SDPA's own handling of fully masked rows does not matter this way.)
    live = (~dead).unsqueeze(-1).to(F64)
    fixed = effective | dead.unsqueeze(-1)
    o_t, grads_t, _ = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=fixed), _clone(q, k, v), g * live)
    torch.testing.assert_close(o[~dead], o_t[~dead], **TIGHT)
    torch.testing.assert_close(grads[0][~dead], grads_t[0][~dead], **TIGHT)
    torch.testing.assert_close(grads[1], grads_t[1], **TIGHT)
    torch.testing.assert_close(grads[2], grads_t[2], **TIGHT)

    _, lse = ref.attention_ref(q, k, v, attn_mask=mask, is_causal=causal, return_lse=True)
    assert torch.isneginf(lse[dead]).all() and torch.isfinite(lse[~dead]).all()


def test_attention_rejects_head_mismatch_without_gqa():
    q, k, v = _qkv(1, 8, 2, 4, 4, 8, 8)
    with pytest.raises(ValueError):
        ref.attention_ref(q, k, v)
    q, k, v = _qkv(1, 6, 4, 4, 4, 8, 8)
    with pytest.raises(ValueError):
        ref.attention_ref(q, k, v, enable_gqa=True)


# ----------------------------------------------------------------------------------------
# lse
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gqa", [False, True])
def test_attention_lse(mask_kind, causal, gqa):
    b, hq, lq, lk, d = 2, 4, 11, 17, 24
    hkv = 2 if gqa else hq
    q, k, v = _qkv(b, hq, hkv, lq, lk, d, d)
    scale = 0.37
    mask = None if mask_kind is None else _random_mask((b, 1, lq, lk), mask_kind)
    kw = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    o, lse = ref.attention_ref(q, k, v, return_lse=True, **kw)
    assert lse.shape == (b, hq, lq) and lse.dtype == F64
    torch.testing.assert_close(o, ref.attention_ref(q, k, v, **kw), atol=0, rtol=0)

    kk = k.repeat_interleave(hq // hkv, dim=1)
    s = (q @ kk.transpose(-1, -2)) * scale
    if mask_kind == "bool":
        s = s.masked_fill(~mask, float("-inf"))
    elif mask_kind == "float":
        s = s + mask
    if causal:
        s = s.masked_fill(~_tril(lq, lk), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1), **TIGHT)


@pytest.mark.parametrize("dtype,expected", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (F64, F64)])
@pytest.mark.parametrize("upcast", [False, True])
def test_attention_lse_dtype(dtype, expected, upcast):
    q, k, v = _qkv(1, 2, 2, 5, 6, 8, 8, dtype=dtype)
    o, lse = ref.attention_ref(q, k, v, return_lse=True, upcast=upcast)
    assert o.dtype == dtype and lse.dtype == expected
    truth = ref.attention_ref(*(t.detach().double() for t in (q, k, v)), return_lse=True)[1]
    tol = 1e-5 if dtype != torch.bfloat16 else 5e-2
    torch.testing.assert_close(lse.double(), truth, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_shape", ["full", "broadcast_heads"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_dropout_mask_matches_manual(mask_shape, causal):
    b, h, lq, lk, d, p_drop = 2, 3, 9, 13, 16, 0.3
    q, k, v = _qkv(b, h, h, lq, lk, d, d)
    keep = torch.rand((b, h, lq, lk) if mask_shape == "full" else (1, h, lq, lk)) < 1 - p_drop

    def manual(q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if causal:
            s = s.masked_fill(~_tril(lq, lk), float("-inf"))
        return (torch.softmax(s, -1) * keep / (1 - p_drop)) @ v

    o, grads, g = _run(lambda q, k, v: ref.attention_ref(q, k, v, dropout_p=p_drop, is_causal=causal, dropout_mask=keep), [q, k, v])
    o_m, grads_m, _ = _run(manual, _clone(q, k, v), g)
    torch.testing.assert_close(o, o_m, **TIGHT)
    for a, e in zip(grads, grads_m):
        torch.testing.assert_close(a, e, **TIGHT)
    assert not torch.allclose(o, ref.attention_ref(q, k, v, is_causal=causal))


def test_attention_dropout_generator_reproducible():
    q, k, v = _qkv(2, 4, 4, 16, 16, 16, 16)
    run = lambda seed: ref.attention_ref(q, k, v, dropout_p=0.25, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(123), run(123), run(124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, ref.attention_ref(q, k, v))
    # without a generator the global RNG is used
    torch.manual_seed(7)
    d = ref.attention_ref(q, k, v, dropout_p=0.25)
    torch.manual_seed(7)
    assert torch.equal(d, ref.attention_ref(q, k, v, dropout_p=0.25))


@pytest.mark.parametrize("p_drop", [0.1, 0.5])
def test_attention_dropout_keep_rate(p_drop):
    """q = 0 gives uniform probabilities 1/Lk; v = identity exposes the keep-mask:
    o[..., i, j] = keep[i, j] / (Lk * (1 - p))."""
    b, h, l = 2, 4, 256
    q = torch.zeros(b, h, l, 8, dtype=F64)
    k = torch.randn(b, h, l, 8, dtype=F64)
    v = torch.eye(l, dtype=F64).expand(b, h, l, l)
    o = ref.attention_ref(q, k, v, dropout_p=p_drop, generator=torch.Generator().manual_seed(99))
    keep = o * l * (1 - p_drop)
    assert torch.allclose(keep, keep.round(), atol=1e-9)
    assert set(keep.round().unique().tolist()) == {0.0, 1.0}
    n = keep.numel()
    sigma = math.sqrt(p_drop * (1 - p_drop) / n)
    assert abs(keep.mean().item() - (1 - p_drop)) < 5 * sigma
    assert not torch.equal(keep[:, 0], keep[:, 1])  # independent across heads


@pytest.mark.parametrize("fn", ["attention", "ffn"])
def test_dropout_argument_validation(fn):
    if fn == "attention":
        q, k, v = _qkv(1, 2, 2, 4, 4, 8, 8)
        call = lambda **kw: ref.attention_ref(q, k, v, **kw)
        keep = torch.ones(4, 4, dtype=torch.bool)
    else:
        x, w1, b1, w2, b2 = _randn(3, 8), _randn(16, 8), _randn(16), _randn(8, 16), _randn(8)
        call = lambda **kw: ref.ffn_ref(x, w1, b1, w2, b2, "relu", **kw)
        keep = torch.ones(16, dtype=torch.bool)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            call(dropout_p=bad)
    with pytest.raises(ValueError):
        call(dropout_p=0.0, dropout_mask=keep)


# ----------------------------------------------------------------------------------------
# scaled_masked_softmax_ref vs F.softmax
# ----------------------------------------------------------------------------------------


def _softmax_truth(scores, scale, mask, causal):
    s = scores * scale
    if mask is not None and mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        s = s + mask
    if causal:
        s = s.masked_fill(~_tril(*s.shape[-2:]), float("-inf"))
    return F.softmax(s, dim=-1)


SOFTMAX_SHAPES = [((7, 11), (11,)), ((2, 3, 9, 13), (2, 1, 9, 13)), ((2, 3, 16, 16), (16, 16)), ((4, 1, 97), (4, 1, 97))]


@pytest.mark.parametrize("shape,mask_shape", SOFTMAX_SHAPES, ids=lambda x: "x".join(map(str, x)))
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_matches_torch(shape, mask_shape, mask_kind, causal):
    scores = _randn(*shape, scale=3.0)
    scale = 0.61
    mask = None if mask_kind is None else _random_mask(mask_shape, mask_kind)
    y, (gs,), g = _run(lambda s: ref.scaled_masked_softmax_ref(s, scale, mask, causal), [scores])
    y_t, (gs_t,), _ = _run(lambda s: _softmax_truth(s, scale, mask, causal), _clone(scores), g)
    torch.testing.assert_close(y, y_t, **TIGHT)
    torch.testing.assert_close(gs, gs_t, **TIGHT)


def test_softmax_float_mask_grad():
    scores, mask = _randn(2, 5, 8), _randn(5, 8)
    _, grads, g = _run(lambda s, m: ref.scaled_masked_softmax_ref(s, 1.3, m), [scores, mask])
    _, grads_t, _ = _run(lambda s, m: _softmax_truth(s, 1.3, m, False), _clone(scores, mask), g)
    for a, e in zip(grads, grads_t):
        torch.testing.assert_close(a, e, **TIGHT)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_fully_masked_rows(kind, causal):
    lq, lk = 6, 9
    scores = _randn(2, lq, lk)
    keep = _random_mask((2, lq, lk), "bool")
    keep[0, 2] = False
    keep[1, 4] = False
    if causal:
        keep[1, :, 0] = False  # row 0 of batch 1 then sees nothing
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=F64).masked_fill(~keep, float("-inf"))
    effective = keep & _tril(lq, lk) if causal else keep
    dead = ~effective.any(-1)
    assert dead.sum() >= 2 + causal

    y, (gs,), g = _run(lambda s: ref.scaled_masked_softmax_ref(s, 1.0, mask, causal), [scores])
    assert torch.isfinite(y).all() and torch.isfinite(gs).all()
    assert (y[dead] == 0).all() and (gs[dead] == 0).all()
    y_t, (gs_t,), _ = _run(lambda s: _softmax_truth(s, 1.0, effective | dead.unsqueeze(-1), False), _clone(scores), g)
    torch.testing.assert_close(y[~dead], y_t[~dead], **TIGHT)
    torch.testing.assert_close(gs[~dead], gs_t[~dead], **TIGHT)


def test_softmax_gradcheck():
    scores = _randn(2, 4, 5)
    keep = torch.rand(2, 4, 5) < 0.7
    keep[..., 0] = True
    keep[1, 2] = False  # one fully masked row
    assert torch.autograd.gradcheck(lambda s: ref.scaled_masked_softmax_ref(s, 0.7, keep, causal=True), (scores,))
    mask = _randn(4, 5)
    assert torch.autograd.gradcheck(lambda s, m: ref.scaled_masked_softmax_ref(s, 1.9, m), (scores, mask))


def test_attention_gradcheck_with_dead_rows():
    q, k, v = _qkv(1, 2, 2, 3, 4, 3, 2)
    keep = torch.rand(1, 2, 3, 4) < 0.7
    keep[..., 0] = True
    keep[0, 1, 2] = False
    assert torch.autograd.gradcheck(lambda q, k, v: ref.attention_ref(q, k, v, attn_mask=keep, is_causal=True), (q, k, v))


# ----------------------------------------------------------------------------------------
# layer_norm_ref vs F.layer_norm
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalized_shape", [32, (7,), (4, 6)], ids=str)
@pytest.mark.parametrize("affine", ["weight_bias", "weight_only", "none"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_matches_torch(normalized_shape, affine, with_residual):
    ns = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    eps = 1e-5 if affine != "none" else 1e-3
    x = _randn(3, 5, *ns, scale=2.0)
    w = _randn(*ns) if affine != "none" else None
    b = _randn(*ns) if affine == "weight_bias" else None
    r = _randn(3, 5, *ns) if with_residual else None
    inputs = [t for t in (x, w, b, r) if t is not None]

    def ours(*ts):
        it = iter(ts)
        x_, w_, b_, r_ = next(it), (next(it) if w is not None else None), (next(it) if b is not None else None), (next(it) if r is not None else None)
        out = ref.layer_norm_ref(x_, normalized_shape, w_, b_, eps, r_)
        if r is None:
            return out
        y, h = out
        torch.testing.assert_close(h, x_ + r_, atol=0, rtol=0)
        return y

    def theirs(*ts):
        it = iter(ts)
        x_, w_, b_, r_ = next(it), (next(it) if w is not None else None), (next(it) if b is not None else None), (next(it) if r is not None else None)
        h = x_ if r_ is None else x_ + r_
        return F.layer_norm(h, ns, w_, b_, eps)

    y, grads, g = _run(ours, inputs)
    y_t, grads_t, _ = _run(theirs, _clone(*inputs), g)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_t, **TIGHT)
    assert len(grads) == len(inputs)
    for a, e in zip(grads, grads_t):
        torch.testing.assert_close(a, e, **TIGHT)


def test_layer_norm_residual_grad_flows_through_h():
    """Gradients reaching the returned h add to those through y (pre-LN residual stream)."""
    x, r, w, b = _randn(4, 16), _randn(4, 16), _randn(16), _randn(16)
    gy, gh = torch.randn(4, 16, dtype=F64), torch.randn(4, 16, dtype=F64)
    y, h = ref.layer_norm_ref(x, 16, w, b, residual=r)
    ((y * gy).sum() + (h * gh).sum()).backward()
    x2, r2, w2, b2 = _clone(x, r, w, b)
    h2 = x2 + r2
    ((F.layer_norm(h2, (16,), w2, b2) * gy).sum() + (h2 * gh).sum()).backward()
    for a, e in [(x.grad, x2.grad), (r.grad, r2.grad), (w.grad, w2.grad), (b.grad, b2.grad)]:
        torch.testing.assert_close(a, e, **TIGHT)


def test_layer_norm_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ref.layer_norm_ref(torch.randn(3, 8), 7)


# ----------------------------------------------------------------------------------------
# ffn_ref vs nn.Linear + activation (+ nn.Linear)
# ----------------------------------------------------------------------------------------

TORCH_ACT = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
}


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(3, 5), (7,)], ids=["3d", "2d"])
def test_ffn_matches_linear(activation, bias, x_shape):
    d_model, d_ff, d_out = 24, 40, 20
    d_hidden_out = 2 * d_ff if activation == "swiglu" else d_ff
    lin1 = torch.nn.Linear(d_model, d_hidden_out, bias=bias, dtype=F64)
    lin2 = torch.nn.Linear(d_ff, d_out, bias=bias, dtype=F64)
    x = _randn(*x_shape, d_model, scale=2.0)
    w1, w2 = lin1.weight.detach().clone().requires_grad_(), lin2.weight.detach().clone().requires_grad_()
    b1 = lin1.bias.detach().clone().requires_grad_() if bias else None
    b2 = lin2.bias.detach().clone().requires_grad_() if bias else None

    y = ref.ffn_ref(x, w1, b1, w2, b2, activation)
    g = torch.randn_like(y)
    y.backward(g)

    x_t = x.detach().clone().requires_grad_()
    a = lin1(x_t)
    if activation == "swiglu":
        gate, up = a[..., :d_ff], a[..., d_ff:]
        hidden = F.silu(gate) * up
    else:
        hidden = TORCH_ACT[activation](a)
    y_t = lin2(hidden)
    y_t.backward(g)

    assert y.shape == (*x_shape, d_out)
    torch.testing.assert_close(y.detach(), y_t.detach(), **TIGHT)
    pairs = [(x.grad, x_t.grad), (w1.grad, lin1.weight.grad), (w2.grad, lin2.weight.grad)]
    if bias:
        pairs += [(b1.grad, lin1.bias.grad), (b2.grad, lin2.bias.grad)]
    for got, exp in pairs:
        torch.testing.assert_close(got, exp, **TIGHT)


def test_ffn_unknown_activation():
    x, w1, w2 = torch.randn(2, 4), torch.randn(8, 4), torch.randn(4, 8)
    with pytest.raises(ValueError) as err:
        ref.ffn_ref(x, w1, None, w2, None, "silu")
    for name in ("relu", "gelu", "gelu_tanh", "swiglu"):
        assert name in str(err.value)
    assert ref.ACTIVATIONS == ("relu", "gelu", "gelu_tanh", "swiglu")


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_ffn_dropout_mask_matches_manual(activation):
    d_model, d_ff, p_drop = 16, 32, 0.2
    x = _randn(4, 6, d_model)
    w1 = _randn(2 * d_ff if activation == "swiglu" else d_ff, d_model)
    b1, w2, b2 = _randn(w1.shape[0]), _randn(d_model, d_ff), _randn(d_model)
    keep = torch.rand(4, 6, d_ff) < 1 - p_drop

    def manual(x, w1, b1, w2, b2):
        a = x @ w1.T + b1
        hidden = F.gelu(a) if activation == "gelu" else F.silu(a[..., :d_ff]) * a[..., d_ff:]
        return (hidden * keep / (1 - p_drop)) @ w2.T + b2

    fn = lambda *ts: ref.ffn_ref(*ts, activation=activation, dropout_p=p_drop, dropout_mask=keep)
    y, grads, g = _run(fn, [x, w1, b1, w2, b2])
    y_m, grads_m, _ = _run(manual, _clone(x, w1, b1, w2, b2), g)
    torch.testing.assert_close(y, y_m, **TIGHT)
    for a, e in zip(grads, grads_m):
        torch.testing.assert_close(a, e, **TIGHT)


@pytest.mark.parametrize("p_drop", [0.1, 0.5])
def test_ffn_dropout_generator_and_keep_rate(p_drop):
    """w1 = 0, b1 = 1 makes every hidden unit relu(1) = 1; w2 = I exposes the keep-mask."""
    n, d = 4096, 128
    x = torch.randn(n, d, dtype=F64)
    w1, b1, w2 = torch.zeros(d, d, dtype=F64), torch.ones(d, dtype=F64), torch.eye(d, dtype=F64)
    run = lambda seed: ref.ffn_ref(x, w1, b1, w2, None, "relu", p_drop, generator=torch.Generator().manual_seed(seed))
    y = run(5)
    assert torch.equal(y, run(5)) and not torch.equal(y, run(6))
    keep = y * (1 - p_drop)
    assert set(keep.round().unique().tolist()) == {0.0, 1.0}
    assert torch.allclose(keep, keep.round(), atol=1e-12)
    sigma = math.sqrt(p_drop * (1 - p_drop) / keep.numel())
    assert abs(keep.mean().item() - (1 - p_drop)) < 5 * sigma


# ----------------------------------------------------------------------------------------
# upcast
# ----------------------------------------------------------------------------------------


def _mean_err(a, truth):
    return (a.double() - truth).abs().mean().item()


def _rounding_err(truth, dtype):
    """Mean error of just rounding the truth to ``dtype`` (the best a ``dtype`` output can do)."""
    return _mean_err(truth.to(dtype), truth)


def _check_upcast_helps(fn, inputs_lowp):
    truth = fn(*(t.double() for t in inputs_lowp), upcast=False)
    if isinstance(truth, tuple):
        truth = truth[0]
    outs = {}
    for up in (False, True):
        out = fn(*inputs_lowp, upcast=up)
        out = out[0] if isinstance(out, tuple) else out
        assert out.dtype == inputs_lowp[0].dtype
        outs[up] = _mean_err(out, truth)
    floor = _rounding_err(truth, inputs_lowp[0].dtype)
    # upcast=True is (essentially) a correctly rounded result; upcast=False is clearly worse here.
    assert outs[True] <= 1.1 * floor + 1e-7, (outs, floor)
    assert outs[True] < outs[False], (outs, floor)


def test_upcast_attention_bf16():
    q, k, v = (t.detach() for t in _qkv(2, 4, 4, 256, 256, 64, 64, dtype=torch.bfloat16))
    _check_upcast_helps(lambda q, k, v, upcast: ref.attention_ref(q * 4, k, v, is_causal=True, upcast=upcast), [q, k, v])


def test_upcast_softmax_bf16():
    scores = _randn(4, 64, 512, dtype=torch.bfloat16, grad=False, scale=20.0)
    _check_upcast_helps(lambda s, upcast: ref.scaled_masked_softmax_ref(s, 0.37, causal=True, upcast=upcast), [scores])


def test_upcast_layer_norm_bf16():
    x = (50.0 + torch.randn(64, 256)).bfloat16()
    r = torch.randn(64, 256).bfloat16()
    w, b = torch.randn(256).bfloat16(), torch.randn(256).bfloat16()
    _check_upcast_helps(lambda x, r, w, b, upcast: ref.layer_norm_ref(x, 256, w, b, residual=r, upcast=upcast), [x, r, w, b])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_upcast_ffn_bf16(activation):
    d_model, d_ff = 256, 1024
    x = torch.randn(64, d_model).bfloat16()
    w1 = (torch.randn(2 * d_ff if activation == "swiglu" else d_ff, d_model) / 16).bfloat16()
    b1, w2, b2 = torch.randn(w1.shape[0]).bfloat16(), (torch.randn(d_model, d_ff) / 32).bfloat16(), torch.randn(d_model).bfloat16()
    _check_upcast_helps(lambda *ts, upcast: ref.ffn_ref(*ts, activation=activation, upcast=upcast), [x, w1, b1, w2, b2])


def _all_ops_inputs():
    """Fresh fp64 inputs for every op (bool masks stay bool)."""
    return dict(
        q=torch.randn(2, 4, 9, 16, dtype=F64), k=torch.randn(2, 2, 12, 16, dtype=F64), v=torch.randn(2, 2, 12, 16, dtype=F64),
        mask=torch.rand(2, 1, 9, 12) < 0.8, s=torch.randn(2, 9, 12, dtype=F64) * 3,
        x=torch.randn(5, 32, dtype=F64), r=torch.randn(5, 32, dtype=F64), w=torch.randn(32, dtype=F64), b=torch.randn(32, dtype=F64),
        w1=torch.randn(64, 32, dtype=F64) / 6, b1=torch.randn(64, dtype=F64), w2=torch.randn(32, 32, dtype=F64) / 6, b2=torch.randn(32, dtype=F64),
    )


def _all_ops(inputs, dtype):
    """(name, callable(upcast) -> Tensor) for every op, on ``inputs`` cast to ``dtype``."""
    t = {n: (x if x.dtype == torch.bool else x.to(dtype)) for n, x in inputs.items()}
    return [
        ("attention", lambda up: ref.attention_ref(t["q"], t["k"], t["v"], attn_mask=t["mask"], is_causal=True, enable_gqa=True, upcast=up)),
        ("softmax", lambda up: ref.scaled_masked_softmax_ref(t["s"], 0.5, t["mask"][:, 0], True, upcast=up)),
        ("layer_norm", lambda up: ref.layer_norm_ref(t["x"], 32, t["w"], t["b"], residual=t["r"], upcast=up)[0]),
        ("ffn", lambda up: ref.ffn_ref(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], "swiglu", upcast=up)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_upcast_is_noop_for_fp32_fp64(dtype):
    for name, op in _all_ops(_all_ops_inputs(), dtype):
        a, b = op(False), op(True)
        assert a.dtype == dtype, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("upcast", [False, True])
def test_low_precision_close_to_fp64(dtype, upcast):
    """Sanity: every op in fp32/fp16/bf16 is close to the fp64 truth on the same (rounded) inputs."""
    inputs = _all_ops_inputs()
    rounded = {n: (x if x.dtype == torch.bool else x.to(dtype).double()) for n, x in inputs.items()}
    tol = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}[dtype]
    for (name, op), (_, op64) in zip(_all_ops(inputs, dtype), _all_ops(rounded, F64)):
        out, truth = op(upcast), op64(False)
        assert out.dtype == dtype, name
        assert torch.isfinite(out).all(), name
        err = (out.double() - truth).abs().max().item() / truth.abs().max().item()
        assert err < tol, (name, err)
