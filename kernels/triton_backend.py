"""Launchers of the `triton` backend, gathered from the per-op modules (kernels/<op>.py).

An op is implemented when its module exists; `triton_backend.attention_fwd` resolves to
kernels/attention.py's attention_fwd on first use. Imported lazily: importing an op module
imports triton, and Triton decides at kernel definition time whether it interprets
(TRITON_INTERPRET=1) or compiles.
"""
from __future__ import annotations

import importlib
from pathlib import Path

_OP_MODULES = ("attention", "softmax", "layer_norm", "ffn")
OPS: tuple[str, ...] = tuple(op for op in _OP_MODULES if (Path(__file__).parent / f"{op}.py").exists())


def __getattr__(name: str):
    for op in OPS:
        if name.startswith(op + "_"):
            return getattr(importlib.import_module(f".{op}", __package__), name)
    raise AttributeError(f"the triton backend has no launcher {name!r} (ops implemented: {OPS})")
