"""Strength per model block: LoRA Block Weight vectors and presets, and named blocks.

A ``block_weights`` string gives each layer a weight; the loader merges the layer at
``strength × weight`` in the chosen strength mode. It is one of:

* empty: every block at 1;
* a LoRA Block Weight vector: comma-separated numbers in one of the orders below (an optional
  ``LABEL:`` in front, as in a preset file line, is ignored);
* a preset name (``ALL``, ``MIDD``, ``OUTALL``, ...; Inspire Pack's ``SD-``/``SDXL-`` spellings too);
* named blocks: ``TE:0, IN:0.5, MID:1, OUT:1`` (``name:value`` or ``name=value``), where a name is
  a group of the info panel's sections (:func:`stats.block_of`) or one LoRA Block Weight block id
  (``IN04``, ``M00``, ``OUT03``, ``BASE``); ``default`` (or ``*``) sets every block not named
  (else 1). A block id wins over a group that contains it, a small group over a larger one.

Sources, for the orders and presets:

* hako-mikan, sd-webui-lora-block-weight, README.md "Weights Setting" (the tables LoRA(17),
  LyCORIS(26), SDXL LoRA(12), SDXL LyCORIS/LoCon(20)) and scripts/lora_block_weight.py
  (``BLOCKID17/26/12/20``, ``DEF_WEIGHT_PRESET``, ``to26``: a block a shorter vector does not list
  gets 0; a layer in no block, e.g. the time embedding, keeps 1; text encoders are ``BASE``).
  https://github.com/hako-mikan/sd-webui-lora-block-weight
* ltdrdata, ComfyUI-Inspire-Pack, resources/lbw-preset.txt (the ``SD-`` presets MIDD0.2, MIDD0.8,
  MOUT and the 12-value ``SDXL-`` presets). https://github.com/ltdrdata/ComfyUI-Inspire-Pack

Pure Python; never imports ComfyUI.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .formats import BoftError
from .names import strip_prefix
from .stats import block_of

LBW26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
ORDERS = {  # family -> {vector length: block ids in order}
    "sd1": {
        17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
             "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
        26: LBW26,
    },
    "sdxl": {
        12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
        20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
    },
}
PRESETS = {  # family -> {name: vector}; LBW's defaults, then Inspire Pack's additions
    "sd1": {
        "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
        "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
        "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
        "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
        "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
        "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
        "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
        "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
        "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
        "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
        "MIDD0.2": "1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0",
        "MIDD0.8": "1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0",
        "MOUT": "1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0",
    },
    "sdxl": {
        "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
        "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
        "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
        "MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
        "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    },
}
PRESET_PREFIX = {"sd1": "SD-", "sdxl": "SDXL-"}  # Inspire Pack's spelling of the same presets
FAMILY_LABELS = {"sd1": "SD1.x/SD2.x", "sdxl": "SDXL", "flux": "Flux", "sd3": "SD3", "other": "this"}
_TE = ("text encoder", "text encoder 2")
GROUPS = {  # family -> {name: the panel's sections it covers}
    "sd1": {"te": _TE, "base": _TE, "te1": _TE[:1], "in": ("in", "down"), "down": ("down",), "mid": ("mid",),
            "out": ("up", "out"), "up": ("up",)},
    "flux": {"te": _TE, "double": ("double",), "single": ("single",)},
    "sd3": {"te": _TE, "joint": ("joint",)},
    "other": {"te": _TE},
}
GROUPS["sdxl"] = {**GROUPS["sd1"], "te2": _TE[1:]}
EXAMPLES = {"sd1": "TE:0, IN:0.5, MID:1, OUT:1", "sdxl": "TE:0, IN:0.5, MID:1, OUT:1",
            "flux": "double:1, single:0.6", "sd3": "TE:0, joint:0.8", "other": "TE:0"}
DEFAULT_NAMES = ("default", "*")

_IDS = re.compile(r"^(BASE|IN\d\d|M00|MID|OUT\d\d)$", re.IGNORECASE)
_LDM = ((re.compile(r"^input_blocks_(\d+)_"), "IN", lambda m: int(m[1])),
        (re.compile(r"^(middle_block|mid_block)_"), "M", lambda m: 0),
        (re.compile(r"^output_blocks_(\d+)_"), "OUT", lambda m: int(m[1])),
        # diffusers: 2 (SDXL) or 3 (SD1) layers per level + a down/upsampler, 3 LDM blocks per level
        (re.compile(r"^down_blocks_(\d+)_(attentions|resnets)_(\d+)_"), "IN", lambda m: 3 * int(m[1]) + int(m[3]) + 1),
        (re.compile(r"^down_blocks_(\d+)_downsamplers_"), "IN", lambda m: 3 * int(m[1]) + 3),
        (re.compile(r"^up_blocks_(\d+)_(attentions|resnets)_(\d+)_"), "OUT", lambda m: 3 * int(m[1]) + int(m[3])),
        (re.compile(r"^up_blocks_(\d+)_upsamplers_"), "OUT", lambda m: 3 * int(m[1]) + 2),
        (re.compile(r"^conv_in(_|$)"), "IN", lambda m: 0))


def family_of(label: str) -> str:
    """Our family id for a family label (``"SDXL"``, ``"SD1.x/SD2.x"``, ``"Flux"``, ...)."""
    for family, text in FAMILY_LABELS.items():
        if family != "other" and label.startswith(text):
            return family
    return "other"


def lbw_block(name: str) -> str | None:
    """The LoRA Block Weight block id of a UNet (SD1/SD2/SDXL) layer name: ``BASE`` for a text
    encoder, ``IN00``-``IN11``, ``M00``, ``OUT00``-``OUT11`` (LDM/SGM ``input_blocks.N`` or the
    diffusers path of the same block); None for a layer in no block (time embedding, conv_out)."""
    if block_of(name)[0] in _TE:
        return "BASE"
    flat = strip_prefix(name).replace(".", "_")
    for pattern, kind, index in _LDM:
        hit = pattern.match(flat)
        if hit:
            return "M00" if kind == "M" else f"{kind}{index(hit):02d}"
    return None


@dataclass(frozen=True)
class BlockWeights:
    """A parsed ``block_weights`` string for one family; :meth:`weight` gives a layer's weight."""

    text: str
    family: str
    kind: str  # "all" (empty), "vector", "preset" or "named"
    ids: dict = field(default_factory=dict)  # LBW block id -> weight
    sections: dict = field(default_factory=dict)  # panel section -> weight (named form)
    default: float = 1.0  # named form: blocks not named; vector form: layers in no LBW block
    vector: tuple = ()  # the numbers of a vector or preset, in order

    def weight(self, name: str) -> float:
        """The weight of the layer ``name`` (1 where the string says nothing about its block)."""
        if self.kind == "all":
            return 1.0
        block = lbw_block(name) if self.family in ORDERS else None
        if block in self.ids:
            return self.ids[block]
        if self.kind in ("vector", "preset"):
            return 1.0 if block is None else 0.0  # LBW's to26: a block the vector does not list gets 0
        return self.sections.get(block_of(name)[0], self.default)


