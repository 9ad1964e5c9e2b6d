"""fusedformer.patch: swapping the modules of a model built from torch.nn for fused ones (same
outputs and gradients, shared weights, a report of what was and was not swapped, unpatch), and
routing F.scaled_dot_product_attention through fusedformer (patch_sdpa / sdpa_patched)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOOR, assert_close
from torch import nn

import fusedformer.nn as fnn
from fusedformer.kernels import ops
from fusedformer.patch import PatchReport, patch, patch_sdpa, sdpa_patched, unpatch, unpatch_sdpa

BACKENDS = ["reference", "auto"]
# fp32 model vs the same model patched: a few layers of reordered fp32 math (measured max
# error ~1e-6 on outputs, ~5e-6 on gradients).
ATOL, RTOL = FLOOR[torch.float32], 1e-5
D = 16


class Tiny(nn.Module):
    """A small model from torch modules: an nn.Transformer, a standalone attention + norm (one
    LayerNorm shared by two names), and an encoder layer with a custom activation."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(D, 2, 1, 1, 32, dropout=0.1, batch_first=True)
        self.attn = nn.MultiheadAttention(D, 4, batch_first=True, kdim=12, vdim=12)
        self.norm = nn.LayerNorm(D)
        self.same_norm = self.norm
        self.custom = nn.TransformerEncoderLayer(D, 2, 32, activation=lambda t: t.tanh(), batch_first=True)

    def forward(self, src, tgt, mem):
        src_pad = torch.zeros(src.shape[:2], dtype=torch.bool)
        src_pad[0, -2:] = True
        y = self.transformer(src, tgt, src_key_padding_mask=src_pad,
                             tgt_mask=nn.Transformer.generate_square_subsequent_mask(tgt.shape[1]),
                             tgt_is_causal=True)
        a, w = self.attn(y, mem, mem)
        return self.custom(self.same_norm(self.norm(a) + y)), w


def _inputs():
    g = torch.Generator().manual_seed(1)
    src, tgt, mem = (2, 6, D), (2, 5, D), (2, 7, 12)  # mem: the attention's kdim = vdim = 12
    return tuple(torch.randn(shape, generator=g) for shape in (src, tgt, mem))


def _run(model, inputs):
    """Outputs and every parameter's gradient (by name) of a fixed loss."""
    model.zero_grad(set_to_none=True)
    out, w = model(*inputs)
    (out.square().sum() + w.sum()).backward()
    result = {"out": out.detach(), "weights": w.detach()}
    result.update({f"d_{n}": p.grad for n, p in model.named_parameters()})
    return result


