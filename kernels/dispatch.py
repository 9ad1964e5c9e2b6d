"""Backend choice: the one place that decides which implementation runs an op.

Backends (DESIGN.md section 2):
    reference  kernels/reference.py, plain PyTorch (autograd by PyTorch), anywhere
    cpu        csrc/cpu via fusedformer._C, CPU tensors
    cuda       csrc/cuda via fusedformer._C, CUDA tensors
    triton     kernels/<op>.py, CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)
    auto       the preferred available backend for the tensor's device (see _AUTO_ORDER)

A backend is *available* when it can run here at all; it *implements* a subset of the ops.
Asking a backend for an op it does not implement, or for tensors on a device it cannot use,
raises a ValueError naming the op, the backend and the reason. `auto` falls back along
_AUTO_ORDER with a one-time warning.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS: tuple[str, ...] = ("reference", "cpu", "cuda", "triton")
OPS: tuple[str, ...] = ("attention", "softmax", "layer_norm", "ffn")

# Preference per device type when the backend is "auto". The order is a default until the
# benchmark grid (bench/) has measured every backend on a GPU; triton before cuda because it
# covers the most shapes without compilation.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

_ENV_BACKEND = "FUSEDFORMER_BACKEND"
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fusedformer_backend", default=None)


def _check_name(name: object) -> str:
    valid = ("auto",) + BACKENDS
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"backend must be one of {valid}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Choose the backend for every fusedformer op from now on ("auto" restores the default)."""
    _current.set(_check_name(name))


def get_backend() -> str:
    """The backend in force: set_backend / use_backend, else $FUSEDFORMER_BACKEND, else auto."""
    name = _current.get()
    if name is None:
        name = _check_name(os.environ.get(_ENV_BACKEND, "auto"))
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside the block with backend `name`."""
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


# ----------------------------------------------------------------------------------------
# What each backend is, whether it can run here, and which ops it implements.


@functools.lru_cache(maxsize=None)
def extension() -> tuple[ModuleType | None, str]:
    """(fusedformer._C, "") when the compiled extension loads, else (None, why not)."""
    try:
        module = importlib.import_module("fusedformer._C")
    except ImportError as e:  # not built, or built against another torch
        return None, f"fusedformer._C did not load ({e}); build it with `pip install -e .`"
    return module, ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=4)
def _build_info(ext: ModuleType) -> dict:
    """The extension's build_info(), fixed at build time: asked once, not on every op call."""
    return ext.build_info()


def _status(name: str) -> tuple[bool, str, tuple[str, ...]]:
    """(available, reason if not, ops implemented) for one backend."""
    if name == "reference":
        return True, "", OPS
    if name in ("cpu", "cuda"):
        ext, why = extension()
        if ext is None:
            return False, why, ()
        info = _build_info(ext)
        if name == "cpu":
            return True, "", tuple(info["cpu_ops"])
        if not info["cuda"]:
            return False, f"fusedformer._C was built without CUDA ({info['cuda_reason']})", ()
        if not torch.cuda.is_available():
            return False, "no CUDA device visible to torch", ()
        return True, "", tuple(info["cuda_ops"])
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed", ()
        if not (torch.cuda.is_available() or triton_interpreted()):
            return False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)", ()
        from . import triton_backend

        return True, "", triton_backend.OPS
    raise ValueError(f"unknown backend {name!r}")


def backend_status() -> dict[str, dict[str, object]]:
    """{backend: {"available": bool, "reason": str, "ops": [op, ...]}} for every backend."""
    out = {}
    for name in BACKENDS:
        ok, why, ops = _status(name)
        out[name] = {"available": ok, "reason": why, "ops": list(ops)}
    return out


def available_backends() -> list[str]:
    """The backends that can run on this machine (each may implement only some ops)."""
    return [name for name in BACKENDS if _status(name)[0]]


def _device_ok(backend: str, device: torch.device) -> str:
    """"" when `backend` can take tensors on `device`, else the reason it cannot."""
    if backend == "cpu" and device.type != "cpu":
        return f"it takes CPU tensors, got tensors on {device}"
    if backend == "cuda" and device.type != "cuda":
        return f"it takes CUDA tensors, got tensors on {device}"
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        return f"it takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got tensors on {device}"
    return ""


@functools.lru_cache(maxsize=None)
def _warn_fallback(op: str, device_type: str, skipped: str, chosen: str, why: str) -> None:
    warnings.warn(f"fusedformer: {op} on {device_type}: backend '{skipped}' skipped ({why}); "
                  f"using '{chosen}'", stacklevel=4)


@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, backend: str | None = None) -> str:
    """The concrete backend that runs `op` on `device` (`backend` if given, else the one in
    force), or a ValueError saying why none can. Under torch.compile the choice is made once,
    at trace time, and becomes a constant of the graph."""
    name = get_backend() if backend is None else _check_name(backend)
    if name != "auto":
        ok, why, ops = _status(name)
        if not ok:
            raise ValueError(f"{op}: backend '{name}' is not available: {why}")
        if op not in ops:
            raise ValueError(f"{op}: backend '{name}' does not implement this op "
                             f"(it implements: {', '.join(ops) or 'nothing'})")
        bad_device = _device_ok(name, device)
        if bad_device:
            raise ValueError(f"{op}: backend '{name}' cannot run here: {bad_device}")
        return name
    order = _AUTO_ORDER.get(device.type, ("reference",))
    first_reason = ""
    for candidate in order:
        ok, why, ops = _status(candidate)
        if ok and op in ops and not _device_ok(candidate, device):
            if candidate != order[0]:
                _warn_fallback(op, device.type, order[0], candidate, first_reason)
            return candidate
        if not first_reason:
            first_reason = why or (f"does not implement {op}" if ok else "unavailable")
    return "reference"
