"""boft_core: read BOFT adapter files and merge them exactly. Pure torch; never imports ComfyUI.

The names below load on first use (PEP 562), so that ``python -m boft_core --help`` and the
CLI's argument errors do not wait for torch.
"""

import importlib

_HOMES = {
    "formats": ("FORMATS", "BoftError", "BoftFile", "BoftLayer", "parse_header", "parse_json", "read_header",
                "trigger_words"),
    "guard": ("check_merge", "check_strength", "load"),
    "merge": ("Patch", "apply", "batches_on", "bias_delta", "bypass", "bypass_forward", "check_mode", "check_weight",
              "merge_bias", "merge_weight", "prepare", "try_merge_into"),
    "modes": ("MODES",),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
