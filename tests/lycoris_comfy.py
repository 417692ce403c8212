"""LyCORIS BOFT files written on ComfyUI's own modules, LyCORIS's merges of them, merged checkpoints.

Shared by the end-to-end tests and scripts/demo.py. LyCORIS's generic wrapper names a layer
``<prefix>_<module path with . -> _>``: with prefix ``lora_unet`` on ComfyUI's UNet that is the
kohya/sd-scripts name ComfyUI maps (``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``),
with ``lora_te`` on ComfyUI's CLIP-L ``CLIPTextModel`` the text-encoder name
(``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import oracles
import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."  # checkpoint key prefixes of SD-style checkpoints
CLIP_L_PREFIX = "cond_stage_model.transformer."
_WRAPPER_SETTINGS = ("LORA_PREFIX", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "USE_FNMATCH")


@contextlib.contextmanager
def lycoris_names(prefix: str, targets: tuple[str, ...] | None = None):
    """LyCORIS's wrapper with names ``<prefix>_...`` and, if given, only the modules whose path
    matches one of ``targets`` (fnmatch), set through LyCORIS's own preset keys
    (``lora_prefix``, ``target_module``, ``target_name``, ``use_fnmatch``). The wrapper keeps
    presets in class attributes, so they are restored on exit."""
    from lycoris.wrapper import LycorisNetwork

    saved = {name: getattr(LycorisNetwork, name) for name in _WRAPPER_SETTINGS}
    preset = {"lora_prefix": prefix}
    if targets:
        preset.update(target_module=[], target_name=list(targets), use_fnmatch=True)
    LycorisNetwork.apply_preset(preset)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)


def write_boft(path, module: torch.nn.Module, prefix: str, targets: tuple[str, ...] | None = None,
               **kwargs) -> dict[str, torch.Tensor]:
    """A LyCORIS BOFT file for (a float32 copy of) ``module`` by LyCORIS's own code; its tensors."""
    target = copy.deepcopy(module).float()  # LyCORIS hooks the modules it wraps: never the original
    kwargs.setdefault("dim", 16)
    with lycoris_names(prefix, targets):
        oracles.lycoris_file(str(path), "boft", model=target, **kwargs)
    tensors = load_file(str(path))
    if not tensors:
        raise AssertionError(f"LyCORIS wrote no layers for {prefix} {targets}")
    return tensors


def lycoris_merge(path, module: torch.nn.Module, prefix: str, strength: float) -> dict[str, torch.Tensor]:
    """LyCORIS's own ``merge_to(strength)`` of the file's ``<prefix>_`` layers into a float32 copy
    of ``module`` (other prefixes in the file are ignored); the copy's state dict."""
    with lycoris_names(prefix):
        return oracles.lycoris_merged(str(path), module, strength)


def changed(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """``{prefix + key: merged value}`` for every tensor the merge changed.

    NaN counts as equal to NaN: ComfyUI leaves weights a checkpoint lacks (SD1's CLIP
    ``text_projection``) uninitialized, and such memory may hold NaNs.
    """
    return {prefix + k: v for k, v in merged.items()
            if not torch.allclose(v.float(), base[k].float(), rtol=0, atol=0, equal_nan=True)}


def write_checkpoint(src, dst, replace: dict[str, torch.Tensor]) -> Path:
    """A copy of checkpoint ``src`` with the tensors in ``replace`` stored in float32.

    ComfyUI runs the UNet in float32 on the CPU, so the merged weights load exactly as given;
    untouched tensors keep their stored dtype and values.
    """
    sd = load_file(str(src))
    for key, value in replace.items():
        if key not in sd or sd[key].shape != value.shape:
            raise KeyError(f"{key}: not in {src} with shape {tuple(value.shape)}")
        sd[key] = value.detach().float().contiguous()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(dst))
    return Path(dst)


def combine(dst, *files, metadata: dict[str, str] | None = None) -> Path:
    """One adapter file holding the tensors of several (e.g. a UNet part and a text-encoder part)."""
    tensors = {}
    for file in files:
        part = load_file(str(file))
        if tensors.keys() & part.keys():
            raise KeyError(f"{file}: duplicate keys {sorted(tensors.keys() & part.keys())[:3]}")
        tensors.update(part)
    save_file(tensors, str(dst), metadata)
    return Path(dst)
