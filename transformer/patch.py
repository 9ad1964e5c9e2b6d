"""Swap the modules of an existing model for fused ones, weights kept; and route
torch.nn.functional.scaled_dot_product_attention through fusedformer.

    patch(model, backend=None) -> PatchReport   in place: nn.MultiheadAttention, nn.LayerNorm,
                                                nn.TransformerEncoderLayer / DecoderLayer ->
                                                their fusedformer.nn twins
    unpatch(model)                              puts the original modules back
    patch_sdpa(backend=None), unpatch_sdpa()    replace / restore F.scaled_dot_product_attention
    sdpa_patched(backend=None)                  the same as a context manager

The fused twins share the originals' Parameter objects (so an optimizer built before patch()
keeps training the same tensors), device, dtype and training flags. Only the exact torch types
are swapped: a subclass may override forward, so it is reported, not swapped, and its children
are visited instead; so is a Transformer layer whose activation has no fused kernel.
Forward hooks registered on a swapped module stay on the original (not called while patched).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import nn as fnn
from .kernels import dispatch, ops
from .kernels.validate import KERNEL_DTYPES

__all__ = ["PatchReport", "patch", "patch_sdpa", "sdpa_patched", "unpatch", "unpatch_sdpa"]

# torch type -> its fused twin, most specific first (a layer is swapped whole, before its parts).
_TWINS: tuple[tuple[type, type], ...] = (
    (nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer),
    (nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer),
    (nn.MultiheadAttention, fnn.MultiheadAttention),
    (nn.LayerNorm, fnn.LayerNorm),
)

_REPORT_ATTR = "_fusedformer_patches"


@dataclass
class _Swap:
    """One replaced slot: parent._modules[attr] held `original`, now holds `fused`."""

    parent: nn.Module
    attr: str
    original: nn.Module
    fused: nn.Module


@dataclass(eq=False)
class PatchReport:
    """What patch() did.

    swapped: {qualified name: "torch.nn.X -> fusedformer.nn.X"} for every replaced module.
    not_swapped: {qualified name: why} for every module of a swappable kind left as it was.
    notes: other changes made to the model (undone by unpatch).
    originals: {qualified name: the original module}, what unpatch() puts back.
    """

    backend: Optional[str]
    swapped: dict[str, str] = field(default_factory=dict)
    not_swapped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    originals: dict[str, nn.Module] = field(default_factory=dict)
    _swaps: list[_Swap] = field(default_factory=list, repr=False)
    _nested_flags: list[tuple[nn.Module, bool]] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        lines = [f"fusedformer.patch (backend={self.backend!r}): {len(self.swapped)} swapped, "
                 f"{len(self.not_swapped)} not swapped"]
        lines += [f"  swapped      {name or '<root>'}: {what}" for name, what in self.swapped.items()]
        lines += [f"  not swapped  {name or '<root>'}: {why}" for name, why in self.not_swapped.items()]
        lines += [f"  note         {note}" for note in self.notes]
        return "\n".join(lines)


def _twin(module: nn.Module) -> tuple[Optional[type], str]:
    """(the fused class for `module`, "") or (None, why not) for a swappable kind, (None, "")
    for anything else."""
    for torch_type, fused_type in _TWINS:
        if type(module) is torch_type:
            return fused_type, ""
    for torch_type, _ in _TWINS:
        if isinstance(module, torch_type):
            return None, (f"{type(module).__qualname__} subclasses torch.nn.{torch_type.__name__} "
                          "and may override its forward; its children were patched instead")
    return None, ""


def patch(model: nn.Module, *, backend: Optional[str] = None) -> PatchReport:
    """Replace, in place, every nn.MultiheadAttention, nn.LayerNorm, nn.TransformerEncoderLayer
    and nn.TransformerDecoderLayer in `model` by its fusedformer.nn twin computing on `backend`
    (None: the backend in force at call time), sharing its parameters.

    Modules that cannot be swapped (a subclass, a layer with a custom activation, the root
    module itself) are listed with the reason in the report's `not_swapped`, and their children
    are visited. A module reachable at several names is replaced by one fused module. An
    nn.TransformerEncoder over swapped layers gets use_nested_tensor = False (its nested-tensor
    fast path would hand the layers nested tensors): outputs at padded positions are then
    computed instead of zero-filled. Returns the PatchReport; unpatch(model) undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        dispatch._check_name(backend)
    report = PatchReport(backend=backend)
    done: dict[int, nn.Module] = {}

    root_type, why = _twin(model)
    if root_type is not None:
        report.not_swapped[""] = (f"the root module cannot be replaced in place; use "
                                  f"fusedformer.nn.{root_type.__name__}.from_torch(model); its "
                                  "children were patched instead")
    elif why:
        report.not_swapped[""] = why

    def visit(module: nn.Module, prefix: str) -> None:
        for attr, child in list(module._modules.items()):
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            fused = done.get(id(child))
            if fused is None:
                fused_type, why = _twin(child)
                if fused_type is not None:
                    try:
                        fused = fused_type.from_torch(child, backend=backend)
                    except (TypeError, ValueError, AttributeError) as e:
                        why = f"{e} (its children were patched instead)"
                if fused is None:
                    if why:
                        report.not_swapped[name] = why
                    visit(child, name)
                    _fix_encoder(child, name, report)
                    continue
                done[id(child)] = fused
            module._modules[attr] = fused
            report._swaps.append(_Swap(module, attr, child, fused))
            report.swapped[name] = f"torch.nn.{type(child).__name__} -> fusedformer.nn.{type(fused).__name__}"
            report.originals[name] = child

    visit(model, "")
    _fix_encoder(model, "", report)
    if report._swaps or report._nested_flags:
        model.__dict__.setdefault(_REPORT_ATTR, []).append(report)
    return report


