"""Create Hook BOFT: a BOFT as one of ComfyUI's weight hooks (strength scheduled over steps).

Core's ``CreateHookLora`` maps a file's names with core's key maps only (``comfy.lora.load_lora``),
silently: PEFT ``base_model.model.<diffusers path>`` names and PEFT's trained bias never arrive.
This hook plans its patches with the loader nodes' own key maps and checks (``plan_patches``) when
ComfyUI registers it on a model (sampling) or a CLIP (``SetClipHooks``); ComfyUI then applies
them at each keyframe's strength (``strength x keyframe``), through our adapter. ``block_weights``
is the loaders' (``boft_core.blocks``): each layer's patch is added at ``strength x its block's
weight``, which the keyframe multiplies in turn.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from types import SimpleNamespace

import comfy.hooks
import folder_paths

from ..boft_core import MODES, BoftError, check_mode, check_strength
from ..boft_core.blocks import FAMILY_LABELS, family_of, parse_block_weights
from ..boft_core.names import guess_family, is_text_encoder_layer
from .loader import BLOCK_WEIGHTS_TOOLTIP, MODE_TOOLTIP, _Loader, by_strength, model_family, parsed_file, plan_patches

log = logging.getLogger("comfyui-boft")


class BoftWeightHook(comfy.hooks.WeightHook):
    """A WeightHook whose patches come from a BOFT file, planned when registered on a model part."""

    def __init__(self, strength_model=1.0, strength_clip=1.0, path=None, boft_name=None, mode="lycoris",
                 block_weights=""):
        super().__init__(strength_model=strength_model, strength_clip=strength_clip)
        self.boft_path, self.boft_name, self.boft_mode = path, boft_name, mode
        self.boft_block_weights = block_weights

    def clone(self):
        c = super().clone()  # Hook.clone makes type(self)() and copies the host's fields
        c.boft_path, c.boft_name, c.boft_mode = self.boft_path, self.boft_name, self.boft_mode
        c.boft_block_weights = self.boft_block_weights
        return c

    def add_hook_patches(self, model, model_options, target_dict, registered):
        if not self.should_register(model, model_options, target_dict, registered):
            return False
        clip = target_dict.get("target") == comfy.hooks.EnumWeightTarget.Clip
        strength = self._strength_clip if clip else self._strength_model
        if strength != 0:
            patches, strengths = self.patches(model, clip, strength)
            # one strength per call (strength x the layer's block weight); the host multiplies it
            # by the current keyframe's strength at each step
            for layer_strength, group in by_strength(patches, strengths).items():
                model.add_hook_patches(hook=self, patches=group, strength_patch=layer_strength)
        registered.add(self)
        return True

    def patches(self, patcher, clip: bool, strength: float) -> tuple[dict, dict]:
        """``{key: adapter}`` and ``{key: strength x block weight}`` for the model (or CLIP)
        ``patcher``, every layer checked at every strength the keyframes will give it before
        anything is added."""
        boft_file = parsed_file(self.boft_path)
        part = replace(boft_file, layers={n: layer for n, layer in boft_file.layers.items()
                                          if is_text_encoder_layer(n) == clip})
        if not part.layers:
            return {}, {}  # e.g. a UNet-only file on the CLIP: nothing to do there
        # plan_patches reads a CLIP's cond_stage_model; a CLIP's patcher holds it as .model
        model, te = (None, SimpleNamespace(cond_stage_model=patcher.model)) if clip else (patcher, None)
        weights = self.block_weights(boft_file, None if clip else patcher)
        keyframes = {float(kf.strength) for kf in self.hook_keyframe.keyframes} or {1.0}
        planned = None
        for k in sorted(keyframes | {1.0}, key=lambda k: k != 1.0):  # 1.0 (the patches kept) first
            if strength * k == 0:
                continue
            where = f"{self.boft_name}: strength {strength} x keyframe {k}"
            check_strength(strength * k, where)
            try:
                got = plan_patches(part, model, te, self.boft_mode, strength * k, strength * k, weights)
            except BoftError as e:
                raise BoftError(f"{where}: {e}") from None
            if planned is None:
                planned = got
        patches, strengths, missing, _ = planned  # a mixed file's other layers are among the patches
        where = "clip" if clip else "model"
        report = (f"BOFT hook {os.path.basename(self.boft_name)} ({boft_file.format}, {self.boft_mode}): "
                  f"{len(patches[where])} patches on the {where}")
        if weights is not None:
            off = sum(weights.weight(n) == 0 for n in part.layers if n not in missing)
            report += f", block_weights {weights.text!r}" + (f" ({off} layers at weight 0)" if off else "")
        if missing:
            report += f"; not in this {where}: {', '.join(missing[:12])}" + (" ..." if len(missing) > 12 else "")
            log.warning(report)
        else:
            log.info(report)
        return patches[where], strengths[where]  # at `strength` x block weight (keyframe 1)

    def block_weights(self, boft_file, model):
        """The parsed ``block_weights`` (None when empty) for ``model``'s family, as the loaders read
        it; on a CLIP (``model`` None), which has no model family, for the family the file's layer
        names suggest (as the info panel reads it): there only its text-encoder entries act."""
        text = (self.boft_block_weights or "").strip()
        if not text:
            return None
        family = model_family(model) if model is not None else family_of(guess_family(boft_file.layers))
        try:
            return parse_block_weights(text, family)
        except BoftError as e:
            raise BoftError(f"{self.boft_name}: {e}") from None


class BOFTCreateHook(_Loader):
    """Create Hook BOFT: HOOKS for Set CLIP Hooks / Cond Set Props, schedulable
    with ComfyUI's hook keyframe nodes."""

    CATEGORY = "advanced/hooks/create"
    SEARCH_ALIASES = _Loader.SEARCH_ALIASES + ["hook", "schedule", "keyframe"]
    FUNCTION = "create_hook"
    RETURN_TYPES = ("HOOKS",)
    OUTPUT_TOOLTIPS = ("The hooks so far plus this BOFT's.",)
    DESCRIPTION = ("A BOFT as a weight hook: applied to the conditionings it is attached to, at the strength "
                   "of the current hook keyframe (strength x block weight x keyframe), for every BOFT format "
                   "the loaders read.")

    @classmethod
    def INPUT_TYPES(cls):
        strength = {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01}
        return {
            "required": {
                "boft_name": (folder_paths.get_filename_list("loras"), {
                    "tooltip": "The BOFT file, from the loras folder (LyCORIS BOFT/diag-OFT, kohya networks.boft, "
                               "or a PEFT adapter folder through its adapter_model.safetensors)."}),
                "strength_model": ("FLOAT", dict(strength, tooltip="Strength on the diffusion model; hook "
                                                                   "keyframes multiply it per step.")),
                "strength_clip": ("FLOAT", dict(strength, tooltip="Strength on the text encoder (SetClipHooks).")),
                "mode": (list(MODES), {"default": "lycoris", "tooltip": MODE_TOOLTIP}),
            },
            "optional": {
                "prev_hooks": ("HOOKS", {"tooltip": "Hooks to combine this one with."}),
                "block_weights": ("STRING", {"default": "", "multiline": False, "tooltip": BLOCK_WEIGHTS_TOOLTIP
                                             + " Keyframes multiply every block's strength alike."}),
            },
        }

    def create_hook(self, boft_name, strength_model, strength_clip, mode="lycoris", prev_hooks=None,
                    block_weights=""):
        check_mode(mode)
        strength_model = check_strength(strength_model, f"{boft_name}: strength_model")
        strength_clip = check_strength(strength_clip, f"{boft_name}: strength_clip")
        hooks = prev_hooks.clone() if prev_hooks is not None else comfy.hooks.HookGroup()
        if strength_model == 0 and strength_clip == 0:
            return (hooks,)
        path = folder_paths.get_full_path_or_raise("loras", boft_name)
        boft_file = parsed_file(path)  # a bad file fails here, naming it, not later inside the sampler
        text = (block_weights or "").strip()
        if text and not any(_parses(text, family) for family in FAMILY_LABELS):
            # wrong for every family: fail now (for the file's family's rules); the model's family,
            # known when the hook is registered, decides the rest there
            try:
                parse_block_weights(text, family_of(guess_family(boft_file.layers)))
            except BoftError as e:
                raise BoftError(f"{boft_name}: {e}") from None
        hooks.add(BoftWeightHook(strength_model, strength_clip, path, boft_name, mode, text))
        return (hooks,)


def _parses(text: str, family: str) -> bool:
    try:
        parse_block_weights(text, family)
    except BoftError:
        return False
    return True
