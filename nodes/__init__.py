"""ComfyUI glue: the loader nodes, and our adapter in ComfyUI's adapter list for every LoRA loader."""

import logging
import os

import comfy.weight_adapter

from . import routes  # noqa: F401  (registers the front end's HTTP routes with ComfyUI's server)
from .adapter import BOFTAdapter
from .hooks import BOFTCreateHook
from .loader import BOFTLoader, BOFTLoaderModelOnly

NODE_CLASS_MAPPINGS = {
    "BOFTLoader": BOFTLoader,
    "BOFTLoaderModelOnly": BOFTLoaderModelOnly,
    "BOFTCreateHook": BOFTCreateHook,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "BOFTLoader": "Load BOFT",
    "BOFTLoaderModelOnly": "Load BOFT (model only)",
    "BOFTCreateHook": "Create Hook BOFT",
}

CORE_ADAPTER_ENV = "COMFYUI_BOFT_CORE_ADAPTER"


def register_core_adapter() -> bool:
    """Let core's LoraLoader (and packs built on it) load boft_R files and merge oft_blocks exactly.

    ComfyUI tries every class in ``comfy.weight_adapter.adapters`` on every layer and keeps the last
    match, so appending ours replaces core's BOFT/OFT math. Set COMFYUI_BOFT_CORE_ADAPTER=0 to keep
    core's behaviour for core's loaders.
    """
    if os.environ.get(CORE_ADAPTER_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        logging.info("[comfyui-boft] %s=0: core LoRA loaders keep ComfyUI's own BOFT/OFT math.", CORE_ADAPTER_ENV)
        return False
    adapters = comfy.weight_adapter.adapters
    if not any(getattr(a, "name", None) == BOFTAdapter.name for a in adapters):
        adapters.append(BOFTAdapter)
        logging.info("[comfyui-boft] exact BOFT merge enabled for every LoRA loader "
                     "(set %s=0 to turn off).", CORE_ADAPTER_ENV)
    return True


register_core_adapter()
