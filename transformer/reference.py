"""
The reference Transformers of fusedformer: plain PyTorch, written to be read, the oracle of the
model layer. This file imports nothing from the rest of the package, so a bug in a fused kernel
can never hide behind the same bug here.

- `GPT`: the decoder-only language model in GPT-2's layout (learned positions, pre-LN blocks,
  exact-erf GELU MLP of width 4*C, tied token embedding and output head, GPT-2 parameter names),
  with a KV cache and greedy generation.
- `EncoderDecoder`: the 2017 Transformer ("Attention Is All You Need"): sinusoidal positions,
  post-LN Add & Norm after every sub-layer, ReLU FFN, shared embeddings, cross-attention with
  K/V from the final encoder output, padding masks from pad_token_id, label smoothing, greedy
  decoding from BOS to EOS with a KV cache.
- Helpers: `sinusoidal_positions`, `causal_mask`, `smoothed_targets`,
  `label_smoothed_cross_entropy`, and the `PRESETS` with `config_from_preset`.

Attention is written out, in the order the seeds give: scores = q @ k^T * (1 / sqrt(HS)), then
masked_fill(-inf), softmax over the keys, then @ v. Masks are bool with True = may attend. A
query row whose keys are all masked returns zeros (and zero gradients), never NaN. Causal
masks align bottom-right: with a KV cache the T new queries are the last T of the P + T keys,
so query i (absolute position P + i) sees keys j <= P + i. (F.scaled_dot_product_attention's
is_causal aligns top-left when Lq != Lk; for Lq == Lk the two agree.)

Return conventions: `GPT.forward` returns (logits, loss), and (logits, loss, past_key_values)
with use_cache=True, the cache a list of one (k, v) pair per layer. `EncoderDecoder.decode`
returns logits, and (logits, DecoderCache) with use_cache=True. Caches are never modified in
place: each call returns a new one.

Dimension names in the shape comments: B batch, T query / target length, S source length,
P cached (past) length, C model width, NH heads, HS head size (C // NH), V vocabulary size.
"""
import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KV",
    "GPTConfig",
    "GPT",
    "EncoderDecoderConfig",
    "EncoderDecoder",
    "DecoderCache",
    "PRESETS",
    "config_from_preset",
    "sinusoidal_positions",
    "causal_mask",
    "smoothed_targets",
    "label_smoothed_cross_entropy",
]

KV = tuple[Tensor, Tensor]
"""One attention layer's cached keys and values, each (B, NH, T, HS)."""

SmoothingKind = Literal["seed", "torch"]

IGNORE_INDEX = -100
"""Target value left out of every loss (PyTorch's default ignore_index)."""


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of the decoder-only `GPT` (GPT-2 layout).

    Attributes:
        vocab_size: number of token ids V.
        block_size: longest context; the size of the learned position table.
        n_layer: number of Transformer blocks.
        n_head: attention heads per block; must divide n_embd.
        n_embd: model width C.
        dropout: rate on the embeddings, the attention probabilities and each residual branch
            (active in training mode only).
        bias: biases in every Linear and LayerNorm (GPT-2: True).
        layer_norm_eps: epsilon inside the square root of every LayerNorm.
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_positive_ints(self, "vocab_size", "block_size", "n_layer", "n_head", "n_embd")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd must be divisible by n_head, "
                             f"got n_embd={self.n_embd}, n_head={self.n_head}")
        _check_rate("dropout", self.dropout)
        _check_positive_float("layer_norm_eps", self.layer_norm_eps)