def _fix_encoder(module: nn.Module, name: str, report: PatchReport) -> None:
    """Turn off nn.TransformerEncoder's nested-tensor path when its layers are no longer
    torch's (it would pass them nested tensors)."""
    if (isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False)
            and not all(isinstance(layer, nn.TransformerEncoderLayer) for layer in module.layers)):
        report._nested_flags.append((module, True))
        module.use_nested_tensor = False
        report.notes.append(f"{name or '<root>'}.use_nested_tensor set to False (the fused layers "
                            "take dense tensors)")


def unpatch(model: nn.Module) -> list[PatchReport]:
    """Undo every patch() of `model`, newest first: the original modules go back, holding the
    fused modules' current parameters (trained values included) and training flags. Returns
    the reports undone (empty when the model was not patched)."""
    reports: list[PatchReport] = model.__dict__.pop(_REPORT_ATTR, [])
    for report in reversed(reports):
        for swap in reversed(report._swaps):
            fnn._share_parameters(swap.original, swap.fused)
            swap.parent._modules[swap.attr] = swap.original
        for encoder, flag in report._nested_flags:
            encoder.use_nested_tensor = flag
    return list(reversed(reports))


# ----------------------------------------------------------------------------------------
# F.scaled_dot_product_attention

_original_sdpa: Optional[Callable[..., Tensor]] = None


