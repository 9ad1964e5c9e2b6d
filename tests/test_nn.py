"""fusedformer.nn vs torch.nn: MultiheadAttention, LayerNorm, FeedForward and the Transformer
layers with copied state_dicts, forward and every gradient, in eval mode (dropout off), fp32,
on the `reference` backend and on `auto` (the fused CPU kernels); the argument space is drawn
by hypothesis. Also: same init, state_dicts both ways, padding, and bad inputs."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOOR, assert_close
from torch import nn

import fusedformer
import fusedformer.nn as fnn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BACKENDS = ["reference", "auto"]
# fp32 module vs torch module: the same math in another order; measured max errors are ~5e-7
# on outputs and ~2e-6 on gradients, so FLOOR[fp32] plus a relative term for O(10) gradients.
ATOL, RTOL = FLOOR[torch.float32], 1e-5
SETTINGS = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# The layer cases cost ~4x an attention case (two attentions, an FFN, three norms, both ways).
LAYER_SETTINGS = settings(SETTINGS, max_examples=15)
E, KDIM, VDIM = 16, 12, 10


def _forward_backward(module, args, kwargs, seed=0):
    """Run module(*args, **kwargs) and backprop a fixed random cotangent through every floating
    output. Returns {name: tensor} with the outputs, the grads of the args and of the params."""
    leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for a in args]
    # keep identity between args (self-attention passes one tensor three times)
    for i, a in enumerate(args):
        for j in range(i):
            if a is args[j]:
                leaves[i] = leaves[j]
    module.zero_grad(set_to_none=True)
    out = module(*leaves, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    result = {}
    for i, o in enumerate(outs):
        if o is None:
            result[f"out{i}"] = None
            continue
        result[f"out{i}"] = o.detach()
        loss = loss + (o * torch.randn(o.shape, generator=g)).sum()
    loss.backward()
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            result[f"d_arg{i}"] = leaf.grad
    for name, p in module.named_parameters():
        result[f"d_{name}"] = p.grad
    return result


def _assert_same(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        if theirs[name] is None:
            assert ours[name] is None, f"{name}: expected None"
            continue
        assert ours[name] is not None, f"{name}: missing"
        assert_close(name, ours[name], theirs[name], atol=ATOL, rtol=RTOL)


def _twin(torch_module, fused_module):
    """Load torch's weights into the fused module (strict) and put both in eval mode."""
    fused_module.load_state_dict(torch_module.state_dict())
    return torch_module.eval(), fused_module.eval()


# ----------------------------------------------------------------------------------------
# Masks as torch takes them (True = NOT allowed / ignore); key 0 is always allowed, so no
# query has every key masked (torch gives NaN there, fusedformer zeros).


def _bool_mask(shape, g):
    m = torch.rand(shape, generator=g) < 0.3
    m[..., 0] = False
    return m


def _float_mask(shape, g):
    m = torch.randn(shape, generator=g)
    m = m.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf"))
    m[..., 0] = 0.0
    return m


@st.composite
def mha_cases(draw):
    kv = draw(st.sampled_from(["same", "kdim", "kdim_vdim"]))
    self_attention = kv == "same" and draw(st.booleans())
    length = draw(st.integers(1, 6))
    return {
        "heads": draw(st.sampled_from([1, 2, 4])),
        "kv": kv,
        "self_attention": self_attention,
        "value_is_key": draw(st.booleans()),
        "batched": draw(st.sampled_from([True, True, True, False])),
        "batch_first": draw(st.booleans()),
        "B": draw(st.integers(1, 3)),
        "L": length,
        "S": length if self_attention else draw(st.integers(1, 6)),
        "bias": draw(st.booleans()),
        "add_bias_kv": draw(st.booleans()),
        "add_zero_attn": draw(st.booleans()),
        "key_padding_mask": draw(st.sampled_from([None, "bool", "float"])),
        "attn_mask": draw(st.sampled_from([None, "bool2", "float2", "bool3", "float3", "causal"])),
        "need_weights": draw(st.booleans()),
        "average_attn_weights": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _mha_inputs(case):
    """(args, kwargs) for MultiheadAttention.forward, from a drawn case."""
    g = torch.Generator().manual_seed(case["seed"])
    b, l, s, h = case["B"], case["L"], case["S"], case["heads"]
    kdim = KDIM if case["kv"] != "same" else E
    vdim = VDIM if case["kv"] == "kdim_vdim" else kdim

    def seq(n, width):
        if not case["batched"]:
            return torch.randn(n, width, generator=g)
        return torch.randn((b, n, width) if case["batch_first"] else (n, b, width), generator=g)

    query = seq(l, E)
    if case["self_attention"]:
        key = value = query
    else:
        key = seq(s, kdim)
        value = key if case["kv"] != "kdim_vdim" and case["value_is_key"] else seq(s, vdim)
    kwargs = {"need_weights": case["need_weights"], "average_attn_weights": case["average_attn_weights"]}
    batch = (b,) if case["batched"] else ()
    if case["key_padding_mask"] == "bool":
        kwargs["key_padding_mask"] = _bool_mask(batch + (s,), g)
    elif case["key_padding_mask"] == "float":
        kwargs["key_padding_mask"] = _float_mask(batch + (s,), g)
    kind = case["attn_mask"]
    heads = (b * h,) if case["batched"] else (h,)
    if kind == "causal":
        kwargs["attn_mask"] = ~torch.ones(l, s, dtype=torch.bool).tril()
        kwargs["is_causal"] = True
    elif kind is not None:
        shape = (l, s) if kind.endswith("2") else heads + (l, s)
        kwargs["attn_mask"] = _bool_mask(shape, g) if kind.startswith("bool") else _float_mask(shape, g)
    return [query, key, value], kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=mha_cases())
