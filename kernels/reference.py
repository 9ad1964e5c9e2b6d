"""Reference (oracle) implementations of every fused op in ``fusedformer``.

This module is plain PyTorch math written for clarity, not speed. It serves two
purposes:

* it is the **test oracle** -- the fused Triton/CUDA kernels are checked against
  these functions (usually called with fp64 inputs to obtain the "truth");
* it is the **documentation** of what each op means: mask conventions, the order
  of operations, dropout scaling, what happens to fully masked rows, ...

Conventions shared by all functions:

* ``upcast`` (keyword, default ``False``): when ``True`` and the inputs are fp16
  or bf16, everything is computed in fp32 and the result is cast back to the
  input dtype. fp32/fp64 inputs are always computed in their own dtype. With
  ``upcast=False`` the computation happens in the input dtype, i.e. it carries
  "PyTorch's own same-dtype error", which is a fair yardstick for a fused
  kernel's low-precision error.
* Boolean masks use the ``torch.nn.functional.scaled_dot_product_attention``
  convention: ``True`` means "attend / keep". Float masks are *added* to the
  scaled logits (``-inf`` masks a position out).
* Causal masks are top-left aligned lower triangles: query ``i`` sees key ``j``
  iff ``j <= i``, also when ``Lq != Lk`` (``torch.ones(Lq, Lk).tril()``).
* A row whose keys are *all* masked out produces an output of 0 and zero
  gradients -- never NaN.
* Dropout: either an explicit boolean keep-mask ``dropout_mask`` is given
  (kept values are scaled by ``1 / (1 - dropout_p)``), or, when ``dropout_p > 0``,
  a keep-mask is drawn as ``torch.rand(shape, generator=generator) < 1 - dropout_p``
  (the uniform numbers are always drawn in fp32, so a given generator state
  yields the same mask whatever the compute dtype).

The module imports only ``torch``, ``math`` and ``typing``; nothing runs at import.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "ACTIVATIONS",
    "attention_ref",
    "scaled_masked_softmax_ref",
    "layer_norm_ref",
    "ffn_ref",
]

#: Activations understood by :func:`ffn_ref` (and the fused FFN kernels).
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "gelu_tanh", "swiglu")


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    generator: Optional[torch.Generator] = None,
    dropout_mask: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    upcast: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Scaled dot-product attention, with the semantics of
    ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        q: queries ``(..., Hq, Lq, D)``.
        k: keys ``(..., Hkv, Lk, D)``.
        v: values ``(..., Hkv, Lk, Dv)``.
        attn_mask: optional mask broadcastable to ``(..., Hq, Lq, Lk)``; bool
            (``True`` = attend) or float (added to the scaled logits).
        dropout_p: dropout probability on the attention probabilities, in ``[0, 1)``.
        is_causal: apply the top-left aligned causal mask (query ``i`` sees keys
            ``j <= i``). Unlike SDPA, ``is_causal`` and ``attn_mask`` may be
            combined; both are applied.
        scale: logit scale; default ``1 / sqrt(D)``.
        enable_gqa: allow grouped-query attention (``Hq`` a multiple of ``Hkv``);
            query head ``h`` uses kv head ``h // (Hq // Hkv)``.
        generator: RNG used to draw the dropout keep-mask (when no ``dropout_mask``).
        dropout_mask: explicit bool keep-mask broadcastable to ``(..., Hq, Lq, Lk)``;
            requires ``0 < dropout_p < 1``.
        return_lse: also return the log-sum-exp of the masked scaled logits.
        upcast: compute fp16/bf16 inputs in fp32 (see module docstring).

    Returns:
        ``o`` of shape ``(..., Hq, Lq, Dv)`` in the dtype of ``q``, or ``(o, lse)``
        where ``lse`` ``(..., Hq, Lq)`` is fp32 (fp64 for fp64 inputs) and is
        ``-inf`` for fully masked rows.

    Order of operations::

        s = (q @ k^T) * scale                 # (..., Hq, Lq, Lk)
        s = s + float_mask  /  s[~keep] = -inf  (bool mask and/or causal)
        p = softmax(s, dim=-1)                # fully masked rows -> 0
        p = p * keep_drop / (1 - dropout_p)   # dropout
        o = p @ v                             # (..., Hq, Lq, Dv)
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_mask is not None and not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_mask requires 0 < dropout_p < 1, got {dropout_p}")

    out_dtype = q.dtype
    cdtype = torch.float32 if upcast and q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(cdtype), k.to(cdtype), v.to(cdtype)

    # Grouped-query attention: expand kv heads so that query head h reads kv head
    # h // (Hq // Hkv) (repeat_interleave semantics, as in SDPA).
    if q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        hq, hkv = q.shape[-3], k.shape[-3]
        if not enable_gqa or hq % hkv != 0 or v.shape[-3] != hkv:
            raise ValueError(
                f"query heads ({hq}) != key/value heads ({hkv}, {v.shape[-3]}); "
                "pass enable_gqa=True with Hq a multiple of Hkv"
            )
        k = k.repeat_interleave(hq // hkv, dim=-3)  # (..., Hq, Lk, D)
        v = v.repeat_interleave(hq // hkv, dim=-3)  # (..., Hq, Lk, Dv)

    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])

    s = (q @ k.transpose(-2, -1)) * scale  # (..., Hq, Lq, Lk)
    lq, lk = s.shape[-2], s.shape[-1]

    # Masking: float masks are added, bool masks / causal set logits to -inf.
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        s = s + attn_mask.to(cdtype)  # broadcast to (..., Hq, Lq, Lk)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        s = s.masked_fill(~attn_mask, float("-inf"))
    if is_causal:
        causal_keep = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()  # (Lq, Lk)
        s = s.masked_fill(~causal_keep, float("-inf"))

    # Fully masked rows: give them harmless logits (0) so that softmax and its
    # backward stay finite, then zero their probabilities. masked_fill routes a
    # zero gradient to the filled positions, so no NaN reaches the backward.
    fully_masked = torch.isneginf(s).all(dim=-1, keepdim=True)  # (..., Hq, Lq, 1)
    s = s.masked_fill(fully_masked, 0.0)
    p = torch.softmax(s, dim=-1)  # (..., Hq, Lq, Lk)
    p = p.masked_fill(fully_masked, 0.0)

    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        keep = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float32) < 1.0 - dropout_p
        p = p * keep / (1.0 - dropout_p)

    o = (p @ v).to(out_dtype)  # (..., Hq, Lq, Dv)
    if not return_lse:
        return o

    lse = torch.logsumexp(s.to(lse_dtype), dim=-1)  # (..., Hq, Lq)
    lse = lse.masked_fill(fully_masked.squeeze(-1), float("-inf"))
    return o, lse


def scaled_masked_softmax_ref(
    scores: torch.Tensor,
    scale: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    *,
    upcast: bool = False,
) -> torch.Tensor:
    """``softmax(scores * scale + mask)`` over the last dimension.

    Args:
        scores: ``(..., Lq, Lk)``.
        scale: multiplies the scores before masking.
        mask: optional mask broadcastable to ``scores``; bool (``True`` = keep,
            the SDPA convention) or float (added after scaling).
        causal: apply the top-left aligned lower-triangular mask over the last
            two dims (row ``i`` keeps columns ``j <= i``).
        upcast: compute fp16/bf16 inputs in fp32 (see module docstring).

    Returns:
        ``(..., Lq, Lk)`` probabilities in the dtype of ``scores``; rows whose
        entries are all masked are 0 (with zero gradient).
    """
    out_dtype = scores.dtype
    cdtype = torch.float32 if upcast and scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype

    s = scores.to(cdtype) * scale  # (..., Lq, Lk)
    lq, lk = s.shape[-2], s.shape[-1]
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(cdtype)
    if mask is not None and mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    if causal:
        causal_keep = torch.ones(lq, lk, dtype=torch.bool, device=s.device).tril()  # (Lq, Lk)
        s = s.masked_fill(~causal_keep, float("-inf"))

    fully_masked = torch.isneginf(s).all(dim=-1, keepdim=True)  # (..., Lq, 1)
    s = s.masked_fill(fully_masked, 0.0)
    y = torch.softmax(s, dim=-1)  # (..., Lq, Lk)
    y = y.masked_fill(fully_masked, 0.0)
    return y.to(out_dtype)


def layer_norm_ref(
    x: torch.Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    *,
    upcast: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Layer normalisation over the trailing ``normalized_shape`` dims, optionally
    fused with a residual add (pre-LN "add & norm").

    ``h = x + residual`` (or ``h = x``), then::

        mean = h.mean(dims)                       # over the normalized dims
        var  = ((h - mean) ** 2).mean(dims)       # biased variance
        y    = (h - mean) * rsqrt(var + eps) * weight + bias

    Args:
        x: ``(..., *normalized_shape)``.
        normalized_shape: int or tuple of the trailing dims to normalise over.
        weight, bias: optional affine parameters of shape ``normalized_shape``.
        eps: added to the variance.
        residual: optional tensor of the same shape as ``x``.
        upcast: compute fp16/bf16 inputs in fp32 (see module docstring). With a
            residual, ``h`` is computed in the compute dtype, ``y`` is normalised
            from that unrounded ``h``, and ``h`` is returned cast to ``x.dtype``.

    Returns:
        ``y`` (same shape and dtype as ``x``), or ``(y, h)`` when ``residual`` is given.
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    if tuple(x.shape[x.dim() - len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"trailing dims of x {tuple(x.shape)} do not match normalized_shape {normalized_shape}")

    out_dtype = x.dtype
    cdtype = torch.float32 if upcast and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    dims = tuple(range(-len(normalized_shape), 0))

    h = x.to(cdtype)  # (..., *normalized_shape)
    if residual is not None:
        h = h + residual.to(cdtype)

    mean = h.mean(dim=dims, keepdim=True)  # (..., 1, ..., 1)
    var = ((h - mean) ** 2).mean(dim=dims, keepdim=True)  # biased variance
    y = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(cdtype)
    if bias is not None:
        y = y + bias.to(cdtype)

    if residual is None:
        return y.to(out_dtype)
    return y.to(out_dtype), h.to(out_dtype)


def ffn_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    activation: str = "gelu",
    dropout_p: float = 0.0,
    *,
    generator: Optional[torch.Generator] = None,
    dropout_mask: Optional[torch.Tensor] = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Transformer feed-forward block ``y = act(x @ w1^T + b1) @ w2^T + b2``.

    Weights use the ``nn.Linear`` layout (``(out_features, in_features)``).

    Args:
        x: ``(..., d_model)``.
        w1: ``(d_ff, d_model)``, or ``(2 * d_ff, d_model)`` for ``"swiglu"``
            (rows ``[0, d_ff)`` are the gate, rows ``[d_ff, 2 * d_ff)`` the up
            projection).
        b1: ``(w1.shape[0],)`` or ``None``.
        w2: ``(d_model_out, d_ff)``.
        b2: ``(d_model_out,)`` or ``None``.
        activation: one of :data:`ACTIVATIONS`:

            * ``"relu"``: ``max(a, 0)``
            * ``"gelu"``: ``0.5 * a * (1 + erf(a / sqrt(2)))`` (exact)
            * ``"gelu_tanh"``: ``0.5 * a * (1 + tanh(sqrt(2 / pi) * (a + 0.044715 * a^3)))``
            * ``"swiglu"``: ``silu(gate) * up = gate * sigmoid(gate) * up``
        dropout_p: dropout probability on the hidden activations, in ``[0, 1)``.
        generator: RNG used to draw the dropout keep-mask (when no ``dropout_mask``).
        dropout_mask: explicit bool keep-mask broadcastable to the hidden shape
            ``(..., d_ff)``; requires ``0 < dropout_p < 1``.
        upcast: compute fp16/bf16 inputs in fp32 (see module docstring).

    Returns:
        ``(..., d_model_out)`` in the dtype of ``x``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_mask is not None and not 0.0 < dropout_p < 1.0:
        raise ValueError(f"dropout_mask requires 0 < dropout_p < 1, got {dropout_p}")

    out_dtype = x.dtype
    cdtype = torch.float32 if upcast and x.dtype in (torch.float16, torch.bfloat16) else x.dtype

    a = x.to(cdtype) @ w1.to(cdtype).t()  # (..., d_hidden_out)
    if b1 is not None:
        a = a + b1.to(cdtype)

    if activation == "relu":
        hidden = torch.where(a > 0, a, 0.0)  # (..., d_ff)
    elif activation == "gelu":
        hidden = 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))
    elif activation == "gelu_tanh":
        hidden = 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))
    else:  # swiglu
        d_ff = a.shape[-1] // 2
        gate, up = a[..., :d_ff], a[..., d_ff:]  # (..., d_ff) each
        hidden = gate * torch.sigmoid(gate) * up

    if dropout_mask is not None:
        hidden = hidden * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        keep = torch.rand(hidden.shape, generator=generator, device=hidden.device, dtype=torch.float32) < 1.0 - dropout_p
        hidden = hidden * keep / (1.0 - dropout_p)

    y = hidden @ w2.to(cdtype).t()  # (..., d_model_out)
    if b2 is not None:
        y = y + b2.to(cdtype)
    return y.to(out_dtype)
