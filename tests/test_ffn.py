"""FFN: every fused backend vs the float64 oracle under the FlashAttention rule, forward and
every gradient, every activation; no biases, dropout (the backend's own keep-mask handed to
the oracle), strides, compile, errors."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, assert_close, assert_rule, backend_params, require_backend

import fusedformer
from fusedformer.kernels import ops, reference, testing
from fusedformer.kernels.reference import ACTIVATIONS

ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "swiglu": lambda t: F.silu(t[..., : t.shape[-1] // 2]) * t[..., t.shape[-1] // 2:],
}


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_rule(backend, device, dtype, activation):
    """M = 67, C = 40, F = 136: no dim a multiple of a 32-wide tile."""
    require_backend("ffn", backend, device)
    assert_rule(testing.check_ffn(backend, dtype, device, activation, m=67, c=40, f=136))


def _seed_of_next_call(rng_seed: int) -> int:
    """The dropout seed that fusedformer.ffn will draw after torch.manual_seed(rng_seed): it
    takes one int64 from torch's default generator (kernels/ops.py _new_seed)."""
    torch.manual_seed(rng_seed)
    return int(ops._new_seed(0.5))


def _outputs(backend, device, dtype, activation, m, c, f, bias1, bias2, dropout_p):
    """(names, fused, PyTorch (same dtype), float64 oracle): the output and every gradient for
    one configuration; with dropout the oracle and PyTorch apply the backend's own keep-mask for
    the seed that the fused call draws."""
    f1 = 2 * f if activation == "swiglu" else f
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).to(dtype).requires_grad_()  # noqa: E731
    x, w1, w2 = mk(m, c), mk(f1, c, scale=c ** -0.5), mk(c, f, scale=f ** -0.5)
    b1 = mk(f1) if bias1 else None
    b2 = mk(c) if bias2 else None
    dy = torch.randn(m, c, dtype=dtype, device=device)
    keep = None
    if dropout_p > 0:
        seed = _seed_of_next_call(1234)
        keep = ops.launchers(backend).ffn_dropout_mask(seed, (m, f), dropout_p, device)
        assert keep.dtype == torch.bool and keep.shape == (m, f)

    def fused(x, w1, w2, b1, b2):
        if dropout_p > 0:
            torch.manual_seed(1234)
        return fusedformer.ffn(x, w1, b1, w2, b2, activation, dropout_p, backend=backend)

    def pytorch(x, w1, w2, b1, b2):
        hidden = ACTS[activation](F.linear(x, w1, b1))
        if keep is not None:
            hidden = hidden * keep / (1 - dropout_p)
        return F.linear(hidden, w2, b2)

    def oracle(x, w1, w2, b1, b2):
        return reference.ffn_ref(x, w1, b1, w2, b2, activation, dropout_p if keep is not None else 0.0,
                                 dropout_mask=keep)

    names = ["y", "dx", "dw1", "dw2"] + (["db1"] if bias1 else []) + (["db2"] if bias2 else [])
    inputs = (x, w1, w2, b1, b2)
    wide = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    return (names, testing._run(fused, inputs, dy), testing._run(pytorch, inputs, dy),
            testing._run(oracle, wide, dy.double()))


