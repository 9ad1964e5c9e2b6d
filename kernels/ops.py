"""Autograd and torch.library registration of every op, and the public functions.

The layers of an op (STYLE.md):
    kernel -> launcher (one per backend: tensors in, tensors out, no autograd;
              kernels/cpp_backend.py for cpu/cuda, kernels/triton_backend.py for triton)
           -> custom ops `fusedformer::<op>_fwd` and `fusedformer::<op>_bwd`, which take the
              backend name, so one registration (with a fake implementation for
              torch.compile and the autograd formula) serves every backend; eager calls
              reach the same functions without torch.library's dispatch (_FusedOp)
           -> public function: validates, picks the backend (kernels/dispatch.py), reshapes.
The `reference` backend skips the custom ops: it is kernels/reference.py under PyTorch's own
autograd, computing in fp32 for fp16/bf16 inputs.

Launcher contract (every backend implements the same signatures, same saved tensors):
    layer_norm_fwd(x, residual, weight, bias, eps) -> (y, h, mean, rstd)
        x, residual: (M, N); weight, bias: (N,) or None; h: (M, N), or (0,) without residual;
        mean, rstd: (M,) float32
    layer_norm_bwd(dy, dh, h, weight, mean, rstd, need_dweight, need_dbias) -> (dx, dw, db)
        h: the normalized input (x, or x + residual); dh: grad flowing into h, or None;
        dw / db: (N,), or (0,) when not requested
    attention_fwd(q, k, v, mask, scale, is_causal, dropout_p, seed) -> (o, lse)
        q: (B, HQ, LQ, D); k, v: (B, HKV, LK, D), HQ % HKV == 0 (query head h reads kv head
        h // (HQ // HKV)); mask: None or 4-D (B|1, HQ|1, LQ|1, LK|1), bool (True = attend) or
        q.dtype (added to the scaled scores), broadcast by the kernel; is_causal: top-left;
        lse: (B, HQ, LQ) float32, -inf for a row with every key masked (its o row is 0)
    attention_bwd(do, q, k, v, o, lse, mask, scale, is_causal, dropout_p, seed) -> (dq, dk, dv)
    softmax_fwd(x, mask, scale, is_causal) -> y          x: (B, H, LQ, LK); mask as attention
    softmax_bwd(dy, y, scale) -> dx
    ffn_fwd(x, w1, b1, w2, b2, activation, dropout_p, seed, save_pre=True) -> (y, pre)
        x: (M, C); w1: (F1, C) with F1 = F (or 2F for swiglu); w2: (C, F); pre: (M, F1) the
        pre-activation, saved for backward; with save_pre False (no backward will run) pre is
        (0, F1) and the kernels do not store it
    ffn_bwd(dy, x, w1, b1, w2, b2, pre, activation, dropout_p, seed) -> (dx, dw1, db1, dw2, db2)
        db1 / db2: (0,) when the bias is None
Every output is a new contiguous tensor (the fake implementations promise exactly that to
torch.compile). Dropout: `seed` is an int; a backend must draw the same keep-mask in forward and backward for
the same seed, and expose it as <op>_dropout_mask(...) so tests can hand it to the oracle.
"""
from __future__ import annotations

if __name__ != "fusedformer.kernels.ops":
    raise ImportError(f"kernels/ops.py registers the fusedformer:: custom ops and must be imported as "
                      f"fusedformer.kernels.ops, not as {__name__!r} (see kernels/__init__.py)")

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import dispatch, reference
from . import validate as check

# ----------------------------------------------------------------------------------------
# Launchers


def launchers(backend: int | str) -> ModuleType:
    """The launcher module of a compiled backend, by name or index in dispatch.BACKENDS.

    The custom ops take the backend (and the FFN activation) as ints, not strings: seen with
    torch 2.13 CPU, a custom op call intermittently raised std::length_error inside torch's
    conversion of a str argument (gdb: torch::jit::_get_operation_for_overload_or_packet ->
    std::string construction), depending on which modules the process had imported."""
    name = backend if isinstance(backend, str) else dispatch.BACKENDS[backend]
    module = _LAUNCHERS.get(name)
    if module is not None:
        return module
    if name in ("cpu", "cuda"):
        from . import cpp_backend as module
    elif name == "triton":
        from . import triton_backend as module
    else:
        raise ValueError(f"backend '{name}' has no launchers (reference runs kernels/reference.py)")
    _LAUNCHERS[name] = module
    return module


