"""Drop-in fused modules (fusedformer.nn): torch.nn twins that compute through the fused ops.

    MultiheadAttention        torch.nn.MultiheadAttention: fusedformer.attention, masks merged
    LayerNorm                 torch.nn.LayerNorm, plus forward(x, residual) -> (y, x + residual)
    FeedForward               fc2(dropout(act(fc1(x)))) as one fusedformer.ffn call
    TransformerEncoderLayer   torch.nn.TransformerEncoderLayer: fused attention, FFN, Add & Norm
    TransformerDecoderLayer   torch.nn.TransformerDecoderLayer: the same, with cross-attention

Each torch twin has the same constructor arguments and defaults, forward signature, parameter
names (so state_dicts load both ways), initialization (same RNG draws in the same order) and
semantics, plus a keyword-only `backend` (None: the backend in force at call time) that is
passed per call to the ops, so it also holds inside torch.compile'd code. `<Module>.from_torch(m)`
builds the twin of an existing torch module that shares its Parameter objects (what
fusedformer.patch uses).

Where they differ from torch, on purpose:
  * a query whose keys are all masked gets zeros (torch: NaN);
  * `is_causal=True` with `attn_mask=None` applies the causal mask (torch raises);
  * activations are names ("relu", "gelu", "gelu_tanh") or F.relu / F.gelu / nn.ReLU / nn.GELU;
    any other callable has no fused kernel and raises a TypeError;
  * float64 with backend "auto" runs on "reference" (the compiled kernels take fp16/bf16/fp32),
    with a one-time warning;
  * bad inputs raise ValueError / TypeError naming the argument (torch: AssertionError).
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .kernels import dispatch, ops
from .kernels.validate import KERNEL_DTYPES

__all__ = [
    "FeedForward",
    "LayerNorm",
    "MultiheadAttention",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
]

# ----------------------------------------------------------------------------------------
# Shared helpers


@functools.lru_cache(maxsize=None)
def _warn_float64(module: str) -> None:
    warnings.warn(f"fusedformer.nn.{module}: float64 inputs run on backend 'reference' (the fused "
                  "kernels take float16, bfloat16 and float32)", stacklevel=4)


def _backend_for(module: str, backend: Optional[str], x: Tensor) -> Optional[str]:
    """The backend to hand the ops for tensors like `x`: the module's own, except that float64
    under "auto" goes to "reference" (once-warned) instead of failing in a compiled kernel."""
    if x.dtype in KERNEL_DTYPES:
        return backend
    if (dispatch.get_backend() if backend is None else backend) == "auto":
        _warn_float64(module)
        return "reference"
    return backend


def _share_parameters(fused: nn.Module, original: nn.Module) -> None:
    """Make `fused` use the Parameter and buffer objects of `original` (same names, same shapes;
    so optimizers built on the original keep working) and copy its training flags."""
    for kind in ("_parameters", "_buffers"):
        ours = {name: t for name, t in _named_tensors(fused, kind)}
        theirs = {name: t for name, t in _named_tensors(original, kind)}
        if set(ours) != set(theirs):
            missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
            raise ValueError(f"{type(original).__name__} does not have the {kind.strip('_')} of "
                             f"{type(fused).__name__}: missing {missing}, unexpected {extra}")
        for name, t in theirs.items():
            if ours[name].shape != t.shape:
                raise ValueError(f"{name}: expected shape {tuple(ours[name].shape)}, got {tuple(t.shape)}")
            path, _, leaf = name.rpartition(".")
            getattr(fused.get_submodule(path), kind)[leaf] = t
    for name, sub in fused.named_modules():
        try:
            sub.training = original.get_submodule(name).training
        except AttributeError:
            sub.training = original.training


def _named_tensors(module: nn.Module, kind: str) -> list[tuple[str, Tensor]]:
    """(qualified name, tensor) of every non-None parameter (or buffer), duplicates kept."""
    out = []
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for leaf, t in getattr(sub, kind).items():
            if t is not None:
                out.append((f"{prefix}.{leaf}" if prefix else leaf, t))
    return out


def _factory(module: nn.Module) -> dict:
    """device / dtype of a module's first parameter, for building its twin on the meta device."""
    p = next(module.parameters(), None)
    return {"device": "meta", "dtype": None if p is None else p.dtype}


