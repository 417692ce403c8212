"""Adapter files written by the libraries that define them, and those libraries' own merges.

These are the oracles: LyCORIS (``lycoris-lora``) and PEFT write the files with their own save
code and merge with their own code; tests compare boft_core against them.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

logging.getLogger("LyCORIS").setLevel(logging.ERROR)


def within_one_ulp(got: torch.Tensor, want64: torch.Tensor) -> bool:
    """The float64 oracle's check for a half- or single-precision result: |got - exact| <= one ulp
    of got's dtype at the exact value (+ float32 arithmetic: 1e-6 of the largest value, which
    matters only near zero) everywhere, and no worse than rounding the exact result."""
    rounded = want64.to(got.dtype)
    mag = rounded.abs()
    ulp = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()
    err = (got.double() - want64).abs()
    slack = 1e-6 * want64.abs().max()
    return bool((err <= ulp + slack).all() and err.max() <= (rounded.double() - want64).abs().max() + slack)


def peft_folder_renamed(saved, folder, paths: dict[str, str]) -> dict[str, torch.Tensor]:
    """The adapter PEFT saved in ``saved`` (``save_pretrained``) written again as the adapter folder
    ``folder`` (weights + PEFT's own ``adapter_config.json``) with every layer's module path renamed
    by ``paths`` (``{path: new path}``, e.g. ``tiny_models.diffusers_paths``): the file PEFT writes
    for the same model under those names. The renamed tensors."""
    from safetensors.torch import load_file, save_file

    saved, folder = Path(saved), Path(folder)
    renamed = {}
    for key, value in load_file(str(saved / "adapter_model.safetensors")).items():
        rest = key[len("base_model.model."):]
        parts = rest.split(".")
        path = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in paths), None)
        if path is None:
            raise AssertionError(f"{key}: no new name for its module path")
        renamed[f"base_model.model.{paths[path]}{rest[len(path):]}"] = value
    folder.mkdir()
    save_file(renamed, str(folder / "adapter_model.safetensors"), {"format": "pt"})
    (folder / "adapter_config.json").write_text((saved / "adapter_config.json").read_text())
    return renamed


class Toy(nn.Module):
    """Linear and conv layers whose sizes suit BOFT (out dims with power-of-two block counts)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(32, 64)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.mlp = nn.Linear(32, 48)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return x


def randomize(module: nn.Module, names: tuple[str, ...], seed: int, std: float = 0.05) -> None:
    """Fresh random non-zero values for every parameter whose name ends with one of ``names``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(names):
                base = 1.0 if name.endswith(("rescale", "boft_s")) else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * std)


def lycoris_file(path: str, algo: str = "boft", *, dim: int = 8, constraint: float = 0.0,
                 rescaled: bool = False, dtype=torch.float32, seed: int = 0,
                 model: nn.Module | None = None, metadata: dict | None = None,
                 std: float = 0.05, **kwargs):
    """Write a LyCORIS adapter for ``model`` (default: Toy) with LyCORIS's own save code."""
    from lycoris import create_lycoris

    model = Toy(seed) if model is None else model
    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=1, algo=algo,
                         constraint=constraint, rescaled=rescaled, **kwargs)
    net.apply_to()
    randomize(net, ("oft_blocks", "rescale"), seed + 1, std)
    net.save_weights(path, dtype, metadata or {})
    return model


def lycoris_merged(path: str, model: nn.Module, strength: float) -> dict[str, torch.Tensor]:
    """LyCORIS's own ``merge_to(strength)`` of the file at ``path`` into a float32 copy of model."""
    from lycoris import create_lycoris_from_weights

    target = copy.deepcopy(model).float()
    net, _ = create_lycoris_from_weights(1.0, path, target)
    net = net.float()
    net.apply_to()
    net.merge_to(strength)
    return {k: v.detach().clone() for k, v in target.state_dict().items()}


class _CpuBlockDiag:
    """CPU stand-in for PEFT's CUDA ``FastBlockDiag``: (N, D, b, b) -> (N, D*b, D*b)."""

    @staticmethod
    def apply(blocks):
        return torch.stack([torch.block_diag(*torch.unbind(stage)) for stage in blocks])


def enable_peft_butterfly_factors(monkeypatch) -> None:
    """Let PEFT's own code build N > 1 butterfly factors on the CPU (its path needs CUDA)."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: True)
    monkeypatch.setattr(boft_layer, "FastBlockDiag", _CpuBlockDiag)


def peft_adapter(folder: str, *, block_size: int = 4, factors: int = 1, bias: str = "none",
                 targets=("proj", "conv"), seed: int = 0, dtype=torch.float32,
                 model: nn.Module | None = None):
    """Write a PEFT BOFT adapter folder with PEFT's ``save_pretrained``; return the PEFT model."""
    from peft import BOFTConfig, get_peft_model

    model = Toy(seed) if model is None else model
    config = BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=factors,
                        target_modules=list(targets), bias=bias, init_weights=True)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    randomize(peft_model, ("boft_R.default", "boft_s.default"), seed + 1, std=0.1)
    if bias != "none":
        randomize(peft_model, ("base_layer.bias",), seed + 2, std=0.5)
    peft_model.save_pretrained(folder)
    if dtype != torch.float32:  # PEFT saves float32; store the same values as a lower dtype
        from safetensors.torch import load_file, save_file

        file = os.path.join(folder, "adapter_model.safetensors")
        tensors = {k: v.to(dtype) for k, v in load_file(file).items()}
        save_file(tensors, file, {"format": "pt"})
        with torch.no_grad():  # the oracle merges the same (rounded) values
            for name, p in peft_model.named_parameters():
                if name.endswith(("boft_R.default", "boft_s.default", "base_layer.bias")):
                    p.copy_(p.to(dtype).float())
    return peft_model


def peft_merged(peft_model) -> dict[str, torch.Tensor]:
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
