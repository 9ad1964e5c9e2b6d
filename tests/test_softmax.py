"""Scaled + masked softmax: every fused backend vs the float64 oracle under the FlashAttention
rule, forward and gradient, for every mask kind; fully masked rows, strides, compile, errors.

PyTorch's own softmax gives NaN on a row whose every entry is masked, so the same-dtype PyTorch
baseline here zeroes such rows itself (what the oracle and the fused op define) instead of
using kernels.testing.check_softmax, whose baseline has no such guard.
"""
import importlib
import math

import pytest
import torch
from conftest import DTYPES, assert_close, assert_rule, backend_params, require_backend

import fusedformer
from fusedformer.kernels import reference, testing

# (B, H, LQ, LK): row length 1, odd lengths, and 1025 > the triton rows path's 1024 columns,
# which takes the looped (online softmax) path.
SHAPES = [(2, 3, 29, 77), (2, 2, 5, 1), (1, 2, 7, 97), (1, 2, 3, 1025)]
MASKS = ["none", "key_padding", "bool_full", "float", "causal", "causal_key_padding"]


def _mask(kind: str, shape, dtype, device):
    """(mask, causal) for a mask kind; masks use the broadcast shapes a model would pass."""
    b, h, lq, lk = shape
    if kind in ("key_padding", "causal_key_padding"):
        return torch.rand(b, 1, 1, lk, device=device) > 0.2, kind == "causal_key_padding"
    if kind == "bool_full":
        return torch.rand(b, h, lq, lk, device=device) > 0.3, False
    if kind == "float":
        m = torch.randn(1, h, lq, lk, device=device)
        m = m.masked_fill(torch.rand(1, h, lq, lk, device=device) < 0.3, -math.inf)
        return m.to(dtype), False
    return None, kind == "causal"


def _torch_softmax(x, scale, mask, causal):
    """PyTorch's softmax in x's dtype, with the masking of the contract (fully masked rows 0)."""
    s = x * scale
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask
    keep = torch.ones_like(s, dtype=torch.bool)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    if causal:
        keep = keep & torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
    s = s.masked_fill(~keep, -math.inf)
    full = torch.isneginf(s).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(full, 0.0), -1).masked_fill(full, 0.0)


def _check(backend, x, scale, mask, causal, dy):
    def fused(x):
        return fusedformer.scaled_masked_softmax(x, scale, mask, causal, backend=backend)

    return testing._check(("y", "dx"), (x,), dy, fused,
                          lambda x: _torch_softmax(x, scale, mask, causal),
                          lambda x: reference.scaled_masked_softmax_ref(x, scale, mask, causal))