_LAUNCHERS: dict[str, ModuleType] = {}  # imported on first use: triton is slow to import


def _backend_id(name: str) -> int:
    return dispatch.BACKENDS.index(name)


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def _new_seed(dropout_p: float) -> Optional[Tensor]:
    """A fresh dropout seed from torch's default generator (so torch.manual_seed governs it),
    as a tensor so that torch.compile traces it instead of baking in a constant."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (), dtype=torch.int64)


# ----------------------------------------------------------------------------------------
# Op registration


class _FusedOp:
    """One fusedformer:: op: a torch.library custom op (with its fake and its autograd) for
    torch.compile and torch.export, and a direct path for eager calls.

    Why two paths: torch.library's per-call Python machinery (argument normalization, its
    autograd wrapper, redispatch) measured ~20 us per LayerNorm forward with grad on the
    2-core dev machine, against 3.3 us for the launcher and 4.8 us for torch's own
    F.layer_norm; a model calls these ops a few times per layer. An eager call whose tensors
    are plain tensors goes to an autograd.Function built from the op's own setup_context and
    backward (or, with grad off, straight to the launcher); everything else (Dynamo tracing,
    FakeTensors, tensor subclasses) goes to the custom op. Both paths run the same function
    and save the same tensors, so they compute the same numbers."""

    def __init__(self, name: str, fn):
        self.name, self.impl = name, fn
        self.op = torch.library.custom_op(f"fusedformer::{name}", mutates_args=())(fn)
        self._function: Optional[type] = None

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_autograd(self, backward, *, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *inputs):
            ctx.set_materialize_grads(False)  # as the custom op: an unused output's grad is None
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        self._function = type(f"{self.name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if torch.compiler.is_compiling() or not all(
                type(a) in _PLAIN_TENSORS for a in args if isinstance(a, Tensor)):
            return self.op(*args)
        if self._function is None or not torch.is_grad_enabled():
            return self.impl(*args)
        return self._function.apply(*args)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _fused_op(name: str):
    return lambda fn: _FusedOp(name, fn)


# ----------------------------------------------------------------------------------------
# LayerNorm (+ residual)


@_fused_op("layer_norm_fwd")
def _layer_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                    bias: Optional[Tensor], eps: float, backend: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return launchers(backend).layer_norm_fwd(x, residual, weight, bias, eps)


@_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, backend):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape), h, stats, stats.new_empty(stats.shape)


@_fused_op("layer_norm_bwd")
def _layer_norm_bwd(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                    mean: Tensor, rstd: Tensor, need_dweight: bool, need_dbias: bool, backend: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    return launchers(backend).layer_norm_bwd(dy, dh, h, weight, mean, rstd, need_dweight, need_dbias)


@_layer_norm_bwd.register_fake
def _(dy, dh, h, weight, mean, rstd, need_dweight, need_dbias, backend):
    n = h.shape[1]
    dw = h.new_empty((n,) if need_dweight and weight is not None else (0,))
    db = h.new_empty((n,) if need_dbias else (0,))
    return h.new_empty(h.shape), dw, db


def _layer_norm_setup(ctx, inputs, output):
    x, residual, weight, bias, _, backend = inputs
    _, h, mean, rstd = output
    has_residual = residual is not None
    ctx.save_for_backward(h if has_residual else x, weight, mean, rstd)
    ctx.has_residual, ctx.has_bias, ctx.backend = has_residual, bias is not None, backend
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy, dh, _dmean, _drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[2]
    need_db = ctx.has_bias and ctx.needs_input_grad[3]
    if dy is None:
        dy = torch.zeros_like(h)
    dx, dw, db = _layer_norm_bwd(dy, dh if ctx.has_residual else None, h, weight, mean, rstd,
                                 need_dw, need_db, ctx.backend)
    return (dx, dx if ctx.has_residual else None, dw if need_dw else None,
            db if need_db else None, None, None)


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


def layer_norm(x: Tensor, normalized_shape: int | Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, residual: Optional[Tensor] = None,
               *, backend: Optional[str] = None) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the trailing `normalized_shape` dims, as torch.nn.functional.layer_norm
    (biased variance, eps inside the square root), with an optional fused residual add.

    Args:
        x: (..., *normalized_shape), float16 / bfloat16 / float32 (float64: reference only).
        normalized_shape: int or tuple, the trailing dims of x to normalize over.
        weight, bias: normalized_shape, dtype and device of x, or None.
        eps: > 0.
        residual: shape, dtype and device of x, or None.
        backend: this call's backend (default: the one in force, see set_backend).
    Returns:
        y, or (y, h) with h = x + residual when `residual` is given (the pre-norm sum that a
        pre-LN block carries on as its residual stream).
    """
    check.floating("x", x)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    if not isinstance(normalized_shape, Sequence) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in normalized_shape):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    normalized_shape = tuple(normalized_shape)
    k = len(normalized_shape)
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(f"normalized_shape {normalized_shape} must match the trailing dims of x, "
                         f"got x of shape {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check.like(name, t, "x", x)
            check.shape(name, t, normalized_shape, "(normalized_shape)")
    if residual is not None:
        check.like("residual", residual, "x", x)
        check.shape("residual", residual, tuple(x.shape), "(the shape of x)")

    backend = dispatch.resolve("layer_norm", x.device, backend)
    if backend == "reference":
        return reference.layer_norm_ref(x, normalized_shape, weight, bias, float(eps), residual,
                                        upcast=True)
    check.kernel_dtype("layer_norm", backend, "x", x)
    n = math.prod(normalized_shape)
    if k == 1 and x.dim() == 2:  # already (M, N) with (N,) weights: no views to make
        y, h, _, _ = _layer_norm_fwd(x, residual, weight, bias, float(eps), _backend_id(backend))
        return (y, h) if residual is not None else y
    flat = lambda t: None if t is None else t.reshape(-1, n)  # noqa: E731
    vec = lambda t: None if t is None else t.reshape(n)  # noqa: E731
    y, h, _, _ = _layer_norm_fwd(flat(x), flat(residual), vec(weight), vec(bias), float(eps),
                                 _backend_id(backend))
    y = y.view(x.shape)
    return (y, h.view(x.shape)) if residual is not None else y


# ----------------------------------------------------------------------------------------
# Attention


@_fused_op("attention_fwd")
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                   is_causal: bool, dropout_p: float, seed: Optional[Tensor], backend: int
                   ) -> tuple[Tensor, Tensor]:
    return launchers(backend).attention_fwd(q, k, v, mask, scale, is_causal, dropout_p, _seed(seed))


