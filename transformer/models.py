"""The fused Transformer: GPT and EncoderDecoder computing through fusedformer's ops.

Twins of fusedformer.reference (same class names, configs, presets, parameter names and
call conventions): each fused class subclasses its reference class and swaps the layers for
ones whose forward runs the fused ops. So `fused.load_state_dict(ref.state_dict())` works both
ways, a fused model built under the same seed starts from the reference's exact weights, and
embedding, loss, KV cache and generation are literally the reference's code.

What is fused, per layer:
    attention     fusedformer.attention (online softmax, never a T x T tensor; masks broadcast)
    FFN           fusedformer.ffn: GEMM + bias + activation epilogue, GEMM + bias
    Add & Norm    fusedformer.layer_norm(sublayer_out, residual=x): the residual add and the
                  LayerNorm in one pass (post-LN keeps y; pre-LN keeps h = x + sublayer as
                  the residual stream and y as the next sublayer's input)
`backend` picks the backend for every op of the model (None: the one in force at call time).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from . import reference
from .kernels.ops import attention, ffn, layer_norm
from .reference import (
    KV,
    PRESETS,
    EncoderDecoderConfig,
    GPTConfig,
    _merge_heads,
    _split_heads,
    config_from_preset,
)

__all__ = ["GPT", "EncoderDecoder", "GPTConfig", "EncoderDecoderConfig", "PRESETS", "config_from_preset"]


def _norm(ln: nn.LayerNorm, x: Tensor, residual: Optional[Tensor], backend: Optional[str]):
    """The fused LayerNorm of module `ln` (its weight, bias, eps), optionally with residual."""
    return layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps, residual, backend=backend)


def _p(dropout: nn.Dropout, training: bool) -> float:
    return dropout.p if training else 0.0


# ----------------------------------------------------------------------------------------
# GPT


class CausalSelfAttention(reference.CausalSelfAttention):
    """GPT-2 attention (c_attn, c_proj) through the fused attention op."""

    def __init__(self, config: GPTConfig, backend: Optional[str] = None) -> None:
        super().__init__(config)
        self.backend = backend

    def forward(self, x: Tensor, mask: Tensor, past: KV | None = None) -> tuple[Tensor, KV]:
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)        # 3 x (B, T, C)
        q, k, v = (_split_heads(t, self.n_head) for t in (q, k, v))  # (B, NH, T, HS)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)                    # (B, NH, P + T, HS)
            v = torch.cat([past[1], v], dim=2)                    # (B, NH, P + T, HS)
        y = attention(q, k, v, mask, _p(self.attn_dropout, self.training),
                      backend=self.backend)                       # (B, NH, T, HS)
        return self.resid_dropout(self.c_proj(_merge_heads(y))), (k, v)


class MLP(reference.MLP):
    """GPT-2 MLP (c_fc, GELU, c_proj) as one fused FFN call."""

    def __init__(self, config: GPTConfig, backend: Optional[str] = None) -> None:
        super().__init__(config)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        y = ffn(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                "gelu", backend=self.backend)                     # (B, T, C)
        return self.dropout(y)


class Block(reference.Block):
    """Pre-LN block; the attention residual add is fused into ln_2."""

    def __init__(self, config: GPTConfig, backend: Optional[str] = None) -> None:
        nn.Module.__init__(self)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, backend)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config, backend)
        self.backend = backend

    def forward(self, x: Tensor, mask: Tensor, past: KV | None = None) -> tuple[Tensor, KV]:
        a, kv = self.attn(_norm(self.ln_1, x, None, self.backend), mask, past)
        y, x = _norm(self.ln_2, a, x, self.backend)               # x = x + a; y = ln_2(x)
        return x + self.mlp(y), kv                                # (B, T, C)


class _FinalNorm(nn.LayerNorm):
    """ln_f through the fused op (same parameters as nn.LayerNorm)."""

    def __init__(self, n: int, eps: float, bias: bool, backend: Optional[str]) -> None:
        super().__init__(n, eps=eps, bias=bias)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return _norm(self, x, None, self.backend)


class GPT(reference.GPT):
    """fusedformer.reference.GPT with fused layers (see the module docstring)."""

    def __init__(self, config: GPTConfig, backend: Optional[str] = None) -> None:
        super().__init__(config)  # builds and initializes the reference layers
        self.backend = backend
        h = self.transformer.h
        fused = nn.ModuleList([Block(config, backend) for _ in range(config.n_layer)])
        for new, old in zip(fused, h):
            new.load_state_dict(old.state_dict())  # keep the reference's init exactly
        self.transformer.h = fused
        ln_f = _FinalNorm(config.n_embd, config.layer_norm_eps, config.bias, backend)
        ln_f.load_state_dict(self.transformer.ln_f.state_dict())
        self.transformer.ln_f = ln_f

    @classmethod
    def from_preset(cls, name: str, backend: Optional[str] = None, **overrides) -> "GPT":
        config = config_from_preset(name, **overrides)
        if not isinstance(config, GPTConfig):
            raise ValueError(f"preset {name!r} configures an EncoderDecoder, not a GPT")
        return cls(config, backend)


# ----------------------------------------------------------------------------------------
# EncoderDecoder


class MultiHeadAttention(reference.MultiHeadAttention):
    """q/k/v/out projections around the fused attention op."""

    def __init__(self, d_model: int, n_head: int, dropout: float, backend: Optional[str] = None) -> None:
        super().__init__(d_model, n_head, dropout)
        self.backend = backend

    def forward(self, x: Tensor, kv: KV, mask: Tensor) -> Tensor:
        q = _split_heads(self.q_proj(x), self.n_head)             # (B, NH, T, HS)
        y = attention(q, kv[0], kv[1], mask, _p(self.attn_dropout, self.training),
                      backend=self.backend)                       # (B, NH, T, HS)
        return self.out_proj(_merge_heads(y))                     # (B, T, C)


class FeedForward(reference.FeedForward):
    """fc2(relu(fc1(x))) as one fused FFN call."""

    def __init__(self, d_model: int, d_ff: int, backend: Optional[str] = None) -> None:
        super().__init__(d_model, d_ff)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, "relu",
                   backend=self.backend)


def _add_norm(ln: nn.LayerNorm, x: Tensor, sub: Tensor, backend: Optional[str]) -> Tensor:
    """Post-LN Add & Norm, fused: LayerNorm(x + sub)."""
    return _norm(ln, sub, x, backend)[0]


class EncoderLayer(reference.EncoderLayer):
    def __init__(self, config: EncoderDecoderConfig, backend: Optional[str] = None) -> None:
        super().__init__(config)
        self.self_attn = MultiHeadAttention(config.d_model, config.n_head, config.dropout, backend)
        self.ffn = FeedForward(config.d_model, config.d_ff, backend)
        self.backend = backend

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        kv = self.self_attn.project_kv(x)                         # (B, NH, S, HS) each
        x = _add_norm(self.norm1, x, self.dropout(self.self_attn(x, kv, src_mask)), self.backend)
        return _add_norm(self.norm2, x, self.dropout(self.ffn(x)), self.backend)


class DecoderLayer(reference.DecoderLayer):
    def __init__(self, config: EncoderDecoderConfig, backend: Optional[str] = None) -> None:
        super().__init__(config)
        C, H, p = config.d_model, config.n_head, config.dropout
        self.self_attn = MultiHeadAttention(C, H, p, backend)
        self.cross_attn = MultiHeadAttention(C, H, p, backend)
        self.ffn = FeedForward(C, config.d_ff, backend)
        self.backend = backend

    def forward(self, x: Tensor, self_mask: Tensor, cross_kv: KV, cross_mask: Tensor,
                past: KV | None = None) -> tuple[Tensor, KV]:
        k, v = self.self_attn.project_kv(x)                       # (B, NH, T, HS) each
        if past is not None:
            k = torch.cat([past[0], k], dim=2)                    # (B, NH, P + T, HS)
            v = torch.cat([past[1], v], dim=2)
        b = self.backend
        x = _add_norm(self.norm1, x, self.dropout(self.self_attn(x, (k, v), self_mask)), b)
        x = _add_norm(self.norm2, x, self.dropout(self.cross_attn(x, cross_kv, cross_mask)), b)
        x = _add_norm(self.norm3, x, self.dropout(self.ffn(x)), b)
        return x, (k, v)


class EncoderDecoder(reference.EncoderDecoder):
    """fusedformer.reference.EncoderDecoder with fused layers (see the module docstring)."""

    def __init__(self, config: EncoderDecoderConfig, backend: Optional[str] = None) -> None:
        super().__init__(config)  # builds and initializes the reference layers
        self.backend = backend
        for stack, cls in ((self.encoder, EncoderLayer), (self.decoder, DecoderLayer)):
            fused = nn.ModuleList([cls(config, backend) for _ in stack.layers])
            for new, old in zip(fused, stack.layers):
                new.load_state_dict(old.state_dict())  # keep the reference's init exactly
            stack.layers = fused

    @classmethod
    def from_preset(cls, name: str, backend: Optional[str] = None, **overrides) -> "EncoderDecoder":
        config = config_from_preset(name, **overrides)
        if not isinstance(config, EncoderDecoderConfig):
            raise ValueError(f"preset {name!r} configures a GPT, not an EncoderDecoder")
        return cls(config, backend)