def _assert_same(got, expected):
    assert got.keys() == expected.keys()
    for name in got:
        assert_close(name, got[name], expected[name], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_same_outputs_and_unpatch_restores(backend):
    torch.manual_seed(0)
    model = Tiny().eval()
    inputs = _inputs()
    expected = _run(model, inputs)
    params = {n: id(p) for n, p in model.named_parameters()}

    report = patch(model, backend=backend)
    assert isinstance(report, PatchReport) and report.backend == backend
    assert set(report.swapped) == {
        "transformer.encoder.layers.0", "transformer.encoder.norm", "transformer.decoder.layers.0",
        "transformer.decoder.norm", "attn", "norm", "same_norm", "custom.self_attn", "custom.norm1",
        "custom.norm2"}
    assert list(report.not_swapped) == ["custom"]
    assert "has no fused kernel" in report.not_swapped["custom"]
    assert isinstance(model.transformer.encoder.layers[0], fnn.TransformerEncoderLayer)
    assert isinstance(model.transformer.decoder.layers[0], fnn.TransformerDecoderLayer)
    assert isinstance(model.custom, nn.TransformerEncoderLayer)
    assert isinstance(model.custom.self_attn, fnn.MultiheadAttention)
    assert model.norm is model.same_norm and isinstance(model.norm, fnn.LayerNorm)
    assert model.transformer.decoder.layers[0].self_attn.backend == backend
    assert {n: id(p) for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert not any(m.training for m in model.modules())
    assert "fusedformer.nn.TransformerEncoderLayer" in str(report)
    _assert_same(_run(model, inputs), expected)

    undone = unpatch(model)
    assert undone == [report]
    assert type(model.transformer.encoder.layers[0]) is nn.TransformerEncoderLayer
    assert type(model.custom.self_attn) is nn.MultiheadAttention and type(model.norm) is nn.LayerNorm
    assert model.norm is model.same_norm
    assert {n: id(p) for n, p in model.named_parameters()} == params
    _assert_same(_run(model, inputs), expected)
    assert unpatch(model) == []


def test_patched_training_keeps_optimizer_and_mode():
    """An optimizer built before patch() trains the patched model; unpatch keeps the trained
    values; training flags (including a submodule's own) carry over."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(D, 2, 32, dropout=0.0), nn.LayerNorm(D))
    model[0].dropout1.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    patch(model)
    assert model.training and model[0].training and not model[0].dropout1.training
    before = model[1].weight.detach().clone()
    model(torch.randn(5, 3, D)).square().sum().backward()
    opt.step()
    assert not torch.equal(model[1].weight, before)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    unpatch(model)
    assert type(model[1]) is nn.LayerNorm and not model[0].dropout1.training
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_encoder_nested_tensor_path_is_turned_off():
    """nn.TransformerEncoder would hand nested tensors to its layers in eval + no_grad with a
    padding mask; patch turns that path off (real tokens unchanged) and unpatch restores it."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, 32, batch_first=True), 2).eval()
    assert encoder.use_nested_tensor
    x = torch.randn(3, 5, D)
    pad = torch.arange(5)[None, :] >= torch.tensor([4, 5, 3])[:, None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: nested tensors are a prototype
        expected = encoder(x, src_key_padding_mask=pad)
        report = patch(encoder)
        assert not encoder.use_nested_tensor and report.notes
        got = encoder(x, src_key_padding_mask=pad)
    real = ~pad
    assert_close("real tokens", got[real], expected[real], atol=ATOL)
    unpatch(encoder)
    assert encoder.use_nested_tensor


def test_not_swapped_is_reported():
    class MyNorm(nn.LayerNorm):
        pass

    root = nn.MultiheadAttention(D, 2)
    report = patch(root)
    assert "root module cannot be replaced" in report.not_swapped[""]
    assert "from_torch" in report.not_swapped[""]
    assert set(report.swapped) == set()  # out_proj is a Linear: nothing inside to swap

    model = nn.Sequential(MyNorm(D), nn.Linear(D, D))
    report = patch(model)
    assert "subclasses torch.nn.LayerNorm" in report.not_swapped["0"] and not report.swapped
    assert type(model[0]) is MyNorm


def test_patch_twice_and_bad_arguments():
    model = nn.Sequential(nn.LayerNorm(D))
    first = patch(model)
    second = patch(model)
    assert first.swapped and not second.swapped
    assert unpatch(model) == [first]
    assert type(model[0]) is nn.LayerNorm
    with pytest.raises(ValueError, match="backend must be one of"):
        patch(model, backend="gpu")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch(lambda x: x)


def test_from_torch_errors_on_mismatched_parts():
    layer = nn.TransformerEncoderLayer(D, 2, 32)
    layer.linear2 = nn.Linear(32, D, bias=False)  # bias-less, unlike the rest
    with pytest.raises(ValueError, match="missing"):
        fnn.TransformerEncoderLayer.from_torch(layer)
    report = patch(nn.Sequential(layer))
    assert "0" in report.not_swapped and "0.self_attn" in report.swapped


# ----------------------------------------------------------------------------------------
# F.scaled_dot_product_attention


@pytest.fixture
def spies(monkeypatch):
    """Count calls of fusedformer's attention and of torch's SDPA as patch_sdpa sees it."""
    calls = {"fused": 0, "torch": 0}
    fused, original = ops.attention, F.scaled_dot_product_attention

    def fused_spy(*args, **kwargs):
        calls["fused"] += 1
        return fused(*args, **kwargs)

    def torch_spy(*args, **kwargs):
        calls["torch"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "attention", fused_spy)
    monkeypatch.setattr(F, "scaled_dot_product_attention", torch_spy)
    yield calls
    unpatch_sdpa()


@pytest.mark.parametrize("backend", [None, "reference", "auto"])
def test_patch_sdpa_routes_and_unpatch_restores(spies, backend):
    torch_sdpa = F.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(6, 6, generator=g) > 0.3
    mask[:, 0] = True
    expected = torch_sdpa(q, k, v, mask)
    spies["torch"] = 0

    patch_sdpa(backend)
    assert F.scaled_dot_product_attention is not torch_sdpa
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert spies == {"fused": 1, "torch": 0}
    assert_close("sdpa", got, expected, atol=ATOL)
    dq = torch.autograd.grad(got.sum(), q)[0]
    assert_close("sdpa dq", dq, torch.autograd.grad(expected.sum(), q)[0], atol=ATOL)

    # torch's own nn.MultiheadAttention looks the function up at call time: routed too
    # (in training mode: eval + no_grad would take torch's native fast path instead)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 5, 32)
    routed = mha(x, x, x, need_weights=False)[0]
    assert spies["fused"] == 2
    unpatch_sdpa()
    assert F.scaled_dot_product_attention is torch_sdpa
    assert_close("mha", routed, mha(x, x, x, need_weights=False)[0], atol=ATOL)
    assert spies["fused"] == 2


def test_patch_sdpa_falls_back_with_one_warning(spies):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64)
    patch_sdpa("cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            F.scaled_dot_product_attention(q, q, q)
    assert spies == {"fused": 0, "torch": 3}
    assert len(caught) == 1 and "dtype torch.float64 on backend 'cpu'" in str(caught[0].message)
    # attn_mask with is_causal (documented by torch as an error): whatever torch does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = q.float()
        F.scaled_dot_product_attention(f, f, f, torch.ones(3, 3, dtype=torch.bool), is_causal=True)
    assert spies == {"fused": 0, "torch": 4}
    # supported input on the same patch: fused
    F.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
    assert spies["fused"] == 1


def test_sdpa_patched_context_manager(spies):
    torch_sdpa = F.scaled_dot_product_attention
    q = torch.randn(1, 2, 3, 8)
    with sdpa_patched("reference"):
        outer = F.scaled_dot_product_attention
        with sdpa_patched("auto"):
            F.scaled_dot_product_attention(q, q, q)
        assert F.scaled_dot_product_attention is outer
        F.scaled_dot_product_attention(q, q, q)
    assert F.scaled_dot_product_attention is torch_sdpa
    assert spies == {"fused": 2, "torch": 0}
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_sdpa("fast")