# ----------------------------------------------------------------------------------------
# LayerNorm


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm through fusedformer.layer_norm, with an optional fused residual add.

    forward(x) -> y = LN(x); forward(x, residual) -> (y, h) with h = x + residual and y = LN(h),
    in one pass (the Add & Norm of a post-LN block, or the residual stream of a pre-LN one).
    Parameters `weight` (ones) and `bias` (zeros) of shape normalized_shape, as torch.
    """

    __constants__ = ["normalized_shape", "eps", "elementwise_affine"]
    normalized_shape: tuple[int, ...]
    eps: float
    elementwise_affine: bool

    def __init__(self, normalized_shape: Union[int, Sequence[int]], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """x: (..., *normalized_shape); residual: like x or None. Returns y, or (y, x + residual)."""
        return ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, residual,
                              backend=_backend_for("LayerNorm", self.backend, x))

    def extra_repr(self) -> str:
        # torch's own, so the repr matches the installed torch's nn.LayerNorm (2.13 adds bias=,
        # 2.11 has no such field).
        return nn.LayerNorm.extra_repr(self)

    @classmethod
    def from_torch(cls, module: nn.LayerNorm, *, backend: Optional[str] = None) -> "LayerNorm":
        """The fused twin of `module`, sharing its parameters."""
        fused = cls(module.normalized_shape, module.eps, module.elementwise_affine,
                    bias=getattr(module, "bias", None) is not None, backend=backend, **_factory(module))
        _share_parameters(fused, module)
        return fused


# ----------------------------------------------------------------------------------------
# FeedForward


class FeedForward(nn.Module):
    """The position-wise FFN, fc2(dropout(act(fc1(x)))), as one fusedformer.ffn call.

    fc1: nn.Linear(d_model, d_ff) (or 2·d_ff for swiglu: rows [0, d_ff) the gate, [d_ff, 2·d_ff)
    the up projection); fc2: nn.Linear(d_ff, d_model). Dropout applies to the hidden activation,
    in training mode only.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0,
                 bias: bool = True, *, device=None, dtype=None, backend: Optional[str] = None) -> None:
        super().__init__()
        if activation not in ("relu", "gelu", "gelu_tanh", "swiglu"):
            raise ValueError("activation must be 'relu', 'gelu', 'gelu_tanh' or 'swiglu', "
                             f"got {activation!r}")
        factory = {"device": device, "dtype": dtype}
        self.activation = activation
        self.dropout = dropout
        self.backend = backend
        self.fc1 = nn.Linear(d_model, 2 * d_ff if activation == "swiglu" else d_ff, bias=bias, **factory)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias, **factory)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_model) -> (..., d_model)."""
        return ops.ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                       self.activation, self.dropout if self.training else 0.0,
                       backend=_backend_for("FeedForward", self.backend, x))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dropout={self.dropout}"


# ----------------------------------------------------------------------------------------
# MultiheadAttention


def _keep_or_additive(mask: Optional[Tensor], name: str, dtype: torch.dtype) -> Optional[Tensor]:
    """torch's MHA mask (bool True = ignore, or float added to the scores) in the ops' terms:
    bool True = attend, or float in the compute dtype."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    if mask.is_floating_point():
        return mask.to(dtype)
    raise TypeError(f"{name} must be bool (True = ignore that key) or floating (added to the "
                    f"attention scores), got {mask.dtype}: an integer mask is ambiguous")


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _merge_masks(a: Optional[Tensor], b: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """One mask equal to applying both (broadcast): bool & bool, else the sum of additive masks."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _additive(a, dtype) + _additive(b, dtype)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention, computed by fusedformer.attention.

    Same constructor, parameters (in_proj_weight / in_proj_bias, or q_proj_weight /
    k_proj_weight / v_proj_weight when kdim or vdim differs from embed_dim; out_proj.weight /
    out_proj.bias; bias_k / bias_v with add_bias_kv), initialization and forward as torch. With
    need_weights=False the attention runs fused in O(L) memory with key_padding_mask and
    attn_mask merged into one mask broadcastable to (B, H, L, S) (key padding alone stays
    (B, 1, 1, S)); with need_weights=True (torch's default) the weights are computed explicitly
    with fusedformer.scaled_masked_softmax and returned as torch does.
    """

    __constants__ = ["batch_first"]
    bias_k: Optional[Tensor]
    bias_v: Optional[Tensor]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads} instead")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.backend = backend

        # Created in torch's order, so that the same seed gives the same initial weights.
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor,
                      key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]) -> bool:
        """Validate shapes as torch's _mha_shape_check does; True when the input is batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (L, B, E) / (B, L, E) with batch_first, or 2-D (L, E) "
                             f"unbatched, got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must be {query.dim()}-D like query, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim),
                               ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ValueError(f"{name} must have {width} features in its last dim, "
                                 f"got shape {tuple(t.shape)}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must agree in sequence and batch dims, got shapes "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        seq_dim, batch_dim = (1, 0) if self.batch_first else (0, 1)
        if batched and query.shape[batch_dim] != key.shape[batch_dim]:
            raise ValueError(f"query and key must have the same batch size, got shapes "
                             f"{tuple(query.shape)} and {tuple(key.shape)}")
        b = query.shape[batch_dim] if batched else 1
        l, s = (query.shape[seq_dim], key.shape[seq_dim]) if batched else (query.shape[0], key.shape[0])
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and not isinstance(m, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(m).__name__}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((b, s) if batched else (s,)):
            expected = f"{(b, s)} (B, S)" if batched else f"{(s,)} (S,)"
            raise ValueError(f"key_padding_mask must have shape {expected}, "
                             f"got {tuple(key_padding_mask.shape)}")
        heads = b * self.num_heads if batched else self.num_heads
        if attn_mask is not None and tuple(attn_mask.shape) not in ((l, s), (heads, l, s)):
            raise ValueError(f"attn_mask must have shape {(l, s)} (L, S) or {(heads, l, s)} "
                             f"({'B·H' if batched else 'H'}, L, S), got {tuple(attn_mask.shape)}")
        return batched

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """Attention of query over key/value, as torch.nn.MultiheadAttention.forward.

        Args:
            query: (L, B, E), or (B, L, E) with batch_first, or (L, E) unbatched.
            key, value: (S, B, kdim / vdim), (B, S, ...) with batch_first, or (S, ...) unbatched.
            key_padding_mask: (B, S) or (S,): bool (True = ignore that key) or float (added).
            need_weights: also return the attention weights (an explicit, O(L·S) path).
            attn_mask: (L, S) or (B·H, L, S) ((H, L, S) unbatched): bool (True = NOT allowed)
                or float (added to the scores).
            average_attn_weights: average the returned weights over heads.
            is_causal: with attn_mask None, query i attends to keys j <= i (top-left); with an
                attn_mask, a hint that it is causal (used as torch does).
        Returns:
            (output like query, weights or None): weights (B, L, S') averaged or (B, H, L, S'),
            without the B dim when unbatched; S' counts bias_k and the zero key when added.
        """
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        self_attention = query is key and key is value
        kv_same = key is value
        dtype = query.dtype
        kpm = _keep_or_additive(key_padding_mask, "key_padding_mask", dtype)
        mask = _keep_or_additive(attn_mask, "attn_mask", dtype)
        causal = bool(is_causal)
        if causal and mask is not None:
            if kpm is None and not need_weights:
                mask = None  # torch's rule: the hint replaces the mask on its SDPA path
            else:
                causal = False  # the mask is the causal mask (torch ignores the hint here)

        # Batch first, batched: (B, L, E), (B, S, kdim), (B, S, vdim)
        if not batched:
            query, key, value = query[None], key[None], value[None]
            kpm = None if kpm is None else kpm[None]
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        bsz, tgt_len, embed_dim = query.shape
        nh, hs = self.num_heads, self.head_dim

        # In-projection (one GEMM for self-attention, as torch's _in_projection_packed)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if self_attention and self._qkv_same_embed_dim:
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3E)
            q, k, v = qkv.chunk(3, dim=-1)  # (B, L, E) each
        elif kv_same and self._qkv_same_embed_dim:
            q = F.linear(query, w_q, b_q)  # (B, L, E)
            b_kv = None if self.in_proj_bias is None else self.in_proj_bias[embed_dim:]
            k, v = F.linear(key, self.in_proj_weight[embed_dim:], b_kv).chunk(2, dim=-1)  # (B, S, E) each
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, embed_dim)], dim=1)  # (B, S+1, E)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, embed_dim)], dim=1)
        q = q.view(bsz, tgt_len, nh, hs).transpose(1, 2)  # (B, NH, L, HS)
        k = k.reshape(bsz, k.shape[1], nh, hs).transpose(1, 2)  # (B, NH, S', HS)
        v = v.reshape(bsz, v.shape[1], nh, hs).transpose(1, 2)
        if self.add_zero_attn:
            zeros = k.new_zeros(bsz, nh, 1, hs)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)  # (B, NH, S'+1, HS)
        src_len = k.shape[2]

        # One mask broadcastable to (B, NH, L, S'): bool True = attend, or additive
        if mask is not None:
            mask = mask[None, None] if mask.dim() == 2 else mask.reshape(bsz, nh, tgt_len, -1)
        if kpm is not None:
            kpm = kpm[:, None, None, :]  # (B, 1, 1, S)
        mask = _merge_masks(mask, kpm, dtype)
        if mask is not None and mask.shape[-1] != src_len:
            extra = src_len - mask.shape[-1]  # bias_k and the zero key: always attended
            mask = F.pad(mask, (0, extra), value=True if mask.dtype == torch.bool else 0.0)

        dropout_p = self.dropout if self.training else 0.0
        backend = _backend_for("MultiheadAttention", self.backend, q)
        if need_weights:
            scores = q @ k.transpose(-2, -1)  # (B, NH, L, S')
            weights = ops.scaled_masked_softmax(scores, 1.0 / math.sqrt(hs), mask, causal, backend=backend)
            if dropout_p > 0.0:
                weights = F.dropout(weights, dropout_p)  # returned after dropout, as torch does
            o = weights @ v  # (B, NH, L, HS)
        else:
            weights = None
            # contiguous: the kernels copy strided inputs anyway, and their gradients come back
            # contiguous, which is what the ops' fake (torch.compile) implementations must assume
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            o = ops.attention(q, k, v, mask, dropout_p, causal, backend=backend)  # (B, NH, L, HS)
        o = o.transpose(1, 2).reshape(bsz, tgt_len, embed_dim)  # (B, L, E)
        out = F.linear(o, self.out_proj.weight, self.out_proj.bias)  # (B, L, E)

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (B, L, S')
        if not batched:
            return out[0], None if weights is None else weights[0]
        return (out if self.batch_first else out.transpose(0, 1)), weights

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *, backend: Optional[str] = None
                   ) -> "MultiheadAttention":
        """The fused twin of `module`, sharing its parameters."""
        fused = cls(module.embed_dim, module.num_heads, module.dropout,
                    bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                    add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                    batch_first=module.batch_first, backend=backend, **_factory(module))
        _share_parameters(fused, module)
        return fused


# ----------------------------------------------------------------------------------------
# Transformer layers

# Activations with a fused kernel, by name, and the torch callables that mean the same.
_ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
}


def _activation_name(activation: Union[str, Callable[[Tensor], Tensor]]) -> str:
    """The fused kernel's name for a Transformer layer activation: "relu", "gelu" or
    "gelu_tanh", from that string or from F.relu / torch.relu / nn.ReLU, F.gelu / nn.GELU.
    Raises ValueError for another string and TypeError for another callable (no fused kernel)."""
    if isinstance(activation, str):
        if activation not in _ACTIVATION_FNS:
            raise ValueError(f"activation should be one of {tuple(_ACTIVATION_FNS)}, got {activation!r}")
        return activation
    if activation is F.relu or activation is torch.relu or type(activation) is nn.ReLU:
        return "relu"
    if activation is F.gelu or type(activation) is nn.GELU:
        approximate = getattr(activation, "approximate", "none")
        return "gelu" if approximate == "none" else "gelu_tanh"
    raise TypeError(f"activation {activation!r} has no fused kernel: use 'relu', 'gelu' or 'gelu_tanh' "
                    "(or F.relu / F.gelu / nn.ReLU / nn.GELU), or keep the torch.nn layer for it")


class _TransformerLayer(nn.Module):
    """What the encoder and decoder layers share: the FFN sublayer and activation handling."""

    linear1: nn.Linear
    linear2: nn.Linear
    dropout: nn.Dropout

    def _set_activation(self, activation: Union[str, Callable[[Tensor], Tensor]]) -> None:
        self.activation_name = _activation_name(activation)
        self.activation = _ACTIVATION_FNS[self.activation_name] if isinstance(activation, str) else activation
        self.activation_relu_or_gelu = {"relu": 1, "gelu": 2}.get(self.activation_name, 0)

    def _ff_block(self, x: Tensor, dropout: nn.Dropout) -> Tensor:
        """dropout(linear2(dropout(act(linear1(x))))), the first three fused: (..., C) -> (..., C)."""
        y = ops.ffn(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                    self.activation_name, self.dropout.p if self.training else 0.0,
                    backend=_backend_for(type(self).__name__, self.backend, x))
        return dropout(y)


class TransformerEncoderLayer(_TransformerLayer):
    """torch.nn.TransformerEncoderLayer with fused attention, FFN and Add & Norm.

    Same arguments, submodule names (self_attn, linear1, dropout, linear2, norm1, norm2,
    dropout1, dropout2) and forward. Post-LN (norm_first=False): x = LN1(x + SA(x)),
    x = LN2(x + FF(x)), each residual add fused into its LayerNorm. Pre-LN: x = x + SA(LN1(x)),
    x = x + FF(LN2(x)), the first add fused into LN2.
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.backend = backend
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first, backend=backend, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, backend=backend, **factory)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, backend=backend, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self._set_activation(activation)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None,
                src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """src: (S, B, E), (B, S, E) with batch_first, or (S, E); masks as MultiheadAttention
        (src_mask = attn_mask, src_key_padding_mask = key_padding_mask). Returns src's shape."""
        x = src
        if self.norm_first:
            a = self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            y, x = self.norm2(a, x)  # y = LN2(x + a), x = x + a
            return x + self._ff_block(y, self.dropout2)
        x = self.norm1(self._sa_block(x, src_mask, src_key_padding_mask, is_causal), x)[0]
        return self.norm2(self._ff_block(x, self.dropout2), x)[0]

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return self.dropout1(x)

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoderLayer, *, backend: Optional[str] = None
                   ) -> "TransformerEncoderLayer":
        """The fused twin of `module`, sharing its parameters. TypeError when its activation has
        no fused kernel; ValueError when its parts do not have torch's layout."""
        sa = module.self_attn
        fused = cls(sa.embed_dim, sa.num_heads, module.linear1.out_features, module.dropout.p,
                    activation=module.activation, layer_norm_eps=module.norm1.eps,
                    batch_first=sa.batch_first, norm_first=module.norm_first,
                    bias=module.linear1.bias is not None, backend=backend, **_factory(module))
        _copy_hyperparameters(fused, module)
        _share_parameters(fused, module)
        return fused


