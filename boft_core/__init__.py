"""boft_core: read BOFT adapter files and merge them exactly. Pure torch; never imports ComfyUI."""

from .formats import FORMATS, BoftError, BoftFile, BoftLayer, parse_header, parse_json, read_header, trigger_words
from .guard import check_merge, check_strength, load
from .merge import (
                    MODES,
                    Patch,
                    apply,
                    batches_on,
                    bias_delta,
                    bypass,
                    bypass_forward,
                    check_mode,
                    check_weight,
                    merge_bias,
                    merge_weight,
                    prepare,
                    try_merge_into,
)

__all__ = [
    "FORMATS", "MODES", "BoftError", "BoftFile", "BoftLayer", "Patch", "apply", "batches_on", "bias_delta",
    "bypass", "bypass_forward", "check_merge", "check_mode", "check_strength", "check_weight", "load", "merge_bias",
    "merge_weight", "parse_header", "parse_json", "prepare", "read_header", "trigger_words", "try_merge_into",
]