def _sdpa_unsupported(query: object, key: object, value: object, attn_mask: object,
                      dropout_p: object, is_causal: object, scale: object, enable_gqa: object,
                      extra: dict, backend: Optional[str]) -> str:
    """"" when fusedformer.attention runs these arguments with torch's semantics, else why not
    (then the original runs: it computes them, or raises torch's own error)."""
    if extra:
        return f"arguments {sorted(extra)} are not supported"
    if not all(isinstance(t, Tensor) for t in (query, key, value)):
        return "query, key and value must be tensors"
    q, k, v = query, key, value
    if any(t.is_nested or t.layout != torch.strided for t in (q, k, v)):
        return "nested or sparse tensors"
    if not q.dim() == k.dim() == v.dim() or q.dim() not in (3, 4):
        return f"{q.dim()}-D inputs (fusedformer takes (B, H, L, D) or (H, L, D))"
    if len({t.dtype for t in (q, k, v)}) > 1 or len({t.device for t in (q, k, v)}) > 1:
        return "query, key and value of different dtypes or devices"
    if not q.is_floating_point():
        return f"dtype {q.dtype}"
    if q.shape[:-3] != k.shape[:-3] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        return "query, key and value shapes that do not agree"
    if q.shape[-3] != k.shape[-3] and (not enable_gqa or q.shape[-3] % k.shape[-3]):
        return "query and key/value head counts that do not agree"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask together with is_causal"
        if not isinstance(attn_mask, Tensor) or attn_mask.dtype not in (torch.bool, q.dtype):
            return "an attn_mask that is neither bool nor query's dtype"
        target = (*q.shape[:-1], k.shape[-2])
        try:
            if attn_mask.dim() > len(target) or torch.broadcast_shapes(attn_mask.shape, target) != target:
                return f"an attn_mask of shape {tuple(attn_mask.shape)}"
        except RuntimeError:
            return f"an attn_mask of shape {tuple(attn_mask.shape)}"
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        return f"dropout_p={dropout_p!r}"
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        return f"scale={scale!r}"
    try:
        name = dispatch.resolve("attention", q.device, backend)
    except ValueError as e:
        return str(e)
    if name == "reference":
        return ""
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} on backend '{name}'"
    if v.shape[-1] != q.shape[-1]:
        return f"a value head dim different from the query's on backend '{name}'"
    if isinstance(attn_mask, Tensor) and attn_mask.requires_grad:
        return f"an attn_mask that requires grad on backend '{name}'"
    return ""


@functools.lru_cache(maxsize=None)
def _warn_sdpa_fallback(why: str) -> None:
    warnings.warn(f"fusedformer.patch_sdpa: {why}; calling torch's scaled_dot_product_attention",
                  stacklevel=3)


def _fused_sdpa(original: Callable[..., Tensor], backend: Optional[str]) -> Callable[..., Tensor]:
    """An F.scaled_dot_product_attention that runs fusedformer.attention on `backend`, and
    `original` (once-warned per reason) for what fusedformer does not take."""

    @functools.wraps(original)
    def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                     attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                     is_causal: bool = False, scale: Optional[float] = None,
                                     enable_gqa: bool = False, **extra) -> Tensor:
        why = _sdpa_unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                enable_gqa, extra, backend)
        if why:
            _warn_sdpa_fallback(why)
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                            enable_gqa=enable_gqa, **extra)
        return ops.attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                             enable_gqa, backend=backend)

    return scaled_dot_product_attention


def patch_sdpa(backend: Optional[str] = None) -> None:
    """Make torch.nn.functional.scaled_dot_product_attention run fusedformer.attention on
    `backend` (None: the backend in force at call time), falling back to torch's own function
    (with one warning per reason) for inputs fusedformer does not take: float64 on a compiled
    backend, a value head dim unlike the query's, attn_mask with is_causal, nested tensors...
    Code that looks the function up at call time (F.scaled_dot_product_attention(...),
    nn.MultiheadAttention) is routed; a reference bound before the patch (`from
    torch.nn.functional import scaled_dot_product_attention`) is not. Calling it again changes
    the backend; unpatch_sdpa() restores torch's function."""
    global _original_sdpa
    if backend is not None:
        dispatch._check_name(backend)
    if _original_sdpa is None:
        _original_sdpa = F.scaled_dot_product_attention
    _warn_sdpa_fallback.cache_clear()
    F.scaled_dot_product_attention = _fused_sdpa(_original_sdpa, backend)


def unpatch_sdpa() -> None:
    """Restore the F.scaled_dot_product_attention that patch_sdpa replaced (no-op if none)."""
    global _original_sdpa
    if _original_sdpa is not None:
        F.scaled_dot_product_attention = _original_sdpa
        _original_sdpa = None


@contextlib.contextmanager
def sdpa_patched(backend: Optional[str] = None) -> Iterator[None]:
    """Context manager: F.scaled_dot_product_attention runs fusedformer inside the block; on
    exit the previous state (unpatched, or patched with another backend) comes back."""
    previous = F.scaled_dot_product_attention if _original_sdpa is not None else None
    patch_sdpa(backend)
    try:
        yield
    finally:
        if previous is None:
            unpatch_sdpa()
        else:
            F.scaled_dot_product_attention = previous
