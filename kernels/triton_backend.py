"""Launchers of the `triton` backend, gathered from the per-op modules (kernels/<op>.py).

Imported on first use only: importing it imports triton, and Triton decides at kernel
definition time whether it interprets (TRITON_INTERPRET=1) or compiles.
"""
from __future__ import annotations

OPS: tuple[str, ...] = ()
