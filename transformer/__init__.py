"""fusedformer: fused Triton and CUDA C++ kernels for Transformers in PyTorch.

Functional API (same contracts on every backend; see DESIGN.md section 3):
    scaled_dot_product_attention  drop-in for torch.nn.functional.scaled_dot_product_attention
    attention                     the same, optionally returning the log-sum-exp
    scaled_masked_softmax         softmax(scores * scale + mask), causal optional
    layer_norm                    torch.nn.functional.layer_norm, optional fused residual add
    ffn                           act(x w1ᵀ + b1) w2ᵀ + b2 with relu / gelu / gelu_tanh / swiglu
Backends: set_backend(name), use_backend(name) (a context manager), available_backends(),
info().
Modules: fusedformer.nn (drop-in MultiheadAttention, LayerNorm, FeedForward,
TransformerEncoderLayer / DecoderLayer); patch(model) / unpatch(model) swap them into an
existing model; patch_sdpa() routes torch's F.scaled_dot_product_attention to the fused op;
register_hf_attention() makes attn_implementation="fusedformer" work in HF transformers.
Models: fusedformer.models (GPT, EncoderDecoder on the fused ops) and their plain-PyTorch
twins in fusedformer.reference.
"""
from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from .kernels import (
    available_backends,
    backend_status,
    ffn,
    get_backend,
    layer_norm,
    scaled_dot_product_attention,
    scaled_masked_softmax,
    set_backend,
    use_backend,
)
from .kernels.ops import attention
from . import nn
from .hf import register_hf_attention
from .patch import PatchReport, patch, patch_sdpa, sdpa_patched, unpatch, unpatch_sdpa

__version__ = "0.1.0"

__all__ = [
    "PatchReport",
    "attention",
    "available_backends",
    "ffn",
    "get_backend",
    "info",
    "layer_norm",
    "nn",
    "patch",
    "patch_sdpa",
    "register_hf_attention",
    "scaled_dot_product_attention",
    "scaled_masked_softmax",
    "sdpa_patched",
    "set_backend",
    "unpatch",
    "unpatch_sdpa",
    "use_backend",
]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> dict[str, Any]:
    """What this installation can do: versions, the device, and for every backend whether it
    is available (and why not) and which ops it implements."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only"
    backends = backend_status()
    return {
        "fusedformer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "device": device,
        "backend": get_backend(),
        "backends": backends,
        "cuda_matmul": _cuda_matmul(backends["cuda"]),
        "cpu_bf16": _cpu_bf16(backends["cpu"]),
    }


def _cpu_bf16(status: dict[str, Any]) -> str:
    """The unit the cpu backend's bf16 attention runs its products on by default (the last of
    the build's and CPU's units: fma, the fp32 kernels; dpbf16, AVX512_BF16; amx, the tile unit)
    and the ones FUSEDFORMER_CPU_BF16 may pick, or why there are none; status: backend_status()'s
    entry for cpu."""
    if not status["available"]:
        return f"n/a: {status['reason']}"
    from .kernels.dispatch import extension

    ext, _ = extension()
    units = ext.build_info()["cpu_bf16_units"]
    return f"{units.split(', ')[-1]} (of {units})"


def _cuda_matmul(status: dict[str, Any]) -> str:
    """The tensor-core instructions of the cuda backend's attention and FFN on the current
    device (their sm_90a warpgroup-MMA kernels, or the mma.sync ones), or why there are none;
    status: backend_status()'s entry for cuda."""
    if not status["available"]:
        return f"n/a: {status['reason']}"
    from .kernels.dispatch import extension

    ext, _ = extension()
    return ext.cuda_matmul_path()