@dataclass(frozen=True)
class EncoderDecoderConfig:
    """Hyperparameters of the `EncoderDecoder` (the 2017 Transformer).

    The defaults are the paper's base model. From the paper rather than the seeds: d_ff = 2048,
    dropout 0.1, the x sqrt(d_model) embedding scale and the three-way embedding sharing.

    Attributes:
        src_vocab_size, tgt_vocab_size: source and target vocabulary sizes (may be equal).
        d_model: model width C.
        n_head: attention heads; must divide d_model.
        n_encoder_layers, n_decoder_layers: depth of each stack.
        d_ff: hidden width of the position-wise ReLU FFN.
        dropout: rate on the embeddings, the attention probabilities and each sub-layer output
            before its residual add (training mode only).
        max_len: longest source or target sequence accepted. A sanity bound only: the
            sinusoidal encodings are computed for any length, nothing is sized by it.
        layer_norm_eps: epsilon inside the square root of every LayerNorm.
        share_embeddings: one weight matrix for the source embedding, the target embedding and
            the output projection; needs src_vocab_size == tgt_vocab_size.
        scale_embeddings: multiply token embeddings by sqrt(d_model) before adding positions.
        pad_token_id, bos_token_id, eos_token_id: distinct special ids, valid in both
            vocabularies.
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    n_head: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    max_len: int = 5000
    layer_norm_eps: float = 1e-5
    share_embeddings: bool = True
    scale_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        _check_positive_ints(self, "src_vocab_size", "tgt_vocab_size", "d_model", "n_head",
                             "n_encoder_layers", "n_decoder_layers", "d_ff", "max_len")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model must be divisible by n_head, "
                             f"got d_model={self.d_model}, n_head={self.n_head}")
        _check_rate("dropout", self.dropout)
        _check_positive_float("layer_norm_eps", self.layer_norm_eps)
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"share_embeddings=True needs src_vocab_size == tgt_vocab_size, got "
                             f"{self.src_vocab_size} and {self.tgt_vocab_size} "
                             f"(set share_embeddings=False for separate vocabularies)")
        special = {"pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
                   "eos_token_id": self.eos_token_id}
        smallest_vocab = min(self.src_vocab_size, self.tgt_vocab_size)
        for name, value in special.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if not 0 <= value < smallest_vocab:
                raise ValueError(f"{name} must be in [0, {smallest_vocab}) (valid in both "
                                 f"vocabularies), got {value}")
        if len(set(special.values())) != len(special):
            raise ValueError(f"pad_token_id, bos_token_id and eos_token_id must be distinct, "
                             f"got {special}")


# ---------------------------------------------------------------------------------------------
# Attention, masks, positions
# ---------------------------------------------------------------------------------------------


def causal_mask(t_q: int, t_k: int, device: torch.device | str | None = None) -> Tensor:
    """(t_q, t_k) bool mask, True where query i may attend to key j.

    The queries are the last t_q of the t_k key positions (bottom-right alignment, what a KV
    cache needs): query i sits at absolute position p = (t_k - t_q) + i and sees keys j <= p.
    With t_q == t_k this is the usual lower triangle: position 3 cannot see 4 and 5.
    """
    if t_q > t_k:
        raise ValueError(f"causal_mask needs t_q <= t_k (queries are the last t_q keys), "
                         f"got t_q={t_q}, t_k={t_k}")
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout: nn.Dropout) -> Tensor:
    """softmax(q @ k^T / sqrt(HS), masked) @ v, written out.

    q: (B, NH, Tq, HS); k, v: (B, NH, Tk, HS); mask: bool, broadcastable to (B, NH, Tq, Tk),
    True = attend. Returns (B, NH, Tq, HS). A query row with no key to attend to returns zeros
    and passes zero gradient, instead of softmax([-inf, ..., -inf]) = NaN.
    """
    scale = 1.0 / math.sqrt(q.size(-1))
    att = (q @ k.transpose(-2, -1)) * scale                       # (B, NH, Tq, Tk)
    att = att.masked_fill(~mask, float("-inf"))                   # (B, NH, Tq, Tk)
    has_key = mask.any(dim=-1, keepdim=True)                      # (B|1, NH|1, Tq, 1)
    # Fully masked rows get finite scores (uniform softmax), then are multiplied by 0.
    att = torch.softmax(att.masked_fill(~has_key, 0.0), dim=-1) * has_key
    att = dropout(att)
    return att @ v                                                # (B, NH, Tq, HS)


def _split_heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, C) -> (B, NH, T, HS)."""
    B, T, C = x.shape
    return x.view(B, T, n_head, C // n_head).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(B, NH, T, HS) -> (B, T, C)."""
    B, NH, T, HS = x.shape
    return x.transpose(1, 2).reshape(B, T, NH * HS)


def sinusoidal_positions(T: int, d_model: int, offset: int = 0, *,
                         device: torch.device | str | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """(T, d_model) sinusoidal encodings of the positions offset, ..., offset + T - 1.

        PE(pos, 2i)     = sin(pos / 10000^(2i / d_model))
        PE(pos, 2i + 1) = cos(pos / 10000^(2i / d_model))

    pos is the position and i indexes the (sin, cos) pair of dimensions, whose wavelengths run
    from 2*pi to 10000*2*pi. Any length works; there is no table. Computed in float64 so large
    positions keep full float32 accuracy, then cast to `dtype`. An odd d_model ends on a sine.
    """
    for name, value, low in (("T", T, 0), ("d_model", d_model, 1), ("offset", offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    pos = torch.arange(offset, offset + T, dtype=torch.float64, device=device)[:, None]  # (T, 1)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)  # (ceil(d_model/2),)
    angle = pos / 10000.0 ** (two_i / d_model)                    # (T, ceil(d_model/2))
    pe = torch.empty(T, d_model, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return pe.to(dtype)                                           # (T, d_model)


# ---------------------------------------------------------------------------------------------
# GPT (decoder-only)
# ---------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with GPT-2's fused QKV projection `c_attn` and output `c_proj`."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, mask: Tensor, past: KV | None = None) -> tuple[Tensor, KV]:
        """x: (B, T, C); mask: bool, broadcastable to (B, NH, T, P + T), True = attend;
        past: (k, v) of the P earlier positions, or None (P = 0).

        Returns y (B, T, C) and (k, v) of all P + T positions, each (B, NH, P + T, HS).
        """
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)        # 3 x (B, T, C)
        q = _split_heads(q, self.n_head)                          # (B, NH, T, HS)
        k = _split_heads(k, self.n_head)                          # (B, NH, T, HS)
        v = _split_heads(v, self.n_head)                          # (B, NH, T, HS)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)                    # (B, NH, P + T, HS)
            v = torch.cat([past[1], v], dim=2)                    # (B, NH, P + T, HS)
        y = _attention(q, k, v, mask, self.attn_dropout)          # (B, NH, T, HS)
        y = self.resid_dropout(self.c_proj(_merge_heads(y)))      # (B, T, C)
        return y, (k, v)


class MLP(nn.Module):
    """GPT-2's position-wise MLP: c_fc (C -> 4C), exact (erf) GELU, c_proj (4C -> C)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """A pre-LN GPT block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, mask: Tensor, past: KV | None = None) -> tuple[Tensor, KV]:
        """x: (B, T, C) -> (B, T, C), and this layer's (k, v) for all P + T positions."""
        a, kv = self.attn(self.ln_1(x), mask, past)
        x = x + a                                                 # (B, T, C)
        x = x + self.mlp(self.ln_2(x))                            # (B, T, C)
        return x, kv


class GPT(nn.Module):
    """Decoder-only Transformer language model in GPT-2's layout.

    Parameter names are GPT-2's (as in nanoGPT), so its state_dict lines up with GPT-2
    checkpoints once the Conv1D weights are transposed:

        transformer.wte            token embedding (V, C); lm_head.weight IS this tensor
        transformer.wpe            learned positions (block_size, C)
        transformer.drop           embedding dropout
        transformer.h.{i}.ln_1     LayerNorm before attention
        transformer.h.{i}.attn.c_attn, .attn.c_proj   Linear C -> 3C (q, k, v in that order), C -> C
        transformer.h.{i}.ln_2     LayerNorm before the MLP
        transformer.h.{i}.mlp.c_fc, .mlp.c_proj       Linear C -> 4C, 4C -> C
        transformer.ln_f           final LayerNorm
        lm_head                    Linear C -> V, no bias, tied to transformer.wte

    Init is GPT-2's: normal(0, 0.02) for Linear and Embedding weights, zero biases, and
    normal(0, 0.02 / sqrt(2 * n_layer)) for every c_proj weight (one per residual add).

    Call conventions:
        logits, loss = model(idx, targets)
        logits, loss, past = model(idx, use_cache=True)            # prefill
        logits, loss, past = model(next_idx, past_key_values=past, use_cache=True)
    The cache is a list with one (k, v) pair per layer, each (B, NH, P, HS); every call returns
    a new list, the old one is not modified.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight         # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPT":
        """A freshly initialised GPT of the preset `name` (see PRESETS), with config overrides."""
        config = config_from_preset(name, **overrides)
        if not isinstance(config, GPTConfig):
            known = [n for n, c in PRESETS.items() if isinstance(c, GPTConfig)]
            raise ValueError(f"preset {name!r} configures an EncoderDecoder, not a GPT; "
                             f"GPT presets: {', '.join(known)}")
        return cls(config)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: list[KV] | None = None,
        use_cache: bool = False,
    ) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, list[KV]]:
        """Next-token logits (and loss) for `idx`, continuing after `past_key_values` if given.

        Args:
            idx: (B, T) int64 token ids at positions P, ..., P + T - 1, where P is the cached
                length (0 without a cache); P + T <= block_size.
            targets: (B, T) int64 next-token ids; positions holding -100 are left out of the loss.
            attention_mask: (B, P + T) bool key-padding mask over every key position, the cached
                ones included; True = real token. Combined with the causal mask. Positions are
                not shifted, so pad on the right.
            past_key_values: the cache returned by an earlier call with use_cache=True.
            use_cache: also return the cache covering all P + T positions.

        Returns:
            (logits, loss): logits (B, T, V); loss the mean cross-entropy over non-ignored
            targets, or None without targets. With use_cache=True, (logits, loss,
            past_key_values), the cache a list of n_layer (k, v), each (B, NH, P + T, HS).
        """
        cfg = self.config
        _check_tokens("idx", idx, cfg.vocab_size, self.lm_head.weight.device)
        B, T = idx.shape
        P = _check_kv_list("past_key_values", past_key_values, cfg.n_layer,
                           (B, cfg.n_head, cfg.n_embd // cfg.n_head))
        if P + T > cfg.block_size:
            raise ValueError(f"sequence too long: {P} cached + {T} new positions exceed "
                             f"block_size={cfg.block_size}")
        if targets is not None:
            _check_targets("targets", targets, "idx", idx)
        if attention_mask is not None:
            _check_bool_mask("attention_mask", attention_mask, (B, P + T),
                             "(B, P + T): one flag per key, cached ones included", idx.device)

        pos = torch.arange(P, P + T, device=idx.device)           # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        mask = causal_mask(T, P + T, device=idx.device)            # (T, P + T)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :]         # (B, 1, T, P + T)
        present = []
        for i, block in enumerate(self.transformer.h):
            past = None if past_key_values is None else past_key_values[i]
            x, kv = block(x, mask, past)                           # (B, T, C)
            present.append(kv)
        x = self.transformer.ln_f(x)                               # (B, T, C)
        logits = self.lm_head(x)                                   # (B, T, V)

        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T),
                                   ignore_index=IGNORE_INDEX)
        if use_cache:
            return logits, loss, present
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, use_cache: bool = True,
                 eos_token_id: int | None = None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continuation of the prompts `idx`: greedy (argmax) by default, sampled with
        temperature > 0 (optionally restricted to the top_k tokens and/or the top_p nucleus;
        see next_token).

        Args:
            idx: (B, T) int64 prompts, all of length T (no padding).
            max_new_tokens: the most tokens to append.
            use_cache: feed one token per step against a KV cache. The whole sequence must then
                fit: T + max_new_tokens - 1 <= block_size, else ValueError. Without the cache
                every step recomputes the prefix, cropped to its last block_size tokens, so any
                length works. Both give the same tokens while nothing is cropped.
            eos_token_id: a row that emits it is finished and is padded with it from then on;
                generation stops early once every row is finished.
            temperature, top_k, top_p, generator: sampling (see next_token).

        Returns:
            (B, T + n) int64, the prompts followed by n <= max_new_tokens generated tokens.

        Dropout is active in training mode: call model.eval() for deterministic output.
        """
        cfg = self.config
        _check_tokens("idx", idx, cfg.vocab_size, self.lm_head.weight.device)
        _check_count("max_new_tokens", max_new_tokens)
        if eos_token_id is not None:
            _check_token_id("eos_token_id", eos_token_id, cfg.vocab_size)
        T = idx.size(1)
        if use_cache and T + max_new_tokens - 1 > cfg.block_size:
            raise ValueError(f"use_cache=True needs the whole sequence to fit in block_size="
                             f"{cfg.block_size}, got prompt length {T} + max_new_tokens="
                             f"{max_new_tokens} - 1; pass use_cache=False to crop the context")

        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,)
        past = None
        step_input = idx
        for _ in range(max_new_tokens):
            if use_cache:
                logits, _, past = self(step_input, past_key_values=past, use_cache=True)
            else:
                logits, _ = self(idx[:, -cfg.block_size:])
            next_tok = next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B,)
            if eos_token_id is not None:
                next_tok = next_tok.masked_fill(finished, eos_token_id)
                finished |= next_tok == eos_token_id
            step_input = next_tok[:, None]                         # (B, 1)
            idx = torch.cat([idx, step_input], dim=1)              # (B, T + 1)
            if finished.all():
                break
        return idx


def next_token(logits: Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Pick the next token from (B, V) logits: argmax when temperature == 0, else a sample
    from softmax(logits / temperature) restricted to the top_k most likely tokens and to the
    smallest set whose probability reaches top_p (nucleus; the most likely token always
    stays). Returns (B,) int64."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a float in (0, 1] or None, got {top_p!r}")
    if temperature == 0:
        return logits.argmax(dim=-1)                               # (B,)
    logits = logits.float() / temperature                          # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]            # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs                      # mass of the better tokens
        drop_sorted = before >= top_p                              # never drops the best token
        drop = drop_sorted.scatter(-1, order, drop_sorted)         # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)                                 # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


# ---------------------------------------------------------------------------------------------
# EncoderDecoder (the 2017 Transformer)
# ---------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q, k, v projections (self- or cross-attention).

    The queries come from `x`; keys and values from `project_kv(x_kv)`, which callers may cache
    (the decoder's growing self-attention K/V, and the cross-attention K/V of the memory).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)

    def project_kv(self, x_kv: Tensor) -> KV:
        """x_kv: (B, S, C) -> (k, v), each (B, NH, S, HS)."""
        return (_split_heads(self.k_proj(x_kv), self.n_head),
                _split_heads(self.v_proj(x_kv), self.n_head))

    def forward(self, x: Tensor, kv: KV, mask: Tensor) -> Tensor:
        """x: (B, T, C) queries; kv: (k, v) from project_kv, each (B, NH, S, HS); mask: bool,
        broadcastable to (B, NH, T, S), True = attend. Returns (B, T, C)."""
        q = _split_heads(self.q_proj(x), self.n_head)             # (B, NH, T, HS)
        y = _attention(q, kv[0], kv[1], mask, self.attn_dropout)   # (B, NH, T, HS)
        return self.out_proj(_merge_heads(y))                     # (B, T, C)


class FeedForward(nn.Module):
    """The position-wise FFN of the paper: fc2(max(0, fc1(x))), C -> d_ff -> C."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.fc2(F.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Post-LN encoder layer: x = norm1(x + drop(self_attn(x))); x = norm2(x + drop(ffn(x)))."""

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        C, eps = config.d_model, config.layer_norm_eps
        self.self_attn = MultiHeadAttention(C, config.n_head, config.dropout)
        self.norm1 = nn.LayerNorm(C, eps=eps)
        self.ffn = FeedForward(C, config.d_ff)
        self.norm2 = nn.LayerNorm(C, eps=eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        """x: (B, S, C); src_mask: bool (B, 1, 1, S), True = real source token. -> (B, S, C)."""
        kv = self.self_attn.project_kv(x)                         # (B, NH, S, HS) each
        x = self.norm1(x + self.dropout(self.self_attn(x, kv, src_mask)))
        x = self.norm2(x + self.dropout(self.ffn(x)))
        return x


class DecoderLayer(nn.Module):
    """Post-LN decoder layer: masked self-attention, cross-attention over the encoder output,
    FFN; each followed by Add & Norm (norm1, norm2, norm3)."""

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        C, eps = config.d_model, config.layer_norm_eps
        self.self_attn = MultiHeadAttention(C, config.n_head, config.dropout)
        self.norm1 = nn.LayerNorm(C, eps=eps)
        self.cross_attn = MultiHeadAttention(C, config.n_head, config.dropout)
        self.norm2 = nn.LayerNorm(C, eps=eps)
        self.ffn = FeedForward(C, config.d_ff)
        self.norm3 = nn.LayerNorm(C, eps=eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, self_mask: Tensor, cross_kv: KV, cross_mask: Tensor,
                past: KV | None = None) -> tuple[Tensor, KV]:
        """x: (B, T, C) targets at positions P..P+T-1; self_mask: bool (B, 1, T, P + T);
        cross_kv: the memory's (k, v), each (B, NH, S, HS); cross_mask: bool (B, 1, 1, S);
        past: this layer's self-attention (k, v) of the P earlier positions, or None.

        Returns x (B, T, C) and the self-attention (k, v), each (B, NH, P + T, HS).
        """
        k, v = self.self_attn.project_kv(x)                       # (B, NH, T, HS) each
        if past is not None:
            k = torch.cat([past[0], k], dim=2)                    # (B, NH, P + T, HS)
            v = torch.cat([past[1], v], dim=2)                    # (B, NH, P + T, HS)
        x = self.norm1(x + self.dropout(self.self_attn(x, (k, v), self_mask)))
        x = self.norm2(x + self.dropout(self.cross_attn(x, cross_kv, cross_mask)))
        x = self.norm3(x + self.dropout(self.ffn(x)))
        return x, (k, v)


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s (post-LN: no final norm)."""

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.n_encoder_layers)])

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        """x: (B, S, C); src_mask: bool (B, 1, 1, S). -> (B, S, C)."""
        for layer in self.layers:
            x = layer(x, src_mask)
        return x


class Decoder(nn.Module):
    """A stack of `DecoderLayer`s (post-LN: no final norm)."""

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.n_decoder_layers)])

    def forward(self, x: Tensor, self_mask: Tensor, cross_kv: list[KV], cross_mask: Tensor,
                past: list[KV] | None = None) -> tuple[Tensor, list[KV]]:
        """x: (B, T, C); masks and per-layer K/V as in `DecoderLayer`.

        Returns x (B, T, C) and each layer's self-attention (k, v), each (B, NH, P + T, HS).
        """
        self_kv = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, self_mask, cross_kv[i], cross_mask, None if past is None else past[i])
            self_kv.append(kv)
        return x, self_kv


class DecoderCache(NamedTuple):
    """What `EncoderDecoder.decode` carries from one step to the next.

    Attributes:
        self_kv: per decoder layer, the self-attention (k, v) of the P decoded positions,
            each (B, NH, P, HS).
        cross_kv: per decoder layer, the cross-attention (k, v) of the encoder output, each
            (B, NH, S, HS); computed once, on the first call.
        tgt_mask: (B, P) bool, True where the decoded token is not padding, so cached pad keys
            stay masked.
    """

    self_kv: list[KV]
    cross_kv: list[KV]
    tgt_mask: Tensor


class EncoderDecoder(nn.Module):
    """The 2017 encoder-decoder Transformer (post-LN, ReLU FFN, sinusoidal positions).

    Input embedding: x = Embedding(tokens) * sqrt(d_model) (if scale_embeddings) + PE, then
    dropout. Every sub-layer is wrapped as x = LayerNorm(x + Dropout(Sublayer(x))). Padding
    masks come from pad_token_id: source pad keys are masked in the encoder self-attention and
    in the cross-attention; target pad keys (with the causal mask) in the decoder
    self-attention. The cross-attention takes Q from the decoder, K and V from the final
    encoder output.

    Parameter names:

        src_embed, tgt_embed       nn.Embedding (V_src, C), (V_tgt, C)
        lm_head                    Linear C -> V_tgt, no bias
                                   (share_embeddings: all three are ONE tensor)
        encoder.layers.{i}.self_attn.{q_proj,k_proj,v_proj,out_proj}   Linear C -> C
        encoder.layers.{i}.norm1, .ffn.fc1 (C -> d_ff), .ffn.fc2 (d_ff -> C), .norm2
        decoder.layers.{i}.self_attn.{q_proj,k_proj,v_proj,out_proj}, .norm1
        decoder.layers.{i}.cross_attn.{q_proj,k_proj,v_proj,out_proj}, .norm2
        decoder.layers.{i}.ffn.fc1, .ffn.fc2, .norm3

    Init: Xavier-uniform Linear weights, zero biases, LayerNorm (1, 0), embeddings
    normal(0, d_model^-0.5), so scaled embeddings have unit variance like the encodings.

    Call conventions:
        logits, loss = model(src, tgt_in, targets)                 # teacher forcing
        memory, src_mask = model.encode(src)
        logits = model.decode(tgt_in, memory, src_mask)
        logits, cache = model.decode(tgt_step, memory, src_mask, past=cache, use_cache=True)
        tokens = model.greedy_decode(src, max_len)
    """

    def __init__(self, config: EncoderDecoderConfig) -> None:
        super().__init__()
        if not isinstance(config, EncoderDecoderConfig):
            raise TypeError(f"config must be an EncoderDecoderConfig, got {type(config).__name__}")
        self.config = config
        C = config.d_model
        self.src_embed = nn.Embedding(config.src_vocab_size, C)
        self.tgt_embed = nn.Embedding(config.tgt_vocab_size, C)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.lm_head = nn.Linear(C, config.tgt_vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.src_embed.weight, mean=0.0, std=C ** -0.5)
        nn.init.normal_(self.tgt_embed.weight, mean=0.0, std=C ** -0.5)
        if config.share_embeddings:
            self.tgt_embed.weight = self.src_embed.weight
            self.lm_head.weight = self.src_embed.weight

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "EncoderDecoder":
        """A freshly initialised model of the preset `name` (see PRESETS), with config overrides."""
        config = config_from_preset(name, **overrides)
        if not isinstance(config, EncoderDecoderConfig):
            known = [n for n, c in PRESETS.items() if isinstance(c, EncoderDecoderConfig)]
            raise ValueError(f"preset {name!r} configures a GPT, not an EncoderDecoder; "
                             f"EncoderDecoder presets: {', '.join(known)}")
        return cls(config)

    def _embed(self, tokens: Tensor, table: nn.Embedding, offset: int) -> Tensor:
        """(B, T) ids at positions offset..offset+T-1 -> (B, T, C) embeddings + positions."""
        C = self.config.d_model
        x = table(tokens)                                          # (B, T, C)
        if self.config.scale_embeddings:
            x = x * math.sqrt(C)
        x = x + sinusoidal_positions(tokens.size(1), C, offset, device=x.device, dtype=x.dtype)
        return self.drop(x)                                        # (B, T, C)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Run the encoder.

        Args:
            src: (B, S) int64 source ids, padded with pad_token_id (anywhere).

        Returns:
            memory (B, S, C), the final encoder output, and src_mask (B, S) bool, True where
            src is not padding. A row that is all padding gives finite memory.
        """
        cfg = self.config
        _check_tokens("src", src, cfg.src_vocab_size, self.lm_head.weight.device)
        _check_length("src", src.size(1), cfg.max_len)
        src_mask = src != cfg.pad_token_id                         # (B, S)
        x = self._embed(src, self.src_embed, 0)                    # (B, S, C)
        memory = self.encoder(x, src_mask[:, None, None, :])       # (B, S, C)
        return memory, src_mask

    def decode(
        self,
        tgt_in: Tensor,
        memory: Tensor,
        src_mask: Tensor,
        past: DecoderCache | None = None,
        use_cache: bool = False,
    ) -> Tensor | tuple[Tensor, DecoderCache]:
        """Run the decoder on `tgt_in`, continuing after `past` if given.

        Args:
            tgt_in: (B, T) int64 target ids at positions P..P+T-1 (P = cached length, 0 without
                a cache), padded with pad_token_id on the right.
            memory: (B, S, C) from `encode`. Read only when past is None: a cache already holds
                the cross-attention K/V.
            src_mask: (B, S) bool from `encode`, True = real source token.
            past: the cache returned by an earlier call with use_cache=True.
            use_cache: also return the cache covering all P + T positions.

        Returns:
            logits (B, T, V_tgt); with use_cache=True, (logits, cache) with cache a DecoderCache.
        """
        cfg = self.config
        C, NH = cfg.d_model, cfg.n_head
        device = self.lm_head.weight.device
        _check_tokens("tgt_in", tgt_in, cfg.tgt_vocab_size, device)
        B, T = tgt_in.shape
        _check_float_tensor("memory", memory, device)
        if memory.dim() != 3 or memory.size(0) != B or memory.size(2) != C:
            raise ValueError(f"memory must have shape (B, S, C) = ({B}, S, {C}) to match tgt_in "
                             f"(the output of encode), got {tuple(memory.shape)}")
        S = memory.size(1)
        _check_bool_mask("src_mask", src_mask, (B, S), "(B, S) (from encode)", device)
        if past is None:
            P = 0
            cross_kv = [layer.cross_attn.project_kv(memory) for layer in self.decoder.layers]
            tgt_mask = tgt_in != cfg.pad_token_id                  # (B, T)
        else:
            if not isinstance(past, DecoderCache):
                raise TypeError(f"past must be a DecoderCache (from decode(..., use_cache=True)), "
                                f"got {type(past).__name__}")
            P = _check_kv_list("past.self_kv", past.self_kv, cfg.n_decoder_layers, (B, NH, C // NH))
            if _check_kv_list("past.cross_kv", past.cross_kv, cfg.n_decoder_layers,
                              (B, NH, C // NH)) != S:
                raise ValueError(f"past.cross_kv must cover the S={S} source positions of "
                                 f"src_mask, got {past.cross_kv[0][0].size(2)}")
            _check_bool_mask("past.tgt_mask", past.tgt_mask, (B, P), "(B, P)", device)
            cross_kv = past.cross_kv
            tgt_mask = torch.cat([past.tgt_mask, tgt_in != cfg.pad_token_id], dim=1)  # (B, P + T)
        _check_length("tgt_in", P + T, cfg.max_len)

        self_mask = causal_mask(T, P + T, device=device)           # (T, P + T)
        self_mask = self_mask & tgt_mask[:, None, None, :]         # (B, 1, T, P + T)
        cross_mask = src_mask[:, None, None, :]                    # (B, 1, 1, S)
        x = self._embed(tgt_in, self.tgt_embed, P)                 # (B, T, C)
        x, self_kv = self.decoder(x, self_mask, cross_kv, cross_mask,
                                  None if past is None else past.self_kv)  # (B, T, C)
        logits = self.lm_head(x)                                   # (B, T, V_tgt)
        if use_cache:
            return logits, DecoderCache(self_kv, cross_kv, tgt_mask)
        return logits

    def forward(
        self,
        src: Tensor,
        tgt_in: Tensor,
        targets: Tensor | None = None,
        label_smoothing: float = 0.0,
        smoothing: SmoothingKind = "seed",
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced logits (and loss).

        Args:
            src: (B, S) int64 source ids, padded with pad_token_id.
            tgt_in: (B, T) int64 decoder input, the targets shifted right: BOS, y_1, ..., pads.
            targets: (B, T) int64 gold next tokens: y_1, ..., EOS, pads. Positions holding
                pad_token_id or -100 are left out of the loss.
            label_smoothing: epsilon of the smoothed targets (0 = plain cross-entropy).
            smoothing: "seed" or "torch", see `smoothed_targets`.

        Returns:
            (logits, loss): logits (B, T, V_tgt); loss the mean smoothed cross-entropy over
            the counted positions, or None without targets.
        """
        memory, src_mask = self.encode(src)
        logits = self.decode(tgt_in, memory, src_mask)             # (B, T, V_tgt)
        loss = None
        if targets is not None:
            _check_targets("targets", targets, "tgt_in", tgt_in)
            targets = targets.masked_fill(targets == self.config.pad_token_id, IGNORE_INDEX)
            loss = label_smoothed_cross_entropy(logits, targets, label_smoothing, kind=smoothing)
        return logits, loss

    @torch.no_grad()
    def greedy_decode(self, src: Tensor, max_len: int, use_cache: bool = True) -> Tensor:
        """Greedy (argmax) translation of `src`, from BOS until EOS or max_len new tokens.

        Args:
            src: (B, S) int64 source ids, padded with pad_token_id.
            max_len: the most tokens to generate after BOS (at most config.max_len).
            use_cache: decode one token per step against a cache of the decoder
                self-attention K/V (cross-attention K/V are computed once either way);
                without it every step recomputes the whole prefix. Both give the same tokens.

        Returns:
            (B, 1 + n) int64: BOS, then n <= max_len tokens. A row that has emitted EOS is
            padded with pad_token_id from then on; decoding stops once every row has.

        Dropout is active in training mode: call model.eval() for deterministic output.
        """
        cfg = self.config
        _check_count("max_len", max_len)
        _check_length("max_len", max_len, cfg.max_len)
        memory, src_mask = self.encode(src)                        # (B, S, C), (B, S)
        B = src.size(0)
        ys = torch.full((B, 1), cfg.bos_token_id, dtype=torch.long, device=src.device)  # (B, 1)
        finished = torch.zeros(B, dtype=torch.bool, device=src.device)  # (B,)
        cache = None
        for _ in range(max_len):
            if use_cache:
                logits, cache = self.decode(ys[:, -1:], memory, src_mask, past=cache,
                                            use_cache=True)
            else:
                logits = self.decode(ys, memory, src_mask)
            next_tok = logits[:, -1, :].argmax(dim=-1)             # (B,)
            next_tok = next_tok.masked_fill(finished, cfg.pad_token_id)
            finished |= next_tok == cfg.eos_token_id
            ys = torch.cat([ys, next_tok[:, None]], dim=1)         # (B, 1 + n)
            if finished.all():
                break
        return ys


# ---------------------------------------------------------------------------------------------
# Label smoothing
# ---------------------------------------------------------------------------------------------


def smoothed_targets(targets: Tensor, num_classes: int, epsilon: float,
                     kind: SmoothingKind = "seed", dtype: torch.dtype = torch.float32) -> Tensor:
    """The label-smoothed target distribution of each class index in `targets`.

    kind="seed" (the seeds' and the paper's form): 1 - eps on the gold class and
        eps / (V - 1) on each of the V - 1 others.
    kind="torch" (PyTorch's `label_smoothing`): the one-hot mixed with the uniform
        distribution, 1 - eps + eps / V on the gold class and eps / V on every other.

    For eps = 0.1, V = 3 and gold class 0: seed [0.9, 0.05, 0.05], torch [0.9333, 0.0333,
    0.0333]. Both rows sum to 1; the seed form moves exactly eps of mass off the gold class.

    Args:
        targets: (...) int64 class indices in [0, num_classes).
        num_classes: V (at least 2 for kind="seed" with eps > 0).
        epsilon: in [0, 1].
    Returns:
        (..., V) tensor of `dtype`.
    """
    _check_smoothing(num_classes, epsilon, kind)
    _check_class_ids("targets", targets, num_classes)
    if kind == "seed":
        off = epsilon / (num_classes - 1) if num_classes > 1 else 0.0
        on = 1.0 - epsilon
    else:
        off = epsilon / num_classes
        on = 1.0 - epsilon + epsilon / num_classes
    q = torch.full((*targets.shape, num_classes), off, dtype=dtype, device=targets.device)
    return q.scatter_(-1, targets.unsqueeze(-1), on)               # (..., V)


def label_smoothed_cross_entropy(logits: Tensor, targets: Tensor, epsilon: float,
                                 ignore_index: int = IGNORE_INDEX,
                                 kind: SmoothingKind = "seed") -> Tensor:
    """Mean cross-entropy of `logits` against label-smoothed targets.

        loss = mean over counted positions n of  -sum_v q[n, v] * log_softmax(logits[n])[v]

    with q = smoothed_targets(targets, V, epsilon, kind). This is the KL divergence KL(q || p)
    plus the constant entropy H(q). With kind="torch" it equals
    F.cross_entropy(logits, targets, ignore_index=ignore_index, label_smoothing=epsilon); with
    epsilon = 0 both kinds are the plain cross-entropy.

    Args:
        logits: (..., V) float scores; computed in float32.
        targets: (...) int64 class ids in [0, V), or ignore_index for positions not counted.
        epsilon: smoothing mass in [0, 1].
        ignore_index: target value left out of the mean.
        kind: "seed" or "torch", see `smoothed_targets`.
    Returns:
        A float32 scalar (NaN when no position is counted, as F.cross_entropy).
    """
    _check_float_tensor("logits", logits, None)
    if logits.dim() < 1:
        raise ValueError("logits must have a class dimension (..., V), got a 0-D tensor")
    V = logits.size(-1)
    _check_smoothing(V, epsilon, kind)
    _check_targets("targets", targets, "logits without its last dimension", logits[..., 0])
    logits = logits.reshape(-1, V)                                 # (N, V)
    targets = targets.reshape(-1)                                  # (N,)
    counted = targets != ignore_index                              # (N,)
    q = smoothed_targets(targets[counted], V, epsilon, kind)        # (N', V)
    log_p = F.log_softmax(logits[counted].float(), dim=-1)         # (N', V)
    return -(q * log_p).sum(dim=-1).mean()


# ---------------------------------------------------------------------------------------------
# Input checks: each message names the argument, what was expected and what came.
# ---------------------------------------------------------------------------------------------


def _check_positive_ints(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _check_rate(name: str, p: object) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")


def _check_positive_float(name: str, x: object) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
        raise ValueError(f"{name} must be a positive float, got {x!r}")


def _check_smoothing(num_classes: int, epsilon: object, kind: object) -> None:
    if kind not in ("seed", "torch"):
        raise ValueError(f"smoothing kind must be 'seed' or 'torch', got {kind!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        raise TypeError(f"label smoothing epsilon must be a float in [0, 1], "
                        f"got {type(epsilon).__name__}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"label smoothing epsilon must be in [0, 1], got {epsilon}")
    if kind == "seed" and epsilon > 0 and num_classes < 2:
        raise ValueError(f"seed label smoothing spreads epsilon over V - 1 classes and needs "
                         f"V >= 2, got V={num_classes}")


def _check_count(name: str, n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be an int >= 0, got {n!r}")


def _check_length(name: str, length: int, max_len: int) -> None:
    if length > max_len:
        raise ValueError(f"{name} is too long: {length} positions exceed config.max_len={max_len}")


def _check_token_id(name: str, token: object, vocab_size: int) -> None:
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
        raise ValueError(f"{name} must be an int in [0, {vocab_size}), got {token!r}")


def _check_class_ids(name: str, ids: object, num_classes: int) -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype != torch.long:
        raise TypeError(f"{name} must be int64 (torch.long) ids, got {ids.dtype}")
    # The range check reads the values (a device sync, data-dependent): skipped while
    # torch.compile traces, where it would force a graph break.
    if not torch.compiler.is_compiling() and ids.numel() and ids.device.type != "meta":
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} must hold ids in [0, {num_classes}), "
                             f"got values in [{low}, {high}]")


def _check_tokens(name: str, idx: object, vocab_size: int, device: torch.device) -> None:
    """idx is a (B, T) int64 tensor of ids in [0, vocab_size) on `device`, with T >= 1."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype != torch.long:
        raise TypeError(f"{name} must be int64 (torch.long) token ids, got {idx.dtype}")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"{name} must be 2-D (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"{name} must be on the model's device {device}, got {idx.device}")
    _check_class_ids(name, idx, vocab_size)


def _check_targets(name: str, targets: object, ref_name: str, ref: Tensor) -> None:
    if not isinstance(targets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype != torch.long:
        raise TypeError(f"{name} must be int64 (torch.long) ids, got {targets.dtype}")
    if targets.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(targets.shape)}")
    if targets.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {targets.device}")


def _check_bool_mask(name: str, mask: object, shape: tuple[int, ...], layout: str,
                     device: torch.device) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be bool (True = real token), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} {layout}, "
                         f"got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on the model's device {device}, got {mask.device}")


def _check_float_tensor(name: str, x: object, device: torch.device | None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on the model's device {device}, got {x.device}")


def _check_kv_list(name: str, cache: object, n_layers: int, bh_hs: tuple[int, int, int]) -> int:
    """cache is None or n_layers (k, v) pairs of shape (B, NH, P, HS) with one P; returns P."""
    if cache is None:
        return 0
    if not isinstance(cache, (list, tuple)) or len(cache) != n_layers:
        got = f"{type(cache).__name__} of length {len(cache)}" if isinstance(
            cache, (list, tuple)) else type(cache).__name__
        raise ValueError(f"{name} must be a list of {n_layers} (k, v) pairs, one per layer, "
                         f"got {got}")
    B, NH, HS = bh_hs
    first = cache[0][0] if isinstance(cache[0], (list, tuple)) and cache[0] else None
    P = first.size(2) if isinstance(first, Tensor) and first.dim() == 4 else -1
    expected = (B, NH, P, HS)
    for i, kv in enumerate(cache):
        ok = (isinstance(kv, (list, tuple)) and len(kv) == 2
              and all(isinstance(t, Tensor) and tuple(t.shape) == expected for t in kv))
        if not ok:
            got = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                   for t in kv] if isinstance(kv, (list, tuple)) else type(kv).__name__
            want = f"(B={B}, NH={NH}, P, HS={HS})" if P < 0 else str(expected)
            raise ValueError(f"{name}[{i}] must be a (k, v) pair of shape {want} with the same "
                             f"P in every layer, got {got}")
    return P


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


PRESETS: dict[str, GPTConfig | EncoderDecoderConfig] = {
    # GPT-2 small. 124,439,808 parameters with the tied head (nanoGPT reports 123.65M: it leaves
    # out the 786,432 position parameters). Dropout 0 as in nanoGPT; GPT-2 trained with 0.1.
    "gpt2-124m": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # Byte-level and small: trains a few hundred steps on 2 CPU cores in well under a minute.
    "gpt-tiny": GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64),
    # The paper's base model (d_k = d_v = 64) with one shared 32k vocabulary.
    "transformer-base": EncoderDecoderConfig(
        src_vocab_size=32000, tgt_vocab_size=32000, d_model=512, n_head=8,
        n_encoder_layers=6, n_decoder_layers=6, d_ff=2048, dropout=0.1),
    # For tests and demos: trains to copy short sequences in seconds on a CPU.
    "transformer-tiny": EncoderDecoderConfig(
        src_vocab_size=64, tgt_vocab_size=64, d_model=32, n_head=4,
        n_encoder_layers=2, n_decoder_layers=2, d_ff=128, dropout=0.0),
}


def config_from_preset(name: str, **overrides) -> GPTConfig | EncoderDecoderConfig:
    """A copy of the preset config `name` with `overrides` applied (e.g. dropout=0.0).

    Raises ValueError for an unknown name, listing the known ones; TypeError for an override
    that is not a field of that config.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