@_attention_fwd.register_fake
def _(q, k, v, mask, scale, is_causal, dropout_p, seed, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@_fused_op("attention_bwd")
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                   mask: Optional[Tensor], scale: float, is_causal: bool, dropout_p: float,
                   seed: Optional[Tensor], backend: int) -> tuple[Tensor, Tensor, Tensor]:
    return launchers(backend).attention_bwd(do, q, k, v, o, lse, mask, scale, is_causal,
                                            dropout_p, _seed(seed))


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, mask, scale, is_causal, dropout_p, seed, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, mask, scale, is_causal, dropout_p, seed, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, mask, seed)
    ctx.args = (scale, is_causal, dropout_p, backend)
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, do, _dlse):
    q, k, v, o, lse, mask, seed = ctx.saved_tensors
    scale, is_causal, dropout_p, backend = ctx.args
    dq = dk = dv = dmask = None
    if any(ctx.needs_input_grad[:3]):
        dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, mask, scale, is_causal, dropout_p, seed, backend)
    if ctx.needs_input_grad[3]:
        dmask = _attention_mask_grad(do, q, k, v, lse, mask, scale, is_causal, dropout_p, seed, backend)
    return dq, dk, dv, dmask, None, None, None, None, None


def _attention_mask_grad(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, mask: Tensor,
                         scale: float, is_causal: bool, dropout_p: float, seed: Optional[Tensor],
                         backend: int) -> Tensor:
    """The gradient of an additive mask (T5's relative position bias, a learned ALiBi):
    dS = P ∘ (dP - Delta), summed over the dims the mask broadcasts over. It is as large as the
    mask (up to B·HQ·LQ·LK), so torch ops form it here, in fp32, a block of query rows at a
    time: P from the forward's log-sum-exp (no second softmax), dP from dO vᵀ and the backend's
    own dropout keep-mask. Whole rows are at hand, so Delta = rowsum(P ∘ dP) from the same
    numbers rather than the kernels' rowsum(dO ∘ O) from the rounded O: where a row sees one
    key, dS is then exactly 0, as it is in exact arithmetic. The fused kernels still give dq,
    dk and dv."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    f32 = torch.float32
    kt = k.to(f32).unsqueeze(2).transpose(-1, -2)     # (B, HKV, 1, D, LK): query head h reads kv head h // g
    vt = v.to(f32).unsqueeze(2).transpose(-1, -2)
    keep = None
    if dropout_p > 0.0:
        keep = launchers(backend).attention_dropout_mask(_seed(seed), (b, hq, lq, lk), dropout_p, q.device)
    sum_dims = [i for i in range(4) if mask.shape[i] == 1]   # rows too, over the blocks
    per_row = mask.shape[2] != 1
    dmask = torch.zeros(mask.shape, dtype=f32, device=q.device)
    # Blocks of 16 MiB of fp32 scores on the CPU, where each pass over a block is memory-bound
    # and 64 MiB ones were slower (fwd + mask gradient at (2, 8, 1024, 64) with a (1, 8, 1024,
    # 1024) bias: 128 ms against 189-199 ms, ad hoc, one run each); 256 MiB on a GPU, for fewer
    # launches (not measured: no GPU yet).
    budget = 1 << (22 if q.device.type == "cpu" else 26)
    rows = max(1, budget // max(1, b * hq * lk))
    for r0 in range(0, lq, rows):  # in place where it can
        n = min(rows, lq - r0)
        q_blk = q[:, :, r0:r0 + n].to(f32).reshape(b, hkv, g, n, d)
        s = (q_blk @ kt).reshape(b, hq, n, lk).mul_(scale)
        s += (mask[:, :, r0:r0 + n] if per_row else mask).to(f32)
        if is_causal:  # top-left: query i sees keys j <= i
            i = torch.arange(r0, r0 + n, device=q.device)
            s.masked_fill_(torch.arange(lk, device=q.device) > i[:, None], float("-inf"))
        lse_blk = lse[:, :, r0:r0 + n, None]
        p = s.sub_(lse_blk).exp_().masked_fill_(torch.isneginf(lse_blk), 0.0)  # a fully masked row: 0
        dp = (do[:, :, r0:r0 + n].to(f32).reshape(b, hkv, g, n, d) @ vt).reshape(b, hq, n, lk)
        if keep is not None:
            dp.mul_(keep[:, :, r0:r0 + n]).mul_(1.0 / (1.0 - dropout_p))
        delta = (p.unsqueeze(-2) @ dp.unsqueeze(-1)).squeeze(-1)   # rowsum(P ∘ dP), (B, HQ, n, 1)
        ds = dp.sub_(delta).mul_(p)
        if sum_dims:
            ds = ds.sum(dim=sum_dims, keepdim=True)
        if per_row:
            dmask[:, :, r0:r0 + n] = ds
        else:
            dmask += ds
    return dmask.to(mask.dtype)


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False, *, return_lse: bool = False, backend: Optional[str] = None
              ) -> Tensor | tuple[Tensor, Tensor]:
    """Fused softmax(q kᵀ · scale + mask) v, O(L) memory: scaled_dot_product_attention, and
    with `return_lse=True` also the log-sum-exp of each row's scaled, masked scores
    ((..., HQ, LQ) float32, -inf where every key is masked; not differentiable). `backend`
    chooses this call's backend (default: the one in force). Arguments as
    scaled_dot_product_attention."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        check.floating(name, t)
        check.ndim(name, t, (3, 4), "(B, H, L, D) or (H, L, D)")
    check.like("key", k, "query", q)
    check.like("value", v, "query", q)
    if not q.dim() == k.dim() == v.dim():
        raise ValueError(f"query, key and value must have the same number of dims, got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dim() == 3:
        out = attention(q[None], k[None], v[None], None if attn_mask is None else attn_mask,
                        dropout_p, is_causal, scale, enable_gqa, return_lse=return_lse,
                        backend=backend)
        return (out[0][0], out[1][0]) if return_lse else out[0]
    (b, hq, lq, d), (bk, hkv, lk, dk), (bv, hv, lv, dv) = q.shape, k.shape, v.shape
    if not b == bk == bv:
        raise ValueError(f"query, key and value must have the same batch size, got {b}, {bk}, {bv}")
    if dk != d:
        raise ValueError(f"key head dim must equal the query head dim {d}, got {dk}")
    if (hv, lv) != (hkv, lk):
        raise ValueError(f"value must have the heads and length of key ({hkv}, {lk}), got ({hv}, {lv})")
    if hq != hkv:
        if not enable_gqa:
            raise ValueError(f"query has {hq} heads but key/value have {hkv}: pass enable_gqa=True "
                             "for grouped-query attention")
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    dropout_p = check.probability("dropout_p", dropout_p)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if attn_mask is not None:
        check.mask("attn_mask", attn_mask, (b, hq, lq, lk), "attention scores (B, HQ, LQ, LK)",
                   q.dtype, q.device)

    backend = dispatch.resolve("attention", q.device, backend)
    if backend == "reference":
        return reference.attention_ref(q, k, v, attn_mask, dropout_p, bool(is_causal), scale,
                                       enable_gqa, return_lse=return_lse, upcast=True)
    check.kernel_dtype("attention", backend, "query", q)
    if dv != d:
        raise ValueError(f"attention: backend '{backend}' needs value head dim == query head dim "
                         f"({d}), got {dv}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + attn_mask.shape)
    o, lse = _attention_fwd(q, k, v, mask, scale, bool(is_causal), dropout_p,
                            _new_seed(dropout_p), _backend_id(backend))
    return (o, lse) if return_lse else o


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same signature and
    semantics) on the fused backends.

    Args:
        query: (B, HQ, LQ, D) or (HQ, LQ, D); key, value: (B, HKV, LK, D), same dtype/device.
        attn_mask: bool (True = attend) or query.dtype (added to the scores; differentiable),
            broadcastable to (B, HQ, LQ, LK). Unlike SDPA it may be combined with is_causal.
        dropout_p: dropout on the attention probabilities, in [0, 1).
        is_causal: query i attends to keys j <= i (top-left aligned when LQ != LK).
        scale: defaults to 1/sqrt(D).
        enable_gqa: allow HKV < HQ (HQ % HKV == 0).
    Returns:
        (B, HQ, LQ, D). A query whose keys are all masked gets zeros (and zero gradients).
    """
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


# ----------------------------------------------------------------------------------------
# Standalone scaled + masked softmax


@_fused_op("softmax_fwd")
def _softmax_fwd(x: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool, backend: int) -> Tensor:
    return launchers(backend).softmax_fwd(x, mask, scale, is_causal)


@_softmax_fwd.register_fake
def _(x, mask, scale, is_causal, backend):
    return x.new_empty(x.shape)


@_fused_op("softmax_bwd")
def _softmax_bwd(dy: Tensor, y: Tensor, scale: float, backend: int) -> Tensor:
    return launchers(backend).softmax_bwd(dy, y, scale)


@_softmax_bwd.register_fake
def _(dy, y, scale, backend):
    return y.new_empty(y.shape)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.scale, ctx.backend = inputs[2], inputs[4]


def _softmax_backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return _softmax_bwd(dy, y, ctx.scale, ctx.backend), None, None, None, None


_softmax_fwd.register_autograd(_softmax_backward, setup_context=_softmax_setup)


def scaled_masked_softmax(scores: Tensor, scale: float = 1.0, mask: Optional[Tensor] = None,
                          causal: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """softmax(scores · scale + mask) over the last dim, fused (Megatron's kernel, any length).

    Args:
        scores: (LQ, LK), (H, LQ, LK) or (B, H, LQ, LK); float16 / bfloat16 / float32.
        scale: multiplies the scores before the mask.
        mask: bool (True = keep, SDPA's convention) or scores.dtype (added), broadcastable to
            scores.
        causal: position i keeps keys j <= i (top-left aligned).
        backend: this call's backend (default: the one in force).
    Returns:
        probabilities shaped like scores; a row with every entry masked is all zeros.
    """
    check.floating("scores", scores)
    check.ndim("scores", scores, (2, 3, 4), "(..., LQ, LK) with at most 2 leading dims")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if mask is not None:
        check.mask("mask", mask, tuple(scores.shape), "scores", scores.dtype, scores.device)

    backend = dispatch.resolve("softmax", scores.device, backend)
    if backend == "reference":
        return reference.scaled_masked_softmax_ref(scores, float(scale), mask, bool(causal), upcast=True)
    check.kernel_dtype("softmax", backend, "scores", scores)
    x = scores.reshape((1,) * (4 - scores.dim()) + scores.shape)
    m = None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + mask.shape)
    return _softmax_fwd(x, m, float(scale), bool(causal), _backend_id(backend)).view(scores.shape)


# ----------------------------------------------------------------------------------------
# FFN: act(x W1ᵀ + b1) W2ᵀ + b2


@_fused_op("ffn_fwd")
def _ffn_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
             activation: int, dropout_p: float, seed: Optional[Tensor], backend: int,
             save_pre: bool) -> tuple[Tensor, Tensor]:
    return launchers(backend).ffn_fwd(x, w1, b1, w2, b2, reference.ACTIVATIONS[activation],
                                      dropout_p, _seed(seed), save_pre)


@_ffn_fwd.register_fake
def _(x, w1, b1, w2, b2, activation, dropout_p, seed, backend, save_pre):
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0] if save_pre else 0, w1.shape[0]))


@_fused_op("ffn_bwd")
def _ffn_bwd(dy: Tensor, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
             b2: Optional[Tensor], pre: Tensor, activation: int, dropout_p: float,
             seed: Optional[Tensor], backend: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return launchers(backend).ffn_bwd(dy, x, w1, b1, w2, b2, pre, reference.ACTIVATIONS[activation],
                                      dropout_p, _seed(seed))


@_ffn_bwd.register_fake
def _(dy, x, w1, b1, w2, b2, pre, activation, dropout_p, seed, backend):
    db1 = w1.new_empty((w1.shape[0],) if b1 is not None else (0,))
    db2 = w2.new_empty((w2.shape[0],) if b2 is not None else (0,))
    return x.new_empty(x.shape), w1.new_empty(w1.shape), db1, w2.new_empty(w2.shape), db2


def _ffn_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, dropout_p, seed, backend, _ = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, output[1], seed)
    ctx.args = (activation, dropout_p, backend)
    ctx.mark_non_differentiable(output[1])


def _ffn_backward(ctx, dy, _dpre):
    x, w1, b1, w2, b2, pre, seed = ctx.saved_tensors
    activation, dropout_p, backend = ctx.args
    dx, dw1, db1, dw2, db2 = _ffn_bwd(dy, x, w1, b1, w2, b2, pre, activation, dropout_p, seed, backend)
    return (dx, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None,
            None, None, None, None, None)


_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup)


def ffn(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
        activation: str = "gelu", dropout_p: float = 0.0, *, backend: Optional[str] = None
        ) -> Tensor:
    """The position-wise feed-forward block, fused: act(x w1ᵀ + b1) w2ᵀ + b2.

    Weights are in nn.Linear layout, so ffn(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    works. Dropout (if any) applies to the hidden activation.

    Args:
        x: (..., C).
        w1: (F, C), or (2F, C) for swiglu (rows [0, F) the gate, [F, 2F) the up projection).
        b1: (F,) / (2F,) or None.  w2: (C, F).  b2: (C,) or None.
        activation: "relu", "gelu" (erf), "gelu_tanh" or "swiglu" (silu(gate) * up).
        dropout_p: in [0, 1).
        backend: this call's backend (default: the one in force).
    Returns:
        (..., C).
    """
    check.floating("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dim (..., C), got shape {tuple(x.shape)}")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    for name, t in (("w1", w1), ("w2", w2)):
        check.like(name, t, "x", x)
        check.ndim(name, t, (2,), "(out_features, in_features)")
    c = x.shape[-1]
    f1 = w1.shape[0]
    f = f1 // 2 if activation == "swiglu" else f1
    if w1.shape[1] != c:
        raise ValueError(f"w1 must have shape (F, {c}) to match x's last dim {c}, got {tuple(w1.shape)}")
    if activation == "swiglu" and f1 % 2:
        raise ValueError(f"w1 must have an even number of rows (gate and up halves) for swiglu, "
                         f"got {tuple(w1.shape)}")
    check.shape("w2", w2, (c, f), "(C, F)")
    if b1 is not None:
        check.like("b1", b1, "x", x)
        check.shape("b1", b1, (f1,), "(rows of w1,)")
    if b2 is not None:
        check.like("b2", b2, "x", x)
        check.shape("b2", b2, (c,), "(C,)")
    dropout_p = check.probability("dropout_p", dropout_p)

    backend = dispatch.resolve("ffn", x.device, backend)
    if backend == "reference":
        return reference.ffn_ref(x, w1, b1, w2, b2, activation, dropout_p, upcast=True)
    check.kernel_dtype("ffn", backend, "x", x)
    # pre is saved for a backward only: under no_grad, or with nothing requiring grad, the
    # kernels skip its (M, F1) store and the CPU its (M, F1) buffer.
    save_pre = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    y, _ = _ffn_fwd(x.reshape(-1, c), w1, b1, w2, b2, reference.ACTIVATIONS.index(activation),
                    dropout_p, _new_seed(dropout_p), _backend_id(backend), save_pre)
    return y.view(*x.shape[:-1], c)
