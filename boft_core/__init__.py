"""boft_core: read BOFT adapter files and merge them exactly. Pure torch; never imports ComfyUI."""

from .formats import FORMATS, BoftError, BoftFile, BoftLayer, parse_header, parse_json, read_header, trigger_words
from .guard import check_merge, check_strength, load
from .merge import MODES, Patch, apply, apply_, bypass_forward, check_weight, merge_bias, merge_weight, prepare

__all__ = [
    "FORMATS", "MODES", "BoftError", "BoftFile", "BoftLayer", "Patch", "apply", "apply_", "bypass_forward",
    "check_merge", "check_strength", "check_weight", "load", "merge_bias", "merge_weight", "parse_header",
    "parse_json", "prepare", "read_header", "trigger_words",
]
