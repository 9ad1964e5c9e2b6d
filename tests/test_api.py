"""The public API around the ops: backend choice, info, errors, the CLI, and the package
working without its compiled extension."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedformer
from fusedformer.kernels import dispatch


def test_public_names():
    for name in ("scaled_dot_product_attention", "attention", "scaled_masked_softmax", "layer_norm",
                 "ffn", "set_backend", "use_backend", "available_backends", "info"):
        assert callable(getattr(fusedformer, name)), name


def test_use_backend_nests_and_restores():
    assert fusedformer.get_backend() == "auto"
    with fusedformer.use_backend("reference"):
        assert fusedformer.get_backend() == "reference"
        with fusedformer.use_backend("cpu"):
            assert fusedformer.get_backend() == "cpu"
        assert fusedformer.get_backend() == "reference"
    assert fusedformer.get_backend() == "auto"


def test_set_backend_then_auto():
    fusedformer.set_backend("reference")
    try:
        assert fusedformer.get_backend() == "reference"
    finally:
        fusedformer.set_backend("auto")
    assert fusedformer.get_backend() == "auto"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'cpu', 'cuda', 'triton'\), got 'fast'"):
        fusedformer.set_backend("fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedformer.layer_norm(torch.randn(2, 4), 4, backend="nope")


def test_backend_env_var(monkeypatch):
    with fusedformer.use_backend("auto"):
        pass
    token = dispatch._current.set(None)
    try:
        monkeypatch.setenv("FUSEDFORMER_BACKEND", "reference")
        assert fusedformer.get_backend() == "reference"
        monkeypatch.setenv("FUSEDFORMER_BACKEND", "warp-drive")
        with pytest.raises(ValueError, match="got 'warp-drive'"):
            fusedformer.get_backend()
    finally:
        dispatch._current.reset(token)


def test_info_reports_every_backend():
    info = fusedformer.info()
    assert set(info["backends"]) == {"reference", "cpu", "cuda", "triton"}
    assert info["backends"]["reference"] == {"available": True, "reason": "", "ops": ["attention", "softmax", "layer_norm", "ffn"]}
    for name, status in info["backends"].items():
        assert status["available"] or status["reason"], f"{name} unavailable without a reason"
    if not torch.cuda.is_available():
        assert not info["backends"]["cuda"]["available"]
    if info["backends"]["cuda"]["available"]:
        assert info["cuda_matmul"] in ("wgmma (sm_90a)", "mma.sync")
    else:
        assert info["cuda_matmul"] == "n/a: " + info["backends"]["cuda"]["reason"]
    if info["backends"]["cpu"]["available"]:
        unit, units = info["cpu_bf16"].split(" ", 1)
        assert unit in ("fma", "dpbf16", "amx") and units.startswith("(of fma") and units.endswith(f"{unit})")
    else:
        assert info["cpu_bf16"] == "n/a: " + info["backends"]["cpu"]["reason"]
    assert "reference" in fusedformer.available_backends()


def test_op_a_backend_lacks_is_a_clear_error(monkeypatch):
    """Ask a backend for an op it does not implement: the error names op and backend."""
    real = dispatch._status

    def without_ffn(name):
        ok, why, ops = real(name)
        return (ok, why, tuple(o for o in ops if o != "ffn")) if name == "cpu" else (ok, why, ops)

    monkeypatch.setattr(dispatch, "_status", without_ffn)
    if not real("cpu")[0]:
        pytest.skip("cpu backend unavailable")
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="ffn: backend 'cpu' does not implement this op"):
        fusedformer.ffn(x, torch.randn(16, 8), None, torch.randn(8, 16), None, backend="cpu")


def test_auto_falls_back_with_one_warning(monkeypatch):
    real = dispatch._status
    monkeypatch.setattr(dispatch, "_status",
                        lambda name: (False, "pretend missing", ()) if name == "cpu" else real(name))
    dispatch._warn_fallback.cache_clear()
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="backend 'cpu' skipped \\(pretend missing\\); using 'reference'"):
        fusedformer.layer_norm(x, 8)
    assert dispatch.resolve("layer_norm", x.device) == "reference"


def test_wrong_device_for_backend_is_a_clear_error():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="backend 'cuda' is not available|backend 'cuda' cannot run here"):
        fusedformer.layer_norm(x, 8, backend="cuda")


def test_import_and_reference_backend_without_the_extension():
    """With fusedformer._C unloadable the package imports, says why, and reference works."""
    code = (
        "import sys, torch\n"
        "sys.modules['fusedformer._C'] = None\n"  # makes `import fusedformer._C` raise ImportError
        "import fusedformer\n"
        "st = fusedformer.info()['backends']\n"
        "assert not st['cpu']['available'] and 'did not load' in st['cpu']['reason'], st['cpu']\n"
        "assert fusedformer.available_backends()[0] == 'reference'\n"
        "y = fusedformer.layer_norm(torch.randn(3, 5), 5)\n"
        "assert torch.allclose(y.mean(-1), torch.zeros(3), atol=1e-6)\n"
        "try:\n"
        "    fusedformer.layer_norm(torch.randn(3, 5), 5, backend='cpu')\n"
        "except ValueError as e:\n"
        "    assert \"backend 'cpu' is not available\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_repository_kernels_folder_as_top_level_module_is_inert():
    """From the repository root, `import kernels` finds the kernels/ folder (transformers does
    exactly this, probing for Hugging Face's `kernels`). It must not re-register the
    fusedformer:: ops: torch would free the live registration (use-after-free, seen with ASan)."""
    code = ("import sys, torch, fusedformer\n"
            "x = torch.randn(4, 8)\n"
            "y0 = fusedformer.layer_norm(x, 8, backend='cpu')\n"
            "import kernels\n"
            "assert kernels.__file__.endswith('kernels/__init__.py') and 'kernels.ops' not in sys.modules\n"
            "assert not hasattr(kernels, 'layer_norm')\n"
            "try:\n"
            "    import kernels.ops\n"
            "except ImportError as e:\n"
            "    assert 'must be imported as fusedformer.kernels.ops' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('kernels.ops imported under a second name')\n"
            "assert torch.equal(fusedformer.layer_norm(x, 8, backend='cpu'), y0)\n"
            "print('ok')\n")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_nothing_heavy_at_import():
    """The extension and the Triton kernel modules load on first use. (triton itself may be
    imported by torch._dynamo, which torch.compiler.assume_constant_result pulls in.)"""
    code = ("import sys, fusedformer\n"
            "loaded = [m for m in ('fusedformer._C', 'fusedformer.kernels.attention',\n"
            "          'fusedformer.kernels.softmax', 'fusedformer.kernels.layer_norm',\n"
            "          'fusedformer.kernels.ffn', 'fusedformer.kernels.triton_backend') if m in sys.modules]\n"
            "assert not loaded, f'loaded at import time: {loaded}'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_cli_info_and_check(capsys):
    from fusedformer.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "available" in out
    assert main(["check", "--op", "layer_norm", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm  reference  float32" in out and "all checks passed" in out
    if "cpu" in fusedformer.available_backends():
        assert "layer_norm  cpu        float32" in out


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fusedformer", "info"], capture_output=True, text=True)
    assert out.returncode == 0 and "backend" in out.stdout, out.stderr


def test_cli_check_runs_triton_interpreted_without_the_env_var():
    """`fusedformer check` on a CPU-only machine re-runs itself with TRITON_INTERPRET=1."""
    if torch.cuda.is_available():
        pytest.skip("the re-run is for machines without a GPU")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fusedformer", "check", "--backend", "triton",
                          "--op", "layer_norm", "--dtype", "float32"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "layer_norm  triton     float32" in out.stdout and "all checks passed" in out.stdout


def _fused_op_cases() -> dict:
    """Per op: (the _FusedOp, its arguments for the cpu backend on small random inputs)."""
    from fusedformer.kernels import ops

    cpu = dispatch.BACKENDS.index("cpu")
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, requires_grad=True)  # noqa: E731
    keep = torch.rand(2, 1, 1, 9, generator=g) > 0.3
    return {
        "layer_norm": (ops._layer_norm_fwd, (r(5, 12), r(5, 12), r(12), r(12), 1e-5, cpu)),
        "attention": (ops._attention_fwd, (r(2, 4, 7, 16), r(2, 2, 9, 16), r(2, 2, 9, 16), keep,
                                           0.25, False, 0.0, None, cpu)),
        "softmax": (ops._softmax_fwd, (r(2, 3, 7, 9), keep, 0.5, True, cpu)),
        "ffn": (ops._ffn_fwd, (r(6, 8), r(32, 8), r(32), r(8, 16), r(8), 3, 0.0, None, cpu, True)),
    }


@pytest.mark.parametrize("name", ["layer_norm", "attention", "softmax", "ffn"])
def test_eager_path_matches_the_custom_op(name):
    """Eager calls skip torch.library's dispatch (ops._FusedOp); torch.compile gets the custom
    op. Both must give the same outputs and gradients, bit for bit, and the custom op's
    registration (schema, fake, autograd) must pass torch.library.opcheck."""
    if "cpu" not in dispatch.available_backends():
        pytest.skip("the cpu backend is not built")
    op, args = _fused_op_cases()[name]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    results = []
    for call in (op, op.op):
        out = call(*args)
        y = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        results.append((y.detach(), grads))
    (y_eager, g_eager), (y_op, g_op) = results
    assert torch.equal(y_eager, y_op)
    for a, b in zip(g_eager, g_op):
        assert torch.equal(a, b)
    torch.library.opcheck(op.op, args)


def test_fake_tensors_take_the_custom_op():
    """A FakeTensor (torch.compile's and torch.export's tracing) must reach the custom op and
    its fake implementation, never the launcher."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if "cpu" not in dispatch.available_backends():
        pytest.skip("the cpu backend is not built")
    op, args = _fused_op_cases()["layer_norm"]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y, h, mean, rstd = op(*fake)
    assert type(y).__name__ == "FakeTensor" and y.shape == (5, 12) and mean.dtype == torch.float32
