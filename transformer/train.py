"""Training utilities: a byte-level corpus read from this machine, and a small GPT loop.

The corpus is the Python standard library's own source files (nothing is downloaded): a few
MB of real, structured text, tokenized as bytes (vocab 256), split 90/10 into train/val.
"""
from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path

import torch
from torch import Tensor

from .models import GPT as FusedGPT
from .reference import GPT


def stdlib_corpus(max_bytes: int = 2_000_000) -> Tensor:
    """uint8 tensor of the standard library's .py sources (sorted paths, so reproducible)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no .py files under {root}: cannot build the corpus")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8)


def batches(data: Tensor, batch_size: int, block_size: int, generator: torch.Generator
            ) -> tuple[Tensor, Tensor]:
    """A random batch of (inputs, next-byte targets), each (B, T) int64."""
    starts = torch.randint(0, data.numel() - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + block_size] for s in starts.tolist()]).long()          # (B, T)
    y = torch.stack([data[s + 1:s + 1 + block_size] for s in starts.tolist()]).long()  # (B, T)
    return x, y


def train_gpt_on_stdlib(steps: int = 300, batch_size: int = 16, lr: float = 3e-3, seed: int = 0,
                        log_every: int = 25, model: GPT | None = None) -> list[float]:
    """Train gpt-tiny (or `model`) on the stdlib corpus with AdamW; print and return the losses
    (train loss every `log_every` steps, val loss at the end)."""
    torch.manual_seed(seed)
    data = stdlib_corpus()
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    model = model if model is not None else GPT.from_preset("gpt-tiny")
    block = model.config.block_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    started = time.perf_counter()
    print(f"corpus: {data.numel():,} bytes of stdlib sources; model: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; uniform loss = {math.log(256):.3f}")
    model.train()
    for step in range(1, steps + 1):
        x, y = batches(train, batch_size, block, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == 1:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(f"step {step:4d}  train loss {recent:.3f}  ({time.perf_counter() - started:.1f}s)")
    model.eval()
    with torch.no_grad():
        x, y = batches(val, 64, block, gen)
        val_loss = model(x, y)[1].item()
    print(f"val loss {val_loss:.3f} after {steps} steps")
    return losses


def train_fused_and_reference(steps: int = 300, seed: int = 0, backend: str | None = None,
                              log_every: int = 25) -> tuple[list[float], list[float]]:
    """gpt-tiny trained twice from one initialization on one batch stream: first
    fusedformer.models.GPT on `backend` (None: the best one available), then the plain-PyTorch
    reference; prints both runs and returns (fused losses, reference losses)."""
    torch.manual_seed(seed)
    reference = GPT.from_preset("gpt-tiny")
    fused = FusedGPT.from_preset("gpt-tiny", backend=backend)
    fused.load_state_dict(reference.state_dict())
    print(f"-- fused ops (backend {backend or 'auto'}) --")
    fused_losses = train_gpt_on_stdlib(steps, seed=seed, log_every=log_every, model=fused)
    print("-- plain-PyTorch reference, same initialization and batches --")
    reference_losses = train_gpt_on_stdlib(steps, seed=seed, log_every=log_every, model=reference)
    return fused_losses, reference_losses