def _check_custom(*args):
    names, fused, pytorch, truth = _outputs(*args)
    return [testing.compare(*z) for z in zip(names, fused, pytorch, truth)]


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_rule_single_row(backend, device, dtype, activation):
    """M = 1 (a decoding step). The weight gradients are then outer products (dw2 = dyᵀ hidden)
    whose every element carries the single rounding of one hidden value times |dy|, and the fused
    op and PyTorch round hidden differently (PyTorch twice for swiglu: silu, then * up), so the
    max error is a draw of rounding luck rather than accumulated error. Measured over 6 seeds:
    dw2 max err 0.052 vs PyTorch's 0.016 (bf16, swiglu) and 0.0086 vs 0.0036 (fp16), the same
    on the cpu and triton backends. Hence the floor here is one rounding unit of the tensor's
    largest value, eps(dtype) * max|truth|, on top of the rule's."""
    require_backend("ffn", backend, device)
    names, fused, pytorch, truth = _outputs(backend, device, dtype, activation, 1, 40, 24, True, True, 0.0)
    comparisons = []
    for name, a, b, t in zip(names, fused, pytorch, truth):
        cmp = testing.compare(name, a, b, t)
        cmp.bound += torch.finfo(dtype).eps * float(t.abs().max())
        comparisons.append(cmp)
    assert_rule(comparisons)


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("biases", ["none", "b1", "b2"])
def test_optional_biases_rule(backend, device, dtype, activation, biases):
    """The weight gradients' max error is again a draw of per-element rounding luck (as in
    test_rule_single_row, with 37 rows instead of 1): fp16 swiglu dw2 measured over 400 seeds on
    the cpu backend, fused/PyTorch max-error ratio median 0.97, worst 1.99; in the full suite's
    draw 0.0193 vs PyTorch's 0.0086 (2.24x). So the weight gradients get the same floor of one
    rounding unit of the largest value on top of the rule's."""
    require_backend("ffn", backend, device)
    names, fused, pytorch, truth = _outputs(backend, device, dtype, activation, 37, 40, 72,
                                            biases == "b1", biases == "b2", 0.0)
    comparisons = []
    for name, a, b, t in zip(names, fused, pytorch, truth):
        cmp = testing.compare(name, a, b, t)
        if name.startswith("dw"):
            cmp.bound += torch.finfo(dtype).eps * float(t.abs().max())
        comparisons.append(cmp)
    assert_rule(comparisons)


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dropout_rule(backend, device, dtype, activation):
    """The fused forward and backward apply the keep-mask that <backend>.ffn_dropout_mask
    returns for the seed (same seed -> same mask in forward and backward)."""
    require_backend("ffn", backend, device)
    assert_rule(_check_custom(backend, device, dtype, activation, 45, 40, 72, True, True, 0.3))


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
def test_dropout_mask_statistics(backend, device):
    require_backend("ffn", backend, device)
    mask_fn = ops.launchers(backend).ffn_dropout_mask
    p, shape = 0.3, (96, 200)
    keep = mask_fn(12345, shape, p, device)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
    cols, rows = keep.float().mean(0), keep.float().mean(1)
    assert cols.std() < 3 * (p * (1 - p) / shape[0]) ** 0.5 and rows.std() < 3 * (p * (1 - p) / shape[1]) ** 0.5
    assert torch.equal(keep, mask_fn(12345, shape, p, device)), "same seed must give the same mask"
    assert not torch.equal(keep, mask_fn(12346, shape, p, device)), "another seed must give another mask"
    assert mask_fn(7, shape, 0.0, device).all()


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
def test_dropout_fresh_seed_per_call(backend, device):
    """Two calls draw two masks; torch.manual_seed makes a call reproducible."""
    require_backend("ffn", backend, device)
    x, w1, w2 = torch.randn(9, 16, device=device), torch.randn(32, 16, device=device), torch.randn(16, 32, device=device)
    a = fusedformer.ffn(x, w1, None, w2, None, "relu", 0.5, backend=backend)
    b = fusedformer.ffn(x, w1, None, w2, None, "relu", 0.5, backend=backend)
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    c = fusedformer.ffn(x, w1, None, w2, None, "relu", 0.5, backend=backend)
    torch.manual_seed(3)
    assert torch.equal(c, fusedformer.ffn(x, w1, None, w2, None, "relu", 0.5, backend=backend))


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_strided_inputs_and_expanded_grads(backend, device, activation):
    """Transposed x and w1, a column-sliced w2, a 3-D x, and the stride-0 gradient of .sum()."""
    require_backend("ffn", backend, device)
    c, f = 24, 40
    f1 = 2 * f if activation == "swiglu" else f
    x = torch.randn(c, 2, 7, device=device).permute(1, 2, 0).requires_grad_()         # (2, 7, C)
    w1 = torch.randn(c, f1, device=device).t().requires_grad_()                        # (F1, C)
    w2 = torch.randn(c, 2 * f, device=device)[:, ::2].requires_grad_()                 # (C, F)
    b1 = torch.randn(f1, device=device).requires_grad_()
    b2 = torch.randn(2 * c, device=device)[::2].requires_grad_()
    y = fusedformer.ffn(x, w1, b1, w2, b2, activation, backend=backend)
    y.sum().backward()
    wide = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    yr = reference.ffn_ref(*wide, activation=activation)
    yr.sum().backward()
    assert y.shape == (2, 7, c)
    assert_close("y", y, yr, atol=1e-4, rtol=1e-5)
    for name, t, r in zip(("dx", "dw1", "db1", "dw2", "db2"), (x, w1, b1, w2, b2), wide):
        assert_close(name, t.grad, r.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_no_pre_without_a_backward(backend, device, activation, monkeypatch):
    """pre is saved for a backward only. Under no_grad, or with nothing requiring grad, ffn asks
    the launcher for no pre (save_pre=False: pre comes back (0, F1) and is never stored, the
    cpu backend's a chunk's workspace) and y keeps its bits, dropout included. The cpu backend
    runs 67 rows in chunks of 16 here."""
    require_backend("ffn", backend, device)
    monkeypatch.setenv("FUSEDFORMER_CPU_FFN_CHUNK_ROWS", "16")
    m, c, f = 67, 24, 40
    f1 = 2 * f if activation == "swiglu" else f
    mk = lambda *s, scale=1.0: (torch.randn(*s, device=device) * scale).requires_grad_()  # noqa: E731
    args = (mk(m, c), mk(f1, c, scale=c ** -0.5), mk(f1), mk(c, f, scale=f ** -0.5), mk(c))
    launch = ops.launchers(backend)
    asked = []
    real_fwd = launch.ffn_fwd

    def spy(*a):
        asked.append(a[-1])
        return real_fwd(*a)

    monkeypatch.setattr(launch, "ffn_fwd", spy)
    torch.manual_seed(5)
    y = fusedformer.ffn(*args, activation, 0.3, backend=backend)
    with torch.no_grad():
        torch.manual_seed(5)
        y_no_grad = fusedformer.ffn(*args, activation, 0.3, backend=backend)
    frozen = [t.detach() for t in args]
    torch.manual_seed(5)
    y_frozen = fusedformer.ffn(*frozen, activation, 0.3, backend=backend)
    assert asked == [True, False, False]
    assert torch.equal(y.detach(), y_no_grad) and torch.equal(y_no_grad, y_frozen)

    y_saved, pre = real_fwd(*frozen, activation, 0.3, 11, True)
    y_bare, no_pre = real_fwd(*frozen, activation, 0.3, 11, False)
    assert pre.shape == (m, f1) and no_pre.shape == (0, f1)
    assert torch.equal(y_saved, y_bare)
    torch.library.opcheck(ops._ffn_fwd.op, (*frozen, ACTIVATIONS.index(activation), 0.0, None,
                                            ops._backend_id(backend), False))


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
def test_torch_compile_fullgraph(backend, device):
    """Registered custom ops with fake implementations: no graph break, forward and backward."""
    require_backend("ffn", backend, device)
    torch._dynamo.reset()

    def block(x, w1, b1, w2, b2):
        return (fusedformer.ffn(x, w1, b1, w2, b2, "swiglu", backend=backend) ** 2).sum()

    args = [torch.randn(*s, device=device, requires_grad=True) for s in ((3, 5, 16), (48, 16), (48,), (16, 24), (16,))]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(*args)
    out.backward()
    grads = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    expected = block(*args)
    expected.backward()
    assert_close("compiled loss", out, expected, atol=1e-4, rtol=1e-5)
    for name, g, a in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, args):
        assert_close(f"compiled {name}", g, a.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
def test_torch_compile_dropout(backend, device):
    """Dropout under torch.compile: the seed is a traced tensor, not a baked-in constant."""
    require_backend("ffn", backend, device)
    torch._dynamo.reset()
    x, w1, w2 = torch.randn(9, 16, device=device), torch.randn(32, 16, device=device), torch.randn(16, 32, device=device)
    f = torch.compile(lambda x: fusedformer.ffn(x, w1, None, w2, None, "relu", 0.5, backend=backend),
                      fullgraph=True, backend="aot_eager")
    assert not torch.equal(f(x), f(x))


@pytest.mark.parametrize("backend,device", backend_params("ffn"))
@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w1, w2: fusedformer.ffn(x, w1[:, :7], None, w2, None), ValueError,
     r"w1 must have shape \(F, 8\) to match x's last dim 8, got \(16, 7\)"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, None, w2[:, :15], None), ValueError,
     r"w2 must have shape \(8, 16\) \(C, F\), got \(8, 15\)"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, None, w2[None], None), ValueError, "w2 must be 2-D"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, None, w2, None, "silu"), ValueError,
     r"activation must be one of \('relu', 'gelu', 'gelu_tanh', 'swiglu'\), got 'silu'"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1[:15], None, w2[:, :7], None, "swiglu"), ValueError,
     "w1 must have an even number of rows"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, None, w2, None, "swiglu"), ValueError,
     r"w2 must have shape \(8, 8\)"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1.half(), None, w2, None), TypeError,
     r"w1 must have the dtype of x \(torch.float32\), got torch.float16"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, torch.zeros(16, dtype=torch.bfloat16), w2, None), TypeError,
     "b1 must have the dtype of x"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, torch.zeros(15), w2, None), ValueError, r"b1 must have shape \(16,\)"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, None, w2, torch.zeros(9)), ValueError, r"b2 must have shape \(8,\)"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, None, w2, None, dropout_p=1.0), ValueError,
     r"dropout_p must be in \[0, 1\), got 1.0"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, None, w2, None, dropout_p=-0.1), ValueError, "dropout_p must be in"),
    (lambda x, w1, w2: fusedformer.ffn(x, w1, None, w2, None, dropout_p=True), TypeError, "dropout_p must be a float"),
    (lambda x, w1, w2: fusedformer.ffn(x.long(), w1, None, w2, None), TypeError, "x must be a floating tensor"),
])
def test_bad_input(backend, device, call, exc, match):
    require_backend("ffn", backend, device)
    x, w1, w2 = (torch.randn(*s, device=device) for s in ((5, 8), (16, 8), (8, 16)))
    with fusedformer.use_backend(backend), pytest.raises(exc, match=match):
        call(x, w1, w2)


