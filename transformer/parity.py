"""Fused model vs reference model: the whole-model check shared by tests/test_model.py and
`fusedformer check --model`.

Both fused models are loaded with the reference's weights; logits, loss and every parameter
gradient are compared with a float64 reference model under the 2x rule, PyTorch's own error
being the reference model run in the same dtype. Errors are RMS (see testing.compare).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from . import models, reference
from .kernels import testing


def _loss_and_grads(model: nn.Module, *inputs) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    logits, loss = model(*inputs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), loss.detach(), grads


def compare_models(ref: nn.Module, fused: nn.Module, dtype: torch.dtype, inputs: tuple
                   ) -> list[testing.Comparison]:
    """fused (already in dtype, reference weights) and ref in dtype, both vs ref in float64."""
    same = copy.deepcopy(ref).to(dtype)
    wide = copy.deepcopy(ref).double()
    f = _loss_and_grads(fused, *inputs)
    p = _loss_and_grads(same, *inputs)
    t = _loss_and_grads(wide, *inputs)
    if set(f[2]) != set(t[2]):
        raise AssertionError("fused and reference models disagree on which parameters get gradients")
    rows = [testing.compare("logits", f[0], p[0], t[0], stat="rms"),
            testing.compare("loss", f[1], p[1], t[1], stat="rms")]
    rows += [testing.compare(f"d {n}", f[2][n], p[2][n], t[2][n], stat="rms") for n in t[2]]
    return rows


def gpt_pair(backend: str | None, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """(reference GPT, fused GPT in dtype with the same weights): gpt-tiny, 2 layers, T <= 32,
    both on `device`."""
    torch.manual_seed(seed)
    ref = reference.GPT.from_preset("gpt-tiny", n_layer=2, block_size=32).to(device)
    fused = models.GPT(ref.config, backend=backend).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused.to(dtype)


def encoder_decoder_pair(backend: str | None, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
    """(reference EncoderDecoder, fused twin in dtype with the same weights): transformer-tiny."""
    torch.manual_seed(seed)
    ref = reference.EncoderDecoder.from_preset("transformer-tiny", dropout=0.0).to(device)
    fused = models.EncoderDecoder(ref.config, backend=backend).to(device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused.to(dtype)


def check_gpt(backend: str | None, dtype: torch.dtype, device: str = "cpu") -> list[testing.Comparison]:
    """A padded batch (one sequence shorter, its pad targets ignored)."""
    ref, fused = gpt_pair(backend, dtype, device=device)
    idx = torch.randint(0, 256, (3, 24), device=device)
    targets = torch.randint(0, 256, (3, 24), device=device)
    mask = torch.ones(3, 24, dtype=torch.bool, device=device)
    mask[1, 17:] = False
    targets[1, 17:] = -100
    return compare_models(ref, fused, dtype, (idx, targets, mask))


def check_encoder_decoder(backend: str | None, dtype: torch.dtype, device: str = "cpu"
                          ) -> list[testing.Comparison]:
    """Source and target padding, teacher forcing."""
    ref, fused = encoder_decoder_pair(backend, dtype, device=device)
    cfg = ref.config
    src = torch.randint(3, cfg.src_vocab_size, (3, 11), device=device)
    tgt = torch.randint(3, cfg.tgt_vocab_size, (3, 9), device=device)
    src[0, 7:] = cfg.pad_token_id
    tgt[2, 6:] = cfg.pad_token_id
    return compare_models(ref, fused, dtype, (src, tgt[:, :-1], tgt[:, 1:]))


MODEL_OPS = ("attention", "layer_norm", "ffn")
MODEL_CHECKS = {"GPT": check_gpt, "EncoderDecoder": check_encoder_decoder}
