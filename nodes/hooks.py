"""Create Hook BOFT: a BOFT as one of ComfyUI's weight hooks (strength scheduled over steps).

Core's ``CreateHookLora`` maps a file's names with core's key maps only (``comfy.lora.load_lora``),
silently: PEFT ``base_model.model.<diffusers path>`` names and PEFT's trained bias never arrive.
This hook plans its patches with the loader nodes' own key maps and checks (``plan_patches``) when
ComfyUI registers it on a model (sampling) or a CLIP (``SetClipHooks``); ComfyUI then applies
them at each keyframe's strength (``strength x keyframe``), through our adapter.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from types import SimpleNamespace

import comfy.hooks
import folder_paths

from ..boft_core import MODES, BoftError, check_mode, check_strength
from ..boft_core.names import TE_ROOTS
from .keymap import candidates
from .loader import MODE_TOOLTIP, _Loader, parsed_file, plan_patches

log = logging.getLogger("comfyui-boft")


def is_text_encoder_layer(name: str) -> bool:
    """Whether a layer name is a text encoder's (what ComfyUI's CLIP key map would know it by)."""
    return any(c.startswith(TE_ROOTS) for c in candidates(name))


class BoftWeightHook(comfy.hooks.WeightHook):
    """A WeightHook whose patches come from a BOFT file, planned when registered on a model part."""

    def __init__(self, strength_model=1.0, strength_clip=1.0, path=None, boft_name=None, mode="lycoris"):
        super().__init__(strength_model=strength_model, strength_clip=strength_clip)
        self.boft_path, self.boft_name, self.boft_mode = path, boft_name, mode

    def clone(self):
        c = super().clone()  # Hook.clone makes type(self)() and copies the host's fields
        c.boft_path, c.boft_name, c.boft_mode = self.boft_path, self.boft_name, self.boft_mode
        return c

    def add_hook_patches(self, model, model_options, target_dict, registered):
        if not self.should_register(model, model_options, target_dict, registered):
            return False
        clip = target_dict.get("target") == comfy.hooks.EnumWeightTarget.Clip
        strength = self._strength_clip if clip else self._strength_model
        if strength != 0:
            patches = self.patches(model, clip, strength)
            if patches:
                model.add_hook_patches(hook=self, patches=patches, strength_patch=strength)
        registered.add(self)
        return True

    def patches(self, patcher, clip: bool, strength: float) -> dict:
        """``{key: adapter}`` for the model (or CLIP) ``patcher``, every layer checked at
        every strength the keyframes will give it before anything is added."""
        boft_file = parsed_file(self.boft_path)
        part = replace(boft_file, layers={n: layer for n, layer in boft_file.layers.items()
                                          if is_text_encoder_layer(n) == clip})
        if not part.layers:
            return {}  # e.g. a UNet-only file on the CLIP: nothing to do there
        # plan_patches reads a CLIP's cond_stage_model; a CLIP's patcher holds it as .model
        model, te = (None, SimpleNamespace(cond_stage_model=patcher.model)) if clip else (patcher, None)
        keyframes = {float(kf.strength) for kf in self.hook_keyframe.keyframes} or {1.0}
        planned = None
        for k in sorted(keyframes | {1.0}, key=lambda k: k != 1.0):  # 1.0 (the patches kept) first
            if strength * k == 0:
                continue
            where = f"{self.boft_name}: strength {strength} x keyframe {k}"
            check_strength(strength * k, where)
            try:
                got = plan_patches(part, model, te, self.boft_mode, strength * k, strength * k)
            except BoftError as e:
                raise BoftError(f"{where}: {e}") from None
            if planned is None:
                planned = got
        patches, _, missing, _ = planned  # a mixed file's other layers are among the patches
        where = "clip" if clip else "model"
        report = (f"BOFT hook {os.path.basename(self.boft_name)} ({boft_file.format}, {self.boft_mode}): "
                  f"{len(patches[where])} patches on the {where}")
        if missing:
            report += f"; not in this {where}: {', '.join(missing[:12])}" + (" ..." if len(missing) > 12 else "")
            log.warning(report)
        else:
            log.info(report)
        return patches[where]  # at `strength`; the host multiplies it by the current keyframe's


class BOFTCreateHook(_Loader):
    """Create Hook BOFT: HOOKS for Set CLIP Hooks / Cond Set Props, schedulable
    with ComfyUI's hook keyframe nodes."""

    CATEGORY = "advanced/hooks/create"
    SEARCH_ALIASES = _Loader.SEARCH_ALIASES + ["hook", "schedule", "keyframe"]
    FUNCTION = "create_hook"
    RETURN_TYPES = ("HOOKS",)
    OUTPUT_TOOLTIPS = ("The hooks so far plus this BOFT's.",)
    DESCRIPTION = ("A BOFT as a weight hook: applied to the conditionings it is attached to, at the strength "
                   "of the current hook keyframe (strength x keyframe), for every BOFT format the loaders read.")

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
            "optional": {"prev_hooks": ("HOOKS", {"tooltip": "Hooks to combine this one with."})},
        }

    def create_hook(self, boft_name, strength_model, strength_clip, mode="lycoris", prev_hooks=None):
        check_mode(mode)
        strength_model = check_strength(strength_model, f"{boft_name}: strength_model")
        strength_clip = check_strength(strength_clip, f"{boft_name}: strength_clip")
        hooks = prev_hooks.clone() if prev_hooks is not None else comfy.hooks.HookGroup()
        if strength_model == 0 and strength_clip == 0:
            return (hooks,)
        path = folder_paths.get_full_path_or_raise("loras", boft_name)
        parsed_file(path)  # a bad file fails here, naming it, not later inside the sampler
        hooks.add(BoftWeightHook(strength_model, strength_clip, path, boft_name, mode))
        return (hooks,)