def test_multihead_attention_matches_torch(backend, case):
    kdim = KDIM if case["kv"] != "same" else None
    vdim = VDIM if case["kv"] == "kdim_vdim" else kdim
    ctor = dict(embed_dim=E, num_heads=case["heads"], bias=case["bias"], add_bias_kv=case["add_bias_kv"],
                add_zero_attn=case["add_zero_attn"], kdim=kdim, vdim=vdim, batch_first=case["batch_first"])
    torch.manual_seed(case["seed"])
    theirs = nn.MultiheadAttention(**ctor)
    ours = fnn.MultiheadAttention(**ctor, backend=backend)
    theirs, ours = _twin(theirs, ours)
    args, kwargs = _mha_inputs(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: mismatched key_padding_mask / attn_mask types
        expected = _forward_backward(theirs, args, kwargs)
    got = _forward_backward(ours, args, kwargs)
    assert (got["out1"] is None) == (not case["need_weights"])
    _assert_same(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_without_mask_means_causal(backend, need_weights):
    """torch needs the mask with the hint; fusedformer applies the causal mask on its own."""
    torch.manual_seed(0)
    theirs, ours = _twin(nn.MultiheadAttention(E, 4, batch_first=True),
                         fnn.MultiheadAttention(E, 4, batch_first=True, backend=backend))
    x = torch.randn(2, 7, E)
    mask = ~torch.ones(7, 7, dtype=torch.bool).tril()
    expected = _forward_backward(theirs, [x, x, x], {"attn_mask": mask, "is_causal": True,
                                                     "need_weights": need_weights})
    _assert_same(_forward_backward(ours, [x, x, x], {"is_causal": True, "need_weights": need_weights}),
                 expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_real_tokens_equal_each_sequence_alone(backend):
    """Lengths 4, 5, 3 padded to 5: every real token's output equals the sequence run alone,
    for attention and for a whole encoder layer, both layouts of the key padding mask."""
    torch.manual_seed(0)
    lengths = [4, 5, 3]
    seqs = [torch.randn(n, E) for n in lengths]
    x = torch.zeros(3, 5, E)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = s
    pad = torch.arange(5)[None, :] >= torch.tensor(lengths)[:, None]  # (B, S), True = padding
    float_pad = torch.zeros(3, 5).masked_fill(pad, float("-inf"))
    mha = fnn.MultiheadAttention(E, 4, batch_first=True, backend=backend).eval()
    layer = fnn.TransformerEncoderLayer(E, 4, 32, batch_first=True, backend=backend).eval()
    for kpm in (pad, float_pad):
        out, _ = mha(x, x, x, key_padding_mask=kpm, need_weights=False)
        enc = layer(x, src_key_padding_mask=kpm)
        for i, s in enumerate(seqs):
            n = len(s)
            assert_close(f"mha seq {i}", out[i, :n], mha(s, s, s, need_weights=False)[0], atol=ATOL)
            assert_close(f"encoder seq {i}", enc[i, :n], layer(s), atol=ATOL)


def test_one_merged_mask_of_the_smallest_shape(monkeypatch):
    """Key padding reaches the kernel as (B, 1, 1, S), with a 2-D attn_mask as (B, 1, L, S);
    only a 3-D attn_mask gives (B, H, L, S)."""
    from fusedformer.kernels import ops

    shapes = []
    attention = ops.attention

    def spy(q, k, v, mask, *args, **kwargs):
        shapes.append((tuple(mask.shape), mask.dtype))
        return attention(q, k, v, mask, *args, **kwargs)

    monkeypatch.setattr(ops, "attention", spy)
    mha = fnn.MultiheadAttention(E, 4, batch_first=True)
    x = torch.randn(3, 5, E)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    for kwargs in ({"key_padding_mask": pad}, {"key_padding_mask": pad, "attn_mask": torch.zeros(5, 5)},
                   {"key_padding_mask": pad, "attn_mask": torch.zeros(12, 5, 5, dtype=torch.bool)}):
        mha(x, x, x, need_weights=False, **kwargs)
    assert shapes == [((3, 1, 1, 5), torch.bool), ((3, 1, 5, 5), torch.float32), ((3, 4, 5, 5), torch.bool)]


def test_same_init_as_torch():
    """Parameters are created and initialized in torch's order: same seed, same weights."""
    for ctor in (dict(embed_dim=E, num_heads=2),
                 dict(embed_dim=E, num_heads=4, add_bias_kv=True, kdim=KDIM, vdim=VDIM)):
        torch.manual_seed(3)
        theirs = nn.MultiheadAttention(**ctor).state_dict()
        torch.manual_seed(3)
        ours = fnn.MultiheadAttention(**ctor).state_dict()
        assert list(ours) == list(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for cls, fcls in ((nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer),
                      (nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer)):
        torch.manual_seed(4)
        theirs = cls(E, 2, 24).state_dict()
        torch.manual_seed(4)
        ours = fcls(E, 2, 24).state_dict()
        assert list(ours) == list(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("ctor", [dict(), dict(bias=False), dict(add_bias_kv=True),
                                  dict(kdim=KDIM, vdim=VDIM)],
                         ids=["default", "no_bias", "bias_kv", "kdim_vdim"])
def test_state_dict_loads_both_ways(ctor):
    theirs, ours = nn.MultiheadAttention(E, 2, **ctor), fnn.MultiheadAttention(E, 2, **ctor)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    fresh = nn.MultiheadAttention(E, 2, **ctor)
    fresh.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), theirs.state_dict().values()))


def test_state_dict_missing_and_extra_keys_like_torch():
    """strict=True raises on missing / unexpected keys, strict=False reports them, as torch."""
    state = nn.MultiheadAttention(E, 2).state_dict()
    del state["out_proj.bias"]
    state["bias_k"] = torch.zeros(1, 1, E)
    for module in (nn.MultiheadAttention(E, 2), fnn.MultiheadAttention(E, 2)):
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"out_proj.bias\""):
            module.load_state_dict(state)
        result = module.load_state_dict(state, strict=False)
        assert result.missing_keys == ["out_proj.bias"] and result.unexpected_keys == ["bias_k"]
    state = nn.LayerNorm(8).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        fnn.LayerNorm(9).load_state_dict(state)


# ----------------------------------------------------------------------------------------
# LayerNorm and FeedForward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,normalized", [((2, 7, 16), 16), ((3, 5, 6, 7), (6, 7)), ((1, 1), 1)], ids=str)
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_layer_norm_matches_torch(backend, shape, normalized, affine):
    kw = dict(eps=1e-4, elementwise_affine=affine != "none", bias=affine == "both")
    theirs, ours = nn.LayerNorm(normalized, **kw), fnn.LayerNorm(normalized, **kw, backend=backend)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    theirs, ours = _twin(theirs, ours)
    x = torch.randn(shape)
    _assert_same(_forward_backward(ours, [x], {}), _forward_backward(theirs, [x], {}))
    assert repr(ours).replace("fusedformer.nn.", "") == repr(theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_residual(backend):
    """forward(x, residual) = (LN(x + residual), x + residual), gradients into both."""
    theirs, ours = _twin(nn.LayerNorm(24), fnn.LayerNorm(24, backend=backend))
    x, r = torch.randn(3, 4, 24), torch.randn(3, 4, 24)

    class Unfused(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, x, residual):
            return self.norm(x + residual), x + residual

    class Fused(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.norm = norm

        def forward(self, x, residual):
            return self.norm(x, residual)

    _assert_same(_forward_backward(Fused(ours), [x, r], {}), _forward_backward(Unfused(theirs), [x, r], {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward(backend, activation, bias):
    torch.manual_seed(0)
    ours = fnn.FeedForward(E, 20, activation, bias=bias, backend=backend).eval()
    assert ours.fc1.weight.shape == ((40 if activation == "swiglu" else 20), E)

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(E, ours.fc1.out_features, bias=bias), nn.Linear(20, E, bias=bias)

        def forward(self, x):
            a = self.fc1(x)
            if activation == "swiglu":
                gate, up = a.chunk(2, dim=-1)
                return self.fc2(F.silu(gate) * up)
            act = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
            return self.fc2(act[activation](a))

    plain = Plain()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, E)
    _assert_same(_forward_backward(ours, [x], {}), _forward_backward(plain, [x], {}))


# ----------------------------------------------------------------------------------------
# Transformer layers


@st.composite
def layer_cases(draw):
    return {
        "decoder": draw(st.booleans()),
        "norm_first": draw(st.booleans()),
        "activation": draw(st.sampled_from(["relu", "gelu", "F.relu", "F.gelu", "nn.GELU"])),
        "batch_first": draw(st.booleans()),
        "batched": draw(st.sampled_from([True, True, False])),
        "bias": draw(st.booleans()),
        "mask": draw(st.sampled_from([None, "bool", "float", "causal"])),
        "key_padding_mask": draw(st.sampled_from([None, "bool", "float"])),
        "memory_mask": draw(st.sampled_from([None, "bool", "float"])),
        "B": draw(st.integers(1, 3)),
        "T": draw(st.integers(1, 6)),
        "S": draw(st.integers(1, 6)),
        "seed": draw(st.integers(0, 2**16)),
    }


_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "F.relu": F.relu, "F.gelu": F.gelu, "nn.GELU": nn.GELU()}


@pytest.mark.parametrize("backend", BACKENDS)
@LAYER_SETTINGS
@given(case=layer_cases())
def test_transformer_layers_match_torch(backend, case):
    ctor = dict(d_model=E, nhead=4, dim_feedforward=24, dropout=0.1,
                activation=_ACTIVATIONS[case["activation"]],
                layer_norm_eps=1e-4, batch_first=case["batch_first"], norm_first=case["norm_first"],
                bias=case["bias"])
    torch.manual_seed(case["seed"])
    name = "TransformerDecoderLayer" if case["decoder"] else "TransformerEncoderLayer"
    theirs, ours = getattr(nn, name)(**ctor), getattr(fnn, name)(**ctor, backend=backend)
    theirs, ours = _twin(theirs, ours)
    g = torch.Generator().manual_seed(case["seed"])
    b, t, s = case["B"], case["T"], case["S"]

    def seq(n):
        if not case["batched"]:
            return torch.randn(n, E, generator=g)
        return torch.randn((b, n, E) if case["batch_first"] else (n, b, E), generator=g)

    batch = (b,) if case["batched"] else ()
    x = seq(t)
    kwargs = {}
    prefix = "tgt" if case["decoder"] else "src"
    if case["mask"] == "causal":
        kwargs[f"{prefix}_mask"] = nn.Transformer.generate_square_subsequent_mask(t)
        kwargs["tgt_is_causal" if case["decoder"] else "is_causal"] = True
    elif case["mask"] is not None:
        kwargs[f"{prefix}_mask"] = (_bool_mask if case["mask"] == "bool" else _float_mask)((t, t), g)
    if case["key_padding_mask"] is not None:
        make = _bool_mask if case["key_padding_mask"] == "bool" else _float_mask
        kwargs[f"{prefix}_key_padding_mask"] = make(batch + (t,), g)
    args = [x]
    if case["decoder"]:
        args.append(seq(s))
        if case["memory_mask"] is not None:
            kwargs["memory_mask"] = (_bool_mask if case["memory_mask"] == "bool" else _float_mask)((t, s), g)
            kwargs["memory_key_padding_mask"] = _bool_mask(batch + (s,), g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: mismatched mask types
        expected = _forward_backward(theirs, args, kwargs)
    _assert_same(_forward_backward(ours, args, kwargs), expected)


def test_layers_same_submodules_and_state_dict_both_ways():
    for cls, fcls in ((nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer),
                      (nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer)):
        theirs, ours = cls(E, 2, 24, bias=False), fcls(E, 2, 24, bias=False)
        assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())


def test_training_mode_dropout_and_eval():
    """Dropout is live in training (in the FFN through ffn's dropout_p) and off in eval."""
    torch.manual_seed(0)
    layer = fnn.TransformerEncoderLayer(E, 2, 32, dropout=0.5, batch_first=True)
    x = torch.randn(2, 6, E)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    mha = fnn.MultiheadAttention(E, 2, dropout=0.5)
    w1, w2 = mha(x, x, x)[1], mha(x, x, x)[1]
    assert not torch.equal(w1, w2)


def test_float64_auto_runs_reference():
    """The compiled kernels take fp16/bf16/fp32: float64 under auto goes to reference."""
    torch.manual_seed(0)
    theirs, ours = _twin(nn.TransformerEncoderLayer(E, 2, 32).double(),
                         fnn.TransformerEncoderLayer(E, 2, 32).double())
    x = torch.randn(4, 2, E, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close("float64", ours(x), theirs(x), atol=1e-12)


def test_backend_is_per_call():
    """The module's backend holds whatever backend is in force around the call."""
    ours = fnn.LayerNorm(8, dtype=torch.float64, backend="reference")
    with fusedformer.use_backend("cpu"):
        ours(torch.randn(2, 8, dtype=torch.float64))  # would be a TypeError on 'cpu'


def test_torch_compile_fullgraph():
    """The per-module backend reaches the ops as a per-call argument: no graph break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = fnn.TransformerDecoderLayer(E, 2, 32, batch_first=True, backend="auto").eval()
    x, memory = torch.randn(2, 5, E, requires_grad=True), torch.randn(2, 7, E)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    kwargs = {"memory_key_padding_mask": pad, "tgt_is_causal": True}
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x, memory, **kwargs)
    (dx,) = torch.autograd.grad(out.square().sum(), x)
    expected = layer(x, memory, **kwargs)
    assert_close("compiled", out, expected, atol=ATOL)
    assert_close("compiled dx", dx, torch.autograd.grad(expected.square().sum(), x)[0], atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("call,exc,match", [
    (lambda m, x: m(x[0, 0], x[0, 0], x[0, 0]), ValueError, "query must be 3-D"),
    (lambda m, x: m(x, x[0], x[0]), ValueError, "key and value must be 3-D like query"),
    (lambda m, x: m(x[..., :8], x, x), ValueError, "query must have 16 features"),
    (lambda m, x: m(x, x, x[:, :2]), ValueError, "key and value must agree"),
    (lambda m, x: m(x, x[:, :2], x[:, :2]), ValueError, "same batch size"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(5, 3, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(3, 5\)"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 4, dtype=torch.bool)), ValueError,
     r"attn_mask must have shape \(5, 5\) \(L, S\) or \(6, 5, 5\)"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool)), ValueError,
     "attn_mask must have shape"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64)), TypeError,
     "attn_mask must be bool .* an integer mask is ambiguous"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(3, 5, dtype=torch.uint8)), TypeError,
     "key_padding_mask must be bool"),
    (lambda m, x: m(x.long(), x, x), TypeError, "query must be a floating tensor"),
    (lambda m, x: m(x, x, x, attn_mask=[[True]]), TypeError, "attn_mask must be a torch.Tensor or None"),
    (lambda m, x: m(x.tolist(), x, x), TypeError, "query must be a torch.Tensor"),
])
def test_multihead_attention_bad_input(call, exc, match):
    m = fnn.MultiheadAttention(E, 2)  # seq-first: (L, B, E) = (5, 3, 16)
    with pytest.raises(exc, match=match):
        call(m, torch.randn(5, 3, E))


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"embed_dim \(16\) must be divisible by num_heads \(3\)"):
        fnn.MultiheadAttention(16, 3)
    with pytest.raises(ValueError, match="must be greater than 0"):
        fnn.MultiheadAttention(0, 2)
    with pytest.raises(TypeError, match="has no fused kernel"):
        fnn.TransformerEncoderLayer(E, 2, activation=lambda t: t.tanh())
    with pytest.raises(ValueError, match="activation should be one of"):
        fnn.TransformerDecoderLayer(E, 2, activation="swish")
    with pytest.raises(ValueError, match="activation must be"):
        fnn.FeedForward(E, 8, activation="tanh")
    layer = fnn.TransformerEncoderLayer(E, 2, activation=nn.GELU(approximate="tanh"))
    assert layer.activation_name == "gelu_tanh"


def test_layer_norm_bad_input():
    with pytest.raises(ValueError, match="must match the trailing dims"):
        fnn.LayerNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="residual must have shape"):
        fnn.LayerNorm(8)(torch.randn(2, 8), torch.randn(3, 8))