def accepted(family: str) -> str:
    """What ``block_weights`` accepts for ``family``, for error messages and the panel."""
    groups = GROUPS.get(family, GROUPS["other"])
    names = ", ".join(n.upper() if len(n) <= 4 else n for n in groups)
    parts = []
    if family in ORDERS:
        lengths = " or ".join(str(n) for n in ORDERS[family])
        first = next(iter(ORDERS[family].items()))
        parts.append(f"a LoRA Block Weight vector of {lengths} comma-separated numbers "
                     f"({first[0]}: {','.join(first[1])})")
        parts.append(f"a preset: {', '.join(PRESETS[family])}")
        names += ", or a block id (IN04, M00, OUT03, ...)"
    parts.append(f"named blocks like '{EXAMPLES.get(family, EXAMPLES['other'])}' with names {names}; "
                 "'default:x' sets the others")
    return "; ".join(parts)


def _error(text: str, family: str, problem: str) -> BoftError:
    label = FAMILY_LABELS.get(family, FAMILY_LABELS["other"])
    return BoftError(f"block_weights {text!r}: {problem}. For {label} models it accepts {accepted(family)}.")


def _number(text: str, item: str, family: str) -> float:
    try:
        value = float(item)
    except ValueError:
        raise _error(text, family, f"{item.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise _error(text, family, f"{item.strip()!r} is not a finite number")
    return value


def preset_names(family: str) -> list[str]:
    return list(PRESETS.get(family, {}))


def parse_block_weights(text: str | None, family: str) -> BlockWeights:
    """Parse a ``block_weights`` string for ``family`` (``sd1``, ``sdxl``, ``flux``, ``sd3``,
    ``other``). BoftError, naming what the family accepts, on a wrong length or an unknown name."""
    text = (text or "").strip()
    family = family if family in FAMILY_LABELS else "other"
    if not text:
        return BlockWeights("", family, "all")
    presets = PRESETS.get(family, {})
    name = text.upper()
    prefix = PRESET_PREFIX.get(family)
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    if name in presets:
        return _vector(text, family, presets[name], "preset")
    items = [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]
    if len(items) > 1 and ":" in items[0] and all(":" not in i and "=" not in i for i in items[1:]):
        items[0] = items[0].split(":", 1)[1]  # "LABEL:1,0,..." (a preset file's line)
    if all(":" not in i and "=" not in i for i in items):
        if len(items) == 1 and not re.match(r"^[-+.\d]", items[0]):
            raise _error(text, family, f"unknown preset {items[0]!r}")
        return _vector(text, family, ",".join(items), "vector")
    return _named(text, family, items)


def _vector(text: str, family: str, vector: str, kind: str) -> BlockWeights:
    values = [_number(text, v, family) for v in vector.split(",")]
    orders = ORDERS.get(family)
    if not orders:
        raise _error(text, family, "LoRA Block Weight vectors exist for SD1.x/SD2.x and SDXL only")
    order = orders.get(len(values))
    if order is None:
        raise _error(text, family, f"{len(values)} values")
    return BlockWeights(text, family, kind, ids=dict(zip(order, values, strict=True)), vector=tuple(values))


def _named(text: str, family: str, items: list[str]) -> BlockWeights:
    groups = GROUPS.get(family, GROUPS["other"])
    ids, entries, default, seen = {}, [], 1.0, set()
    for item in items:
        key, sep, value = re.split(r"([:=])", item, maxsplit=1) if re.search(r"[:=]", item) else (item, "", "")
        key = key.strip().lower()
        if not sep:
            raise _error(text, family, f"{item!r} has no ':value'")
        if key in seen:
            raise _error(text, family, f"{key!r} is given twice")
        seen.add(key)
        weight = _number(text, value, family)
        if key in DEFAULT_NAMES:
            default = weight
        elif key in groups:
            entries.append((groups[key], weight))
        elif family in ORDERS and _IDS.match(key):
            block = "M00" if key == "mid" else key.upper()
            if block not in LBW26 or (family == "sdxl" and block not in ORDERS["sdxl"][20]):
                raise _error(text, family, f"no block {block} in this family")
            ids[block] = weight
        else:
            raise _error(text, family, f"unknown block name {key!r}")
    sections = {}
    for covered, weight in sorted(entries, key=lambda e: -len(e[0])):  # smaller groups win
        sections.update(dict.fromkeys(covered, weight))
    return BlockWeights(text, family, "named", ids=ids, sections=sections, default=default)


def describe_weights(weights: BlockWeights, names) -> dict:
    """For the panel: each layer's weight, and the weight of each block the file has (in order)."""
    layers = {name: weights.weight(name) for name in names}
    blocks: dict[str, float] = {}
    for name, value in layers.items():
        key = (lbw_block(name) if weights.family in ORDERS else None) or block_of(name)[0]
        blocks.setdefault(key, value)
    return {"text": weights.text, "family": weights.family, "kind": weights.kind, "layers": layers,
            "blocks": [{"block": k, "weight": v} for k, v in blocks.items()]}
