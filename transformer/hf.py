"""Hugging Face transformers integration: fusedformer as an attention implementation.

    import fusedformer
    fusedformer.register_hf_attention()                      # once, after installing transformers
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="fusedformer")

The attention function receives what HF hands to its SDPA path (q, k, v as (B, H, L, D), an
SDPA-style mask: bool True = attend, or additive float, or None for plain causal) and runs
fusedformer.attention; GQA models pass their fewer KV heads straight through (no repeat_kv).
The mask builder is HF's own SDPA one, registered under the same name.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .kernels.ops import attention

NAME = "fusedformer"


def fusedformer_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                                  attention_mask: Optional[Tensor], dropout: float = 0.0,
                                  scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                                  backend: Optional[str] = None, **kwargs) -> tuple[Tensor, None]:
    """HF attention-interface entry point: returns ((B, L, H, D) output, no weights)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("fusedformer attention does not support softcap; use attn_implementation='eager'")
    if kwargs.get("position_bias") is not None:
        raise ValueError("fusedformer attention does not support position_bias; use attn_implementation='sdpa'")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    # HF passes no mask when plain causal attention suffices (its SDPA mask builder skips it).
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and kv_len > q_len:
        # Prefill into an empty static cache: keys past the queries are unwritten and, with
        # top-left causal alignment, never attended. Crop them as HF's SDPA path does.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    if attention_mask is not None and attention_mask.dtype not in (torch.bool, query.dtype):
        attention_mask = attention_mask.to(query.dtype)
    out = attention(query, key, value, attention_mask, dropout, is_causal, scaling,
                    enable_gqa=key.shape[1] != query.shape[1], backend=backend)  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None                             # (B, L, H, D)


def register_hf_attention(name: str = NAME) -> str:
    """Register fusedformer with transformers' AttentionInterface (and HF's SDPA mask builder
    under the same name). Returns the name to pass as attn_implementation."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError as e:
        raise ImportError("register_hf_attention needs the `transformers` package") from e
    AttentionInterface.register(name, fusedformer_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name