@pytest.mark.parametrize("backend,device", backend_params("softmax"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_key_padding_rule(backend, device, dtype, shape):
    require_backend("softmax", backend, device)
    mask, causal = _mask("key_padding", shape, dtype, device)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(shape, dtype=dtype, device=device)
    assert_rule(_check(backend, x, 0.37, mask, causal, dy))


@pytest.mark.parametrize("backend,device", backend_params("softmax"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("shape", [(2, 3, 13, 97), (1, 1, 3, 1025)], ids=str)
def test_mask_kinds_rule(backend, device, dtype, kind, shape):
    require_backend("softmax", backend, device)
    mask, causal = _mask(kind, shape, dtype, device)
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(shape, dtype=dtype, device=device)
    assert_rule(_check(backend, x, 1.3, mask, causal, dy))


@pytest.mark.parametrize("backend,device", backend_params("softmax"))
@pytest.mark.parametrize("lk", [5, 1025])
def test_fully_masked_rows_are_zero(backend, device, lk):
    """Rows with every key masked (bool, float -inf, causal + padding) give exact zeros and
    zero gradients, never NaN; the other rows are untouched."""
    require_backend("softmax", backend, device)
    b, h, lq = 2, 2, 4
    x = torch.randn(b, h, lq, lk, device=device, requires_grad=True)
    dy = torch.randn(b, h, lq, lk, device=device)
    keep = torch.ones(b, h, lq, lk, dtype=torch.bool, device=device)
    keep[0, 1, 2] = False                                        # one fully masked row
    add = torch.zeros(1, 1, lq, lk, device=device)
    add[..., 3, :] = -math.inf                                    # every head's last row
    pad = torch.ones(b, 1, 1, lk, dtype=torch.bool, device=device)
    pad[1, ..., 0] = False                                        # causal row 0 of batch 1
    cases = [(keep, False, [(0, 1, 2)]), (add, False, [(i, j, 3) for i in range(b) for j in range(h)]),
             (pad, True, [(1, j, 0) for j in range(h)])]
    for mask, causal, dead in cases:
        x.grad = None
        y = fusedformer.scaled_masked_softmax(x, 0.5, mask, causal, backend=backend)
        y.backward(dy)
        truth = reference.scaled_masked_softmax_ref(x.detach().double(), 0.5, mask, causal)
        assert not torch.isnan(y).any() and not torch.isnan(x.grad).any()
        for row in dead:
            assert torch.equal(y[row], torch.zeros(lk, device=device)), f"row {row} not zero"
            assert torch.equal(x.grad[row], torch.zeros(lk, device=device)), f"grad of row {row} not zero"
        assert_close("y", y, truth, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params("softmax"))
@pytest.mark.parametrize("lk", [77, 1025])
def test_strided_inputs_and_expanded_grads(backend, device, lk):
    """A transposed x, a non-contiguous broadcast mask, a stride-0 dy and a transposed dy."""
    require_backend("softmax", backend, device)
    b, h, lq = 2, 2, 3
    x = torch.randn(b, lk, h, lq, device=device).permute(0, 2, 3, 1).requires_grad_()  # (B, H, LQ, LK)
    mask = (torch.rand(lk, 1, b, device=device) > 0.3).permute(2, 1, 0)[:, :, None, :]  # (B, 1, 1, LK)
    y = fusedformer.scaled_masked_softmax(x, 0.8, mask, backend=backend)
    xr = x.detach().double().requires_grad_()
    yr = reference.scaled_masked_softmax_ref(xr, 0.8, mask)
    assert_close("y", y, yr, atol=1e-6)
    for name, dy in (("stride-0 dy", torch.randn(lk, device=device).expand(b, h, lq, lk)),
                     ("transposed dy", torch.randn(b, h, lk, lq, device=device).transpose(-1, -2))):
        (gx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
        (gr,) = torch.autograd.grad(yr, xr, dy.double(), retain_graph=True)
        assert_close(name, gx, gr, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params("softmax"))
def test_scores_ranks(backend, device):
    """(LQ, LK) and (H, LQ, LK) scores, with masks of fewer dims, through the public reshape."""
    require_backend("softmax", backend, device)
    for shape, mshape in (((7, 33), (33,)), ((3, 7, 33), (7, 33))):
        x = torch.randn(shape, device=device)
        mask = torch.rand(mshape, device=device) > 0.3
        y = fusedformer.scaled_masked_softmax(x, 0.7, mask, causal=True, backend=backend)
        assert y.shape == x.shape
        assert_close(str(shape), y, reference.scaled_masked_softmax_ref(x.double(), 0.7, mask, True), atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params("softmax"))
def test_torch_compile_fullgraph(backend, device):
    """Registered custom ops with fake implementations: no graph break, forward and backward."""
    require_backend("softmax", backend, device)
    torch._dynamo.reset()
    mask = torch.rand(2, 1, 1, 40, device=device) > 0.2
    w = torch.randn(40, device=device)

    def f(x):
        return (fusedformer.scaled_masked_softmax(x, 0.5, mask, causal=True, backend=backend) * w).sum()

    x = torch.randn(2, 3, 9, 40, device=device, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    gx = x.grad.clone()
    x.grad = None
    expected = f(x)
    expected.backward()
    assert_close("compiled loss", out, expected, atol=1e-5)
    assert_close("compiled dx", gx, x.grad, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params("softmax"))
@pytest.mark.parametrize("call,exc,match", [
    (lambda x: fusedformer.scaled_masked_softmax(x, 1.0, torch.ones(2, 5, dtype=torch.bool)), ValueError,
     r"mask of shape \(2, 5\) does not broadcast to the scores shape \(2, 3, 4, 5\)"),
    (lambda x: fusedformer.scaled_masked_softmax(x, 1.0, torch.ones(1, 1, 1, 1, 5, dtype=torch.bool)), ValueError,
     "does not broadcast"),
    (lambda x: fusedformer.scaled_masked_softmax(x, 1.0, torch.zeros(5, dtype=torch.float16)), TypeError,
     r"mask must be bool \(True = keep\) or torch.float32"),
    (lambda x: fusedformer.scaled_masked_softmax(x, 1.0, torch.zeros(5, dtype=torch.int32)), TypeError,
     "mask must be bool"),
    (lambda x: fusedformer.scaled_masked_softmax(x[None], 1.0), ValueError, r"scores must be 2-D or 3-D or 4-D"),
    (lambda x: fusedformer.scaled_masked_softmax(x[0, 0, 0], 1.0), ValueError, "scores must be 2-D"),
    (lambda x: fusedformer.scaled_masked_softmax(x.long(), 1.0), TypeError, "scores must be a floating tensor"),
    (lambda x: fusedformer.scaled_masked_softmax(x, True), TypeError, "scale must be a float, got bool"),
    (lambda x: fusedformer.scaled_masked_softmax(x, None), TypeError, "scale must be a float, got NoneType"),
])
def test_bad_input(backend, device, call, exc, match):
    require_backend("softmax", backend, device)
    with fusedformer.use_backend(backend), pytest.raises(exc, match=match):
        call(torch.randn(2, 3, 4, 5, device=device))


# ----------------------------------------------------------------------------------------
# Triton only: the looped path on short rows, and the launcher's own checks.


@pytest.mark.parametrize("kind", MASKS)
def test_triton_looped_path_forced(monkeypatch, kind):
    """Force the looped path (column blocks of 16) on short rows: every mask kind, ragged
    last blocks (LK = 37, and LK = 17: a last block of one column) and fully masked rows."""
    require_backend("softmax", "triton", "cpu")
    softmax = importlib.import_module("fusedformer.kernels.softmax")
    monkeypatch.setattr(softmax, "_MAX_BLOCK_N", 16)
    assert softmax._config(17)[2] and softmax._config(16)[2] is False
    for shape in ((2, 2, 3, 37), (1, 2, 6, 17)):
        mask, causal = _mask(kind, shape, torch.float32, "cpu")
        x = torch.randn(shape, requires_grad=True)
        dy = torch.randn(shape)
        assert_rule(_check("triton", x, 0.9, mask, causal, dy))


def test_triton_launcher_checks():
    require_backend("softmax", "triton", "cpu")
    softmax = importlib.import_module("fusedformer.kernels.softmax")
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"x must be 4-D \(B, H, LQ, LK\), got shape \(3, 4, 5\)"):
        softmax.softmax_fwd(x[0], None, 1.0, False)
    with pytest.raises(ValueError, match=r"mask must be 4-D and broadcast to x"):
        softmax.softmax_fwd(x, torch.ones(2, 3, 4, dtype=torch.bool), 1.0, False)
    with pytest.raises(TypeError, match="mask must be bool or torch.float32, got torch.float16"):
        softmax.softmax_fwd(x, torch.ones(1, 1, 1, 5, dtype=torch.float16), 1.0, False)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32, got torch.float64"):
        softmax.softmax_fwd(x.double(), None, 1.0, False)
    with pytest.raises(ValueError, match="dy must match y"):
        softmax.softmax_bwd(x.half(), x, 1.0)
