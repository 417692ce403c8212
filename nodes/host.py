"""A mixed file's other adapter kinds (LoRA, full diffs, ...) handed to the host's own adapters.

The keys of no BOFT layer (``BoftFile.others``) go through exactly what core's LoraLoader runs:
``comfy.lora_convert.convert_lora`` then ``comfy.lora.load_lora`` with the model's key map. A key
that no adapter of the host reads is an error naming it, never a warning in the console.
"""

from __future__ import annotations

import math

import comfy.lora
import comfy.lora_convert
import comfy.utils

from ..boft_core import BoftError
from ..boft_core.names import other_layers


class _Reads(dict):
    """A state dict that records the keys read from it: what the host's adapters consumed."""

    def __init__(self, tensors):
        super().__init__(tensors)
        self.read = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def _stems(key: str):
    """Every name a key's layer may have: the key cut at each '.' (``a.b.c`` -> ``a``, ``a.b``)."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _load(path: str, tensors: dict, key_map: dict) -> dict:
    try:
        return comfy.lora.load_lora(tensors, key_map, log_missing=False)
    except Exception as e:  # the host's adapters on the file's tensors; the user needs the file name
        raise BoftError(f"{path}: ComfyUI's own adapters could not read the file's non-BOFT keys: "
                        f"{type(e).__name__}: {e}") from None


def host_patches(path: str, others: dict, unet_map: dict, te_map: dict):
    """The host's patches for a mixed file's other keys.

    Returns ``(patches, layers, missing)``: ``{model key: patch}`` as core's ``load_lora`` makes them,
    ``{model key: (file layer name, adapter kind)}``, and the file's other layers this model lacks.
    BoftError, before anything is patched, for a key no host adapter reads (named, with its
    shape) and for a diff or LoRA whose shape does not fit its weight.
    """
    if not others:
        return {}, {}, []
    tensors = comfy.lora_convert.convert_lora(dict(others))
    # Which keys the host understands at all, whatever this model has: every cut of every key as a layer.
    probe = _Reads(tensors)
    _load(path, probe, {stem: stem for key in tensors for stem in _stems(key)})
    unknown = sorted(set(tensors) - probe.read)
    if unknown:
        shown = ", ".join(f"{k} {tuple(tensors[k].shape)}" for k in unknown[:5])
        raise BoftError(f"{path}: {len(unknown)} key(s) belong to no BOFT layer and no adapter ComfyUI "
                        f"knows (e.g. {shown}); nothing was applied.")
    key_map = {**unet_map, **te_map}  # what core's LoraLoader uses
    patches = _load(path, tensors, key_map)
    kinds = other_layers(tensors)
    layers, found = {}, set()
    for name, kind in kinds.items():
        target = key_map.get(name)
        if target is None:
            continue
        found.add(name)
        weight_key = target[0] if isinstance(target, tuple) else target
        for key in (target, weight_key[: -len("weight")] + "bias" if weight_key.endswith(".weight") else None):
            if key in patches:
                layers[key] = (name, kind)
    missing = sorted(set(kinds) - found)
    return patches, layers, missing


def check_host_patch(path: str, root, key, patch, name: str) -> None:
    """A full diff (``diff``/``set``) or a LoRA must have its weight's shape: the host would log a
    warning and leave the layer as it is."""
    target = comfy.utils.get_attr(root, key[0] if isinstance(key, tuple) else key)
    shape = tuple(target.shape)
    if isinstance(key, tuple):
        shape = list(shape)
        shape[key[1][0]] = key[1][2]
        shape = tuple(shape)
    if isinstance(patch, tuple) and patch[0] in ("diff", "set"):
        got = tuple(patch[1][0].shape)
        if got != shape:
            raise BoftError(f"{path}: layer {name}: its {patch[0]} tensor has shape {got}, the model's "
                            f"{key} has {shape}; the adapter likely belongs to another base model.")
    elif type(patch).__name__ == "LoRAAdapter":
        up, down, mid = patch.weights[0], patch.weights[1], patch.weights[3]
        rows, cols = shape[0], math.prod(shape[1:])
        got_cols = math.prod(down.shape[1:]) * (math.prod(mid.shape[2:]) if mid is not None else 1)
        if up.shape[0] != rows or got_cols != cols:
            raise BoftError(f"{path}: layer {name}: its LoRA (up {tuple(up.shape)}, down {tuple(down.shape)}) "
                            f"does not fit the model's {key} of shape {shape}.")
