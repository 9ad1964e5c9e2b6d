"""The C++ backends (`cpu`, and `cuda` in the GPU tier) of the standalone softmax and the FFN:
fused vs the float64 oracle under the FlashAttention rule, forward and every gradient;
masks, causal, fully masked rows, awkward shapes, strides, dropout, determinism, compile,
errors from the public API and from fusedformer._C directly."""
import math

import pytest
import torch
from conftest import DTYPES, assert_close, assert_rule, require_backend

import fusedformer
from fusedformer.kernels import cpp_backend, ops, reference, testing
from fusedformer.kernels.dispatch import extension

PAIRS = [pytest.param("cpu", "cpu", id="cpu-cpu"),
         pytest.param("cuda", "cuda", marks=pytest.mark.gpu, id="cuda-cuda")]


def _rule(names, inputs, dy, fused, pytorch, oracle):
    """testing's per-op machinery: fused and PyTorch's same-dtype op vs the float64 oracle."""
    assert_rule(testing._check(names, inputs, dy, fused, pytorch, oracle))


# ----------------------------------------------------------------------------------------
# Softmax


def _mask(kind, shape, dtype, device):
    b, h, lq, lk = shape
    if kind == "none":
        return None
    if kind == "bool_keys":  # key padding, broadcast over heads and rows (stride 0)
        return torch.rand(b, 1, 1, lk, device=device) > 0.3
    if kind == "bool_full":  # every element its own, some rows fully masked
        m = torch.rand(shape, device=device) > 0.5
        m[..., 0, :] = False
        return m
    if kind == "add_rows":  # additive, broadcast over batch and keys
        return torch.randn(1, h, lq, 1, device=device).to(dtype)
    if kind == "add_full":  # additive with -inf holes
        m = torch.randn(shape, device=device)
        m[torch.rand(shape, device=device) > 0.7] = -math.inf
        return m.to(dtype)
    raise AssertionError(kind)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 1), (2, 2, 7, 97), (1, 2, 3, 1025), (1, 1, 2, 4097),
                                   (1, 2, 33, 64)], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool_keys", "bool_full", "add_rows", "add_full"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_rule(backend, device, dtype, shape, mask_kind, causal):
    require_backend("softmax", backend, device)
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    dy = torch.randn(shape, dtype=dtype, device=device)
    mask = _mask(mask_kind, shape, dtype, device)
    scale = 0.61

    def fused(x):
        return ops.scaled_masked_softmax(x, scale, mask, causal, backend=backend)

    def pytorch(x):  # the oracle's math in x's own dtype: PyTorch's same-dtype error
        return reference.scaled_masked_softmax_ref(x, scale, mask, causal)

    def oracle(x):
        m = mask.double() if mask is not None and mask.dtype != torch.bool else mask
        return reference.scaled_masked_softmax_ref(x, scale, m, causal)

    _rule(("y", "dx"), (x.requires_grad_(),), dy, fused, pytorch, oracle)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_fully_masked_rows_are_zero(backend, device, dtype):
    require_backend("softmax", backend, device)
    x = torch.randn(2, 3, 6, 50, dtype=dtype, device=device, requires_grad=True)
    keep = torch.ones(2, 1, 6, 50, dtype=torch.bool, device=device)
    keep[1, :, 2] = False  # row 2 of batch 1: every key masked
    add = torch.zeros(1, 3, 1, 50, dtype=dtype, device=device)
    add[:, 1] = -math.inf  # head 1: every key -inf
    for mask in (keep, add):
        x.grad = None
        y = ops.scaled_masked_softmax(x, 1.0, mask, backend=backend)
        y.backward(torch.randn_like(y))
        assert not torch.isnan(y).any() and not torch.isnan(x.grad).any()
        dead = (1, slice(None), 2) if mask is keep else (slice(None), 1)
        assert torch.equal(y[dead], torch.zeros_like(y[dead]))
        assert torch.equal(x.grad[dead], torch.zeros_like(x.grad[dead]))
    # causal with LQ > LK: nothing is fully masked (row i keeps j <= i), rows past LK keep all
    y = ops.scaled_masked_softmax(x[:, :, :, :4], 1.0, causal=True, backend=backend)
    assert_close("causal rows", y.float().sum(-1), torch.ones(2, 3, 6, device=device), atol=1e-2)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_softmax_strided_inputs_and_expanded_grads(backend, device):
    require_backend("softmax", backend, device)
    x = torch.randn(33, 2, 3, 19, device=device).permute(1, 2, 0, 3).requires_grad_()  # (2, 3, 33, 19)
    mask = (torch.rand(19, 2, device=device) > 0.2).t()[:, None, None, :]  # (2, 1, 1, 19), strided
    y = ops.scaled_masked_softmax(x, 0.5, mask, causal=True, backend=backend)
    (y * torch.arange(19, device=device)).sum().backward()  # grad: stride-0 along rows
    xr = x.detach().double().requires_grad_()
    yr = reference.scaled_masked_softmax_ref(xr, 0.5, mask, True)
    (yr * torch.arange(19, device=device)).sum().backward()
    assert_close("y", y, yr, atol=1e-6)
    assert_close("dx", x.grad, xr.grad, atol=1e-5)
    # 2-D and 3-D scores through the public reshape
    s = torch.randn(7, 11, device=device)
    assert_close("2-D", ops.scaled_masked_softmax(s, 2.0, backend=backend),
                 torch.softmax(s * 2.0, -1), atol=1e-6)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_softmax_deterministic_and_compiled(backend, device):
    require_backend("softmax", backend, device)
    x = torch.randn(2, 4, 17, 300, device=device, requires_grad=True)
    mask = torch.randn(2, 1, 17, 300, device=device)
    dy = torch.randn_like(x)

    def f(x):
        return ops.scaled_masked_softmax(x, 0.3, mask, causal=True, backend=backend)

    runs = []
    for _ in range(2):
        x.grad = None
        y = f(x)
        y.backward(dy)
        runs.append((y.detach(), x.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    torch._dynamo.reset()
    x.grad = None
    yc = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    yc.backward(dy)
    assert_close("compiled y", yc, runs[0][0], atol=1e-6)
    assert_close("compiled dx", x.grad, runs[0][1], atol=1e-6)


# ----------------------------------------------------------------------------------------
# FFN


def _ffn_inputs(m, c, f, activation, dtype, device, biases=True):
    f1 = 2 * f if activation == "swiglu" else f
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(dtype).requires_grad_()  # noqa: E731
    x, w1, w2 = mk(m, c), mk(f1, c, scale=c ** -0.5), mk(c, f, scale=f ** -0.5)
    b1, b2 = (mk(f1), mk(c)) if biases else (None, None)
    return x, w1, b1, w2, b2


def _ffn_rule(backend, device, dtype, activation, m, c, f, biases=True, dropout_p=0.0, seed=7):
    inputs = _ffn_inputs(m, c, f, activation, dtype, device, biases)
    dy = torch.randn(m, c, dtype=dtype, device=device)
    keep = None
    if dropout_p:
        torch.manual_seed(seed)  # ops.ffn draws its dropout seed from torch's generator
        kseed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        keep = cpp_backend.ffn_dropout_mask(kseed, (m, f), dropout_p, device)

    def fused(x, w1, b1, w2, b2):
        torch.manual_seed(seed)
        return ops.ffn(x, w1, b1, w2, b2, activation, dropout_p, backend=backend)

    def ref(x, w1, b1, w2, b2):
        return reference.ffn_ref(x, w1, b1, w2, b2, activation, dropout_p, dropout_mask=keep)

    names = ("y", "dx", "dw1", "db1", "dw2", "db2") if biases else ("y", "dx", "dw1", "dw2")
    _rule(names, inputs, dy, fused, ref, ref)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("mcf", [(1, 40, 136), (67, 40, 136), (67, 64, 24), (5, 8, 3)], ids=str)
def test_ffn_rule(backend, device, dtype, activation, mcf):
    require_backend("ffn", backend, device)
    _ffn_rule(backend, device, dtype, activation, *mcf)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_ffn_wide_preactivations(backend, device, dtype, activation):
    """Pre-activations out to about +-100: the saturated tails of the activations (the CPU
    kernels' polynomial exp/erf/tanh clamp and flush there) and every gradient, under the rule."""
    require_backend("ffn", backend, device)
    m, c, f = 33, 16, 40
    x, w1, b1, w2, b2 = _ffn_inputs(m, c, f, activation, dtype, device)
    with torch.no_grad():
        w1.mul_(25.0)
    dy = torch.randn(m, c, dtype=dtype, device=device)

    def fused(x, w1, b1, w2, b2):
        return ops.ffn(x, w1, b1, w2, b2, activation, backend=backend)

    def ref(x, w1, b1, w2, b2):
        return reference.ffn_ref(x, w1, b1, w2, b2, activation)

    _rule(("y", "dx", "dw1", "db1", "dw2", "db2"), (x, w1, b1, w2, b2), dy, fused, ref, ref)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
def test_ffn_no_biases(backend, device, dtype, activation):
    require_backend("ffn", backend, device)
    _ffn_rule(backend, device, dtype, activation, 31, 40, 72, biases=False)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_ffn_dropout_matches_oracle_with_the_same_mask(backend, device, dtype, activation):
    require_backend("ffn", backend, device)
    _ffn_rule(backend, device, dtype, activation, 37, 40, 136, dropout_p=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("biases", [True, False], ids=["biases", "no_biases"])
def test_ffn_cpu_row_chunks(monkeypatch, dtype, activation, biases):
    """The cpu backend runs the FFN in chunks of rows (bounded workspaces): 67 rows as 16, 16,
    16, 16 and 3. Dropout must keep each row's own mask (row0 offset), and the weight and bias
    gradients sum over the chunks (fp32 across chunks; bf16's backward runs as one chunk)."""
    require_backend("ffn", "cpu", "cpu")
    monkeypatch.setenv("FUSEDFORMER_CPU_FFN_CHUNK_ROWS", "16")
    _ffn_rule("cpu", "cpu", dtype, activation, 67, 40, 72, biases=biases, dropout_p=0.3)


@pytest.mark.parametrize("rows", ["0", "-3", "abc", "16x", ""])
def test_ffn_cpu_chunk_rows_env_is_checked(monkeypatch, rows):
    require_backend("ffn", "cpu", "cpu")
    monkeypatch.setenv("FUSEDFORMER_CPU_FFN_CHUNK_ROWS", rows)
    x, w1, b1, w2, b2 = _ffn_inputs(5, 8, 16, "gelu", torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=f"FUSEDFORMER_CPU_FFN_CHUNK_ROWS must be a positive integer, got '{rows}'"):
        ops.ffn(x, w1, b1, w2, b2, backend="cpu")


def test_ffn_dropout_mask_statistics_and_seeding():
    require_backend("ffn", "cpu", "cpu")
    keep = cpp_backend.ffn_dropout_mask(1234, (300, 500), 0.25)
    assert keep.dtype == torch.bool and keep.shape == (300, 500)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert torch.equal(keep, cpp_backend.ffn_dropout_mask(1234, (300, 500), 0.25))
    assert not torch.equal(keep, cpp_backend.ffn_dropout_mask(1235, (300, 500), 0.25))
    # element (i, j) depends on (seed, i * F + j) only: a sub-block of rows is a prefix
    assert torch.equal(keep[:100], cpp_backend.ffn_dropout_mask(1234, (100, 500), 0.25))
    assert cpp_backend.ffn_dropout_mask(5, (4, 9), 0.0).all()


@pytest.mark.parametrize("backend,device", PAIRS)
def test_ffn_dropout_consistent_fwd_bwd(backend, device):
    """The backward reuses the forward's keep-mask: dropped hidden units get no gradient."""
    require_backend("ffn", backend, device)
    x, w1, b1, w2, b2 = _ffn_inputs(23, 16, 40, "relu", torch.float32, device)
    torch.manual_seed(3)
    y = ops.ffn(x, w1, b1, w2, b2, "relu", 0.5, backend=backend)
    torch.manual_seed(3)
    y2 = ops.ffn(x, w1, b1, w2, b2, "relu", 0.5, backend=backend)
    assert torch.equal(y, y2)
    y3 = ops.ffn(x, w1, b1, w2, b2, "relu", 0.5, backend=backend)  # a fresh seed
    assert not torch.equal(y, y3)
    y.sum().backward()
    torch.manual_seed(3)
    kseed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = cpp_backend.ffn_dropout_mask(kseed, (23, 40), 0.5, device)
    dead = ~keep.any(0)  # hidden units dropped for every row get no gradient in w2
    assert torch.equal(w2.grad[:, dead], torch.zeros_like(w2.grad[:, dead]))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_ffn_strided_inputs_expanded_grads_and_batch_dims(backend, device):
    require_backend("ffn", backend, device)
    x = torch.randn(40, 3, 5, device=device).permute(1, 2, 0).requires_grad_()  # (3, 5, 40)
    w1 = torch.randn(40, 72, device=device).t().mul(0.2).requires_grad_()  # (72, 40) transposed
    w2 = torch.randn(40, 144, device=device)[:, ::2].mul(0.2).requires_grad_()  # (40, 72) strided
    b1 = torch.randn(72, device=device, requires_grad=True)
    b2 = torch.randn(40, device=device, requires_grad=True)
    y = ops.ffn(x, w1, b1, w2, b2, "gelu_tanh", backend=backend)
    y.sum().backward()  # a stride-0 grad
    leaves = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    yr = reference.ffn_ref(*leaves, activation="gelu_tanh")
    yr.sum().backward()
    assert y.shape == (3, 5, 40)
    assert_close("y", y, yr, atol=1e-4)
    for name, t, r in zip(("dx", "dw1", "db1", "dw2", "db2"), (x, w1, b1, w2, b2), leaves):
        assert_close(name, t.grad, r.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_ffn_deterministic_empty_and_compiled(backend, device):
    require_backend("ffn", backend, device)
    x, w1, b1, w2, b2 = _ffn_inputs(50, 24, 48, "swiglu", torch.float32, device)
    dy = torch.randn(50, 24, device=device)

    def f(x, w1, b1, w2, b2):
        return ops.ffn(x, w1, b1, w2, b2, "swiglu", backend=backend)

    runs = []
    for _ in range(2):
        for t in (x, w1, b1, w2, b2):
            t.grad = None
        y = f(x, w1, b1, w2, b2)
        y.backward(dy)
        runs.append([y.detach()] + [t.grad.clone() for t in (x, w1, b1, w2, b2)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    torch._dynamo.reset()
    for t in (x, w1, b1, w2, b2):
        t.grad = None
    yc = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w1, b1, w2, b2)
    yc.backward(dy)
    for name, a, e in zip(("y", "dx", "dw1", "db1", "dw2", "db2"),
                          [yc] + [t.grad for t in (x, w1, b1, w2, b2)], runs[0]):
        assert_close("compiled " + name, a, e, atol=1e-5)
    # no rows: empty output, zero weight grads
    x0 = torch.randn(0, 24, device=device, requires_grad=True)
    for t in (w1, b1, w2, b2):
        t.grad = None
    y0 = f(x0, w1, b1, w2, b2)
    y0.sum().backward()
    assert y0.shape == (0, 24) and x0.grad.shape == (0, 24)
    assert not w1.grad.any() and not b1.grad.any() and not w2.grad.any() and not b2.grad.any()


# ----------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.scaled_masked_softmax(torch.randn(2, 3, 4, 5, 6), backend="cpu"), ValueError, "scores must be 2-D or 3-D or 4-D"),
    (lambda: ops.scaled_masked_softmax(torch.randn(4, 5), mask=torch.ones(4, 5, dtype=torch.int32), backend="cpu"), TypeError, "mask must be bool"),
    (lambda: ops.scaled_masked_softmax(torch.randn(4, 5), mask=torch.ones(3, 5, dtype=torch.bool), backend="cpu"), ValueError, "does not broadcast"),
    (lambda: ops.scaled_masked_softmax(torch.randn(4, 5, dtype=torch.float64), backend="cpu"), TypeError, "backend 'cpu' supports float16, bfloat16 and float32"),
    (lambda: ops.ffn(torch.randn(3, 8), torch.randn(16, 8), None, torch.randn(8, 16), None, "tanh", backend="cpu"), ValueError, "activation must be one of"),
    (lambda: ops.ffn(torch.randn(3, 8), torch.randn(16, 7), None, torch.randn(8, 16), None, backend="cpu"), ValueError, r"w1 must have shape \(F, 8\)"),
    (lambda: ops.ffn(torch.randn(3, 8), torch.randn(15, 8), None, torch.randn(8, 7), None, "swiglu", backend="cpu"), ValueError, "even number of rows"),
    (lambda: ops.ffn(torch.randn(3, 8), torch.randn(16, 8), torch.randn(15), torch.randn(8, 16), None, backend="cpu"), ValueError, "b1 must have shape"),
    (lambda: ops.ffn(torch.randn(3, 8), torch.randn(16, 8), None, torch.randn(8, 16), None, dropout_p=1.0, backend="cpu"), ValueError, "dropout_p must be in"),
    (lambda: ops.ffn(torch.randn(3, 8), torch.randn(16, 8).half(), None, torch.randn(8, 16), None, backend="cpu"), TypeError, "w1 must have the dtype of x"),
])
def test_public_api_errors(call, exc, match):
    require_backend("ffn", "cpu", "cpu")
    with pytest.raises(exc, match=match):
        call()


def test_cpp_checks_have_clear_messages():
    """The pybind11 boundary on its own, below the Python validation."""
    ext, _ = extension()
    if ext is None:
        pytest.skip("extension not built")
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="softmax_fwd: x must be 4-D"):
        ext.softmax_fwd(x[0], None, 1.0, False)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        ext.softmax_fwd(x.double(), None, 1.0, False)
    with pytest.raises(RuntimeError, match="mask must be bool .* or Float .* got Int"):
        ext.softmax_fwd(x, torch.ones(1, 1, 1, 5, dtype=torch.int32), 1.0, False)
    with pytest.raises(RuntimeError, match=r"mask of shape \[1, 1, 4, 4\] does not broadcast"):
        ext.softmax_fwd(x, torch.ones(1, 1, 4, 4, dtype=torch.bool), 1.0, False)
    with pytest.raises(RuntimeError, match="mask must be 4-D"):
        ext.softmax_fwd(x, torch.ones(5, dtype=torch.bool), 1.0, False)
    with pytest.raises(RuntimeError, match="dy must have the shape of y"):
        ext.softmax_bwd(x[..., :4], x, 1.0)
    with pytest.raises(RuntimeError, match="dy must have the same dtype as y"):
        ext.softmax_bwd(x.half(), x, 1.0)

    xf, w1, w2 = torch.randn(3, 8), torch.randn(16, 8), torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="ffn_fwd: activation must be one of relu, gelu, gelu_tanh, swiglu, got 'tanh'"):
        ext.ffn_fwd(xf, w1, None, w2, None, "tanh", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"w2 must have shape \(c, f\) = \[8, 16\], got \[8, 15\]"):
        ext.ffn_fwd(xf, w1, None, w2[:, :15], None, "relu", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"w2 must have shape \(c, f\) = \[8, 8\]"):
        ext.ffn_fwd(xf, w1, None, w2, None, "swiglu", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"b2 must have shape \(c\) = \[8\]"):
        ext.ffn_fwd(xf, w1, None, w2, torch.randn(16), "relu", 0.0, 0)
    with pytest.raises(RuntimeError, match="ffn_fwd: x must be 2-D"):
        ext.ffn_fwd(xf[None], w1, None, w2, None, "relu", 0.0, 0)
    with pytest.raises(RuntimeError, match="ffn_fwd: x must have C > 0 columns"):
        ext.ffn_fwd(torch.randn(3, 0), torch.randn(16, 0), None, torch.randn(0, 16), None, "relu", 0.0, 0)
    with pytest.raises(RuntimeError, match="ffn_fwd: dropout_p must be in"):
        ext.ffn_fwd(xf, w1, None, w2, None, "relu", 1.5, 0)
    with pytest.raises(RuntimeError, match="b1 must have the same dtype as x"):
        ext.ffn_fwd(xf, w1, torch.randn(16).half(), w2, None, "relu", 0.0, 0)
    with pytest.raises(RuntimeError, match=r"pre must have shape \(m, f1\) = \[3, 16\], got \[3, 15\]"):
        ext.ffn_bwd(torch.randn(3, 8), xf, w1, None, w2, None, torch.randn(3, 15), "relu", 0.0, 0)
    with pytest.raises(RuntimeError, match="ffn_dropout_mask: dropout_p must be in"):
        ext.ffn_dropout_mask(0, [2, 3], -0.1)
