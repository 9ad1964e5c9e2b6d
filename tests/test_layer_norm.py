"""LayerNorm (+ fused residual): every fused backend vs the float64 oracle under the
FlashAttention rule, forward and every gradient; strides, compile, errors."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_close, assert_rule, backend_params, require_backend

import fusedformer
from fusedformer.kernels import reference, testing

SHAPES = [(1, 1), (3, 1), (1, 7), (5, 123, 123), (2, 97, 80), (3, 4099)]


@pytest.mark.parametrize("backend,device", backend_params("layer_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_residual_rule(backend, device, dtype, shape):
    require_backend("layer_norm", backend, device)
    assert_rule(testing.check_layer_norm(backend, dtype, device, shape))


@pytest.mark.parametrize("backend,device", backend_params("layer_norm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 6144), (2, 12288), (2, 12289)], ids=str)
def test_wide_rows(backend, device, dtype, shape):
    """The CUDA kernels' shared-memory boundaries: the forward caches rows of up to 12288 fp32
    (48 KiB, over the launch default once the kernel's static buffer counts), the backward
    accumulates dweight/dbias in shared memory up to 6144 columns."""
    require_backend("layer_norm", backend, device)
    assert_rule(testing.check_layer_norm(backend, dtype, device, shape))


def _grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    out.backward(dy)
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("backend,device", backend_params("layer_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_plain_rule(backend, device, dtype, affine):
    """No residual; weight and bias optional."""
    require_backend("layer_norm", backend, device)
    n = 77
    x = torch.randn(6, 5, n, dtype=dtype, device=device)
    w = torch.randn(n, dtype=dtype, device=device) if affine != "none" else None
    b = torch.randn(n, dtype=dtype, device=device) if affine == "both" else None
    dy = torch.randn_like(x)
    args = (x, w, b)

    def fused(x, w, b):
        with fusedformer.use_backend(backend):
            return fusedformer.layer_norm(x, n, w, b, 1e-5)

    got = _grads(fused, args, dy)
    ours = _grads(lambda x, w, b: F.layer_norm(x, (n,), w, b, 1e-5), args, dy)
    wide = [t.double() if t is not None else None for t in args]
    truth = _grads(lambda x, w, b: reference.layer_norm_ref(x, n, w, b, 1e-5), wide, dy.double())
    names = ["y", "dx", "dweight", "dbias"][: len(got)]
    assert_rule([testing.compare(*z) for z in zip(names, got, ours, truth)])


@pytest.mark.parametrize("backend,device", backend_params("layer_norm"))
def test_strided_inputs_and_expanded_grads(backend, device):
    """Transposed inputs and the stride-0 gradient of .sum() must not be read as contiguous."""
    require_backend("layer_norm", backend, device)
    x = torch.randn(40, 3, 64, device=device).transpose(0, 1).requires_grad_()  # (3, 40, 64) strided
    r = torch.randn(64, 3, 40, device=device).permute(1, 2, 0).requires_grad_()
    w = torch.randn(128, device=device)[::2].requires_grad_()
    with fusedformer.use_backend(backend):
        y, h = fusedformer.layer_norm(x, 64, w, None, 1e-5, residual=r)
    y.sum().backward()
    xr, rr, wr = (t.detach().double().requires_grad_() for t in (x, r, w))
    yr, _ = reference.layer_norm_ref(xr, 64, wr, None, 1e-5, rr)
    yr.sum().backward()
    assert_close("y", y, yr, atol=1e-5)
    assert_close("h", h, (xr + rr), atol=1e-6)
    for name, a, e in (("dx", x.grad, xr.grad), ("dresidual", r.grad, rr.grad), ("dweight", w.grad, wr.grad)):
        assert_close(name, a, e, atol=2e-4)


@pytest.mark.parametrize("backend,device", backend_params("layer_norm"))
def test_deterministic(backend, device):
    require_backend("layer_norm", backend, device)
    x = torch.randn(300, 96, device=device)
    w = torch.randn(96, device=device, requires_grad=True)
    b = torch.randn(96, device=device, requires_grad=True)
    dy = torch.randn(300, 96, device=device)
    runs = []
    for _ in range(2):
        w.grad = b.grad = None
        with fusedformer.use_backend(backend):
            fusedformer.layer_norm(x, 96, w, b).backward(dy)
        runs.append((w.grad.clone(), b.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend,device", backend_params("layer_norm"))
def test_empty_rows(backend, device):
    require_backend("layer_norm", backend, device)
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.randn(16, device=device, requires_grad=True)
    with fusedformer.use_backend(backend):
        y = fusedformer.layer_norm(x, 16, w)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros(16, device=device))


@pytest.mark.parametrize("backend,device", backend_params("layer_norm"))
def test_torch_compile_fullgraph(backend, device):
    """Registered custom ops with fake implementations: no graph break, same numbers."""
    require_backend("layer_norm", backend, device)
    torch._dynamo.reset()

    def block(x, r, w, b):
        y, h = fusedformer.layer_norm(x, 32, w, b, residual=r, backend=backend)
        return (y * 2 + h).sum()

    x, r = torch.randn(2, 9, 32, device=device, requires_grad=True), torch.randn(2, 9, 32, device=device)
    w, b = torch.randn(32, device=device, requires_grad=True), torch.randn(32, device=device)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(x, r, w, b)
    out.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    block(x, r, w, b).backward()
    assert_close("compiled loss", out, block(x, r, w, b), atol=1e-4)
    assert_close("compiled dx", gx, x.grad, atol=1e-5)
    assert_close("compiled dw", gw, w.grad, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    """The full inductor pipeline (C++ codegen) around the cpu backend's op."""
    require_backend("layer_norm", "cpu", "cpu")
    torch._dynamo.reset()

    def f(x, w):
        return fusedformer.layer_norm(x.relu(), 48, w) * 3

    x, w = torch.randn(7, 48), torch.randn(48)
    with fusedformer.use_backend("cpu"):  # outside the compiled function: read at trace time
        assert_close("inductor", torch.compile(f, fullgraph=True)(x, w), f(x, w), atol=1e-5)


def test_matches_functional_layer_norm_multidim():
    """normalized_shape over two dims, through the public function's reshape."""
    x = torch.randn(3, 5, 6, 7)
    w, b = torch.randn(6, 7), torch.randn(6, 7)
    for backend in fusedformer.available_backends():
        if backend in ("reference", "cpu"):
            with fusedformer.use_backend(backend):
                assert_close(backend, fusedformer.layer_norm(x, (6, 7), w, b), F.layer_norm(x, (6, 7), w, b), atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("call,exc,match", [
    (lambda x: fusedformer.layer_norm(x, 8), ValueError, r"normalized_shape \(8,\) must match the trailing dims of x"),
    (lambda x: fusedformer.layer_norm(x, (2, 16)), ValueError, "must match the trailing dims"),
    (lambda x: fusedformer.layer_norm(x, 16, eps=0.0), ValueError, "eps must be a float > 0, got 0.0"),
    (lambda x: fusedformer.layer_norm(x, 16, eps=-1), ValueError, "eps must be a float > 0"),
    (lambda x: fusedformer.layer_norm(x, 16, torch.ones(15)), ValueError, r"weight must have shape \(16,\)"),
    (lambda x: fusedformer.layer_norm(x, 16, torch.ones(16, dtype=torch.float64)), TypeError, "weight must have the dtype of x"),
    (lambda x: fusedformer.layer_norm(x, 16, None, torch.ones(3)), ValueError, "bias must have shape"),
    (lambda x: fusedformer.layer_norm(x, 16, residual=torch.ones(4, 15)), ValueError, "residual must have shape"),
    (lambda x: fusedformer.layer_norm(x.long(), 16), TypeError, "x must be a floating tensor"),
    (lambda x: fusedformer.layer_norm([1.0], 16), TypeError, "x must be a torch.Tensor, got list"),
    (lambda x: fusedformer.layer_norm(x, "16"), TypeError, "normalized_shape must be an int or a sequence of ints"),
])
def test_bad_input(backend, call, exc, match):
    require_backend("layer_norm", backend, "cpu")
    with fusedformer.use_backend(backend), pytest.raises(exc, match=match):
        call(torch.randn(4, 16))


def test_cpu_backend_rejects_float64():
    require_backend("layer_norm", "cpu", "cpu")
    with fusedformer.use_backend("cpu"), pytest.raises(TypeError, match="backend 'cpu' supports float16, bfloat16 and float32"):
        fusedformer.layer_norm(torch.randn(2, 8, dtype=torch.float64), 8)


def test_cpp_checks_have_clear_messages():
    """The pybind11 boundary checks on its own, below the Python validation."""
    from fusedformer.kernels.dispatch import extension

    ext, _ = extension()
    if ext is None:
        pytest.skip("extension not built")
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"residual must have shape \(rows, cols\) = \[4, 8\], got \[4, 7\]"):
        ext.layer_norm_fwd(x, torch.randn(4, 7), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        ext.layer_norm_fwd(x.double(), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have the same dtype as x"):
        ext.layer_norm_fwd(x, None, torch.randn(8).half(), None, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be > 0"):
        ext.layer_norm_fwd(x, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ext.layer_norm_fwd(x[None], None, None, None, 1e-5)


# ----------------------------------------------------------------------------------------
# Triton only: the wide-row (looped) kernels, which rows wider than one block (4096) take.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_wide_rows_looped_path(monkeypatch, dtype):
    """Force the looped kernels with 64-column blocks on 10 rows of 150 (a ragged last block)
    and 3 row groups (4, 4 and 2 rows): residual, dweight/dbias accumulated in place, under the
    rule."""
    require_backend("layer_norm", "triton", "cpu")
    import importlib

    layer_norm = importlib.import_module("fusedformer.kernels.layer_norm")
    monkeypatch.setattr(layer_norm, "_MAX_BLOCK_N", 64)
    monkeypatch.setattr(layer_norm, "_bwd_groups", lambda rows, device: 3)
    assert layer_norm._config(150)[2] is False
    assert_rule(testing.check_layer_norm("triton", dtype, "cpu", (10, 150)))


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_triton_wide_rows_unforced(affine):
    """N = 9000 > 4096 as shipped: three column blocks per row, with and without affine."""
    require_backend("layer_norm", "triton", "cpu")
    n = 9000
    x = torch.randn(3, n, requires_grad=True)
    w = torch.randn(n, requires_grad=True) if affine != "none" else None
    b = torch.randn(n, requires_grad=True) if affine == "both" else None
    dy = torch.randn(3, n)
    y = fusedformer.layer_norm(x, n, w, b, backend="triton")
    y.backward(dy)
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    yr = reference.layer_norm_ref(leaves[0], n, leaves[1], leaves[2])
    yr.backward(dy.double())
    assert_close("y", y, yr, atol=2e-5)
    for name, t, r in zip(("dx", "dweight", "dbias"), (x, w, b), leaves):
        if t is not None:
            assert_close(name, t.grad, r.grad, atol=2e-4, rtol=1e-6)
