"""comfyui-boft: BOFT (Butterfly Orthogonal Fine-Tuning) adapters in ComfyUI.

Import-safe without ComfyUI (tests import the pack as a plain package): the nodes are only
registered when ComfyUI's ``comfy`` package is importable.
"""

import importlib.util

WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy") is not None and importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
