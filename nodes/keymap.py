"""Adapter layer names -> model weight keys, on top of ComfyUI's own key maps."""

from __future__ import annotations

import comfy.lora

from ..boft_core.names import PEFT_PREFIX, TE_ROOTS, UNDERSCORED_ROOTS, wan_native


def key_maps(model=None, clip=None) -> tuple[dict, dict]:
    """ComfyUI's own LoRA key maps for the diffusion model and the text encoder(s)."""
    unet = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
    te = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    return unet, te


def candidates(name: str):
    """Names ComfyUI's key maps may know this layer by, most specific first.

    Adds what the core maps miss: kohya OFT's ``oft_unet_`` names, PEFT ``base_model.model.`` and
    diffusers ``unet.`` names with the new attention naming (``attn1.to_q``, ``to_out.0``), PEFT text-encoder names,
    transformers-5 text-encoder names without ``text_model`` (``lora_te_encoder_layers_...``),
    the model's native paths under any trainer's prefix (``transformer.``, ``lycoris_``,
    ``lora_transformer_``: ComfyUI maps ``diffusion_model.<path>`` and ``lora_unet_<path>`` for every
    model), and Wan in diffusers' naming (``blocks.0.attn1.to_q`` is ``blocks.0.self_attn.q``).
    """
    yield name
    if name.startswith("oft_unet_"):  # kohya sd-scripts networks.oft: its lora_unet_ names, renamed
        yield "lora_unet_" + name[len("oft_unet_"):]
        return
    path = name
    for prefix in (PEFT_PREFIX, "unet.", "transformer."):
        if path.startswith(prefix):
            path = path[len(prefix):]
            yield path
    flat = path.replace(".", "_")
    if path.startswith(("text_model.", "encoder.layers.")):
        te = flat if flat.startswith("text_model_") else "text_model_" + flat
        yield "lora_te_" + te
        yield "lora_te1_" + te
        return
    for prefix in ("text_encoder.", "text_encoder_2."):
        if path.startswith(prefix):
            rest = path[len(prefix):].replace(".", "_")
            rest = rest if rest.startswith("text_model_") else "text_model_" + rest
            yield ("lora_te2_" if prefix == "text_encoder_2." else "lora_te_") + rest
            yield "lora_te1_" + rest
            return
    for prefix in TE_ROOTS:
        if flat.startswith(prefix + "encoder_"):
            yield prefix + "text_model_" + flat[len(prefix):]
            return
    if "." in name:  # a dotted name (after any prefix the path may be one word: transformer.proj_out)
        yield "lora_unet_" + flat  # diffusers path; ComfyUI maps its underscored form
        yield "lycoris_" + flat
        yield "diffusion_model." + path  # a native path under another prefix (0.3.75: also Z-Image's diffusers map)
        if wan_native(path) != path:
            yield "diffusion_model." + wan_native(path)  # Wan in diffusers' naming: ComfyUI maps none
        return
    for prefix in UNDERSCORED_ROOTS:  # a flattened native (or Wan diffusers) path: ComfyUI maps lora_unet_<it>
        if name.startswith(prefix):
            rest = name[len(prefix):]
            yield "lora_unet_" + rest
            if wan_native(rest, "_") != rest:
                yield "lora_unet_" + wan_native(rest, "_")
            return


def resolve(name: str, unet_map: dict, te_map: dict):
    """("model" | "clip", key) for an adapter layer, or None. ``key`` may be (key, offset)."""
    for candidate in candidates(name):
        if candidate in unet_map:
            return "model", unet_map[candidate]
        if candidate in te_map:
            return "clip", te_map[candidate]
    return None
