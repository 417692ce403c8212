"""Adapter layer names -> model weight keys, on top of ComfyUI's own key maps (the names a layer may
have there: ``boft_core.names.candidates``)."""

from __future__ import annotations

import comfy.lora

from ..boft_core.names import candidates


def key_maps(model=None, clip=None) -> tuple[dict, dict]:
    """ComfyUI's own LoRA key maps for the diffusion model and the text encoder(s)."""
    unet = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
    te = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    return unet, te


def resolve(name: str, unet_map: dict, te_map: dict):
    """("model" | "clip", key) for an adapter layer, or None. ``key`` may be (key, offset)."""
    for candidate in candidates(name):
        if candidate in unet_map:
            return "model", unet_map[candidate]
        if candidate in te_map:
            return "clip", te_map[candidate]
    return None