def test_triton_launcher_checks():
    require_backend("ffn", "triton", "cpu")
    ffn = importlib.import_module("fusedformer.kernels.ffn")
    x, w1, w2 = torch.randn(5, 8), torch.randn(16, 8), torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"x must be 2-D \(M, C\)"):
        ffn.ffn_fwd(x[None], w1, None, w2, None, "relu", 0.0, 0)
    with pytest.raises(ValueError, match="activation must be one of"):
        ffn.ffn_fwd(x, w1, None, w2, None, "tanh", 0.0, 0)
    with pytest.raises(ValueError, match=r"w2 must be \(8, 8\)"):
        ffn.ffn_fwd(x, w1, None, w2, None, "swiglu", 0.0, 0)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        ffn.ffn_fwd(x.double(), w1.double(), None, w2.double(), None, "relu", 0.0, 0)
    with pytest.raises(ValueError, match=r"pre must be \(5, 16\)"):
        ffn.ffn_bwd(x, x, w1, None, w2, None, torch.randn(5, 15), "relu", 0.0, 0)
    with pytest.raises(ValueError, match=r"shape must be \(M, F\)"):
        ffn.ffn_dropout_mask(0, (4,), 0.1, "cpu")


def test_triton_autotune_pruning():
    """The GPU autotuner's pruning (no GPU needed: it reads the configs and the arguments)."""
    require_backend("ffn", "triton", "cpu")
    ffn = importlib.import_module("fusedformer.kernels.ffn")
    configs = ffn._gpu_configs()

    def kept(dtype, epilogue, act):
        a = torch.empty(2, 2, dtype=dtype)
        pruned = ffn._prune_gemm_configs(configs, {"A": a}, EPILOGUE=epilogue, ACT=act)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in pruned}

    swiglu, relu = ffn.ACTIVATIONS["swiglu"], ffn.ACTIVATIONS["relu"]
    plain = kept(torch.bfloat16, ffn._EPI_BIAS, relu)
    assert (128, 256, 64, 3) in plain and len(plain) == len(configs)
    # two B tiles per stage: 3 * (128 * 64 + 2 * 64 * 256) * 2 B = 240 KiB > 227 KiB
    assert (128, 256, 64, 3) not in kept(torch.bfloat16, ffn._EPI_ACT_FWD, swiglu)
    assert (128, 256, 64, 3) not in kept(torch.float16, ffn._EPI_ACT_BWD, relu)
    fp32 = kept(torch.float32, ffn._EPI_BIAS, relu)
    assert fp32 and all(bm * bn <= 128 * 64 for bm, bn, _, _ in fp32)
    only_large = [c for c in configs if c.kwargs["BLOCK_M"] == 128
                  and c.kwargs["BLOCK_N"] == 256]
    assert len(ffn._prune_gemm_configs(only_large, {"A": torch.empty(1, dtype=torch.float32)},
                                       EPILOGUE=ffn._EPI_BIAS, ACT=relu)) == 1  # never empty


def test_triton_empty_rows():
    require_backend("ffn", "triton", "cpu")
    x = torch.randn(0, 8, requires_grad=True)
    w1, w2 = torch.randn(16, 8, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    b2 = torch.randn(8, requires_grad=True)
    y = fusedformer.ffn(x, w1, None, w2, b2, backend="triton")
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)
    assert torch.equal(w1.grad, torch.zeros(16, 8)) and torch.equal(b2.grad, torch.zeros(8))