class TransformerDecoderLayer(_TransformerLayer):
    """torch.nn.TransformerDecoderLayer with fused attention, FFN and Add & Norm.

    Same arguments, submodule names (self_attn, multihead_attn, linear1, dropout, linear2,
    norm1..3, dropout1..3) and forward. Post-LN: x = LN1(x + SA(x)), x = LN2(x + MHA(x, mem)),
    x = LN3(x + FF(x)); pre-LN: x = x + SA(LN1(x)), x = x + MHA(LN2(x), mem), x = x + FF(LN3(x)).
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.backend = backend
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first,
                                            bias=bias, backend=backend, **factory)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=batch_first,
                                                 bias=bias, backend=backend, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, backend=backend, **factory)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, backend=backend, **factory)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, backend=backend, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self._set_activation(activation)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        """tgt: (T, B, E) / (B, T, E) with batch_first / (T, E); memory: (S, B, E) likewise;
        masks as MultiheadAttention for the self- (tgt_*) and cross- (memory_*) attention."""
        x = tgt
        if self.norm_first:
            a = self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            y, x = self.norm2(a, x)  # y = LN2(x + a), x = x + a
            c = self._mha_block(y, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            y, x = self.norm3(c, x)  # y = LN3(x + c), x = x + c
            return x + self._ff_block(y, self.dropout3)
        x = self.norm1(self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal), x)[0]
        x = self.norm2(self._mha_block(x, memory, memory_mask, memory_key_padding_mask,
                                                   memory_is_causal), x)[0]
        return self.norm3(self._ff_block(x, self.dropout3), x)[0]

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           is_causal=is_causal, need_weights=False)[0]
        return self.dropout1(x)

    def _mha_block(self, x: Tensor, mem: Tensor, attn_mask: Optional[Tensor],
                   key_padding_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    @classmethod
    def from_torch(cls, module: nn.TransformerDecoderLayer, *, backend: Optional[str] = None
                   ) -> "TransformerDecoderLayer":
        """The fused twin of `module`, sharing its parameters. TypeError when its activation has
        no fused kernel; ValueError when its parts do not have torch's layout."""
        sa = module.self_attn
        fused = cls(sa.embed_dim, sa.num_heads, module.linear1.out_features, module.dropout.p,
                    activation=module.activation, layer_norm_eps=module.norm1.eps,
                    batch_first=sa.batch_first, norm_first=module.norm_first,
                    bias=module.linear1.bias is not None, backend=backend, **_factory(module))
        _copy_hyperparameters(fused, module)
        _share_parameters(fused, module)
        return fused


def _copy_hyperparameters(fused: nn.Module, original: nn.Module) -> None:
    """Per-submodule settings a layer's constructor shares but a user may have changed:
    every dropout's p, each attention's dropout and each norm's eps."""
    for name, sub in fused.named_modules():
        if not name:
            continue
        theirs = original.get_submodule(name)
        if isinstance(sub, nn.Dropout):
            sub.p = theirs.p
        elif isinstance(sub, MultiheadAttention):
            if (theirs.kdim, theirs.vdim, theirs.bias_k is None, theirs.add_zero_attn) != (
                    sub.kdim, sub.vdim, sub.bias_k is None, sub.add_zero_attn):
                raise ValueError(f"{name}: kdim / vdim / add_bias_kv / add_zero_attn differ from "
                                 "a standard layer's")
            sub.dropout = theirs.dropout
        elif isinstance(sub, LayerNorm):
            sub.eps = theirs.eps
