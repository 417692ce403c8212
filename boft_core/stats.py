"""What a BOFT file does, in numbers a person can read: per-layer rotation distance, model blocks.

* :func:`rotation_distance`: ``‖B − I‖_F / sqrt(n)`` of a layer's butterfly ``B`` (n x n), the
  root-mean-square change a rotation makes to a unit vector: 0 for the identity, at most 2. Estimated
  with seeded Gaussian probes through ``butterfly.apply_stages``: O(n · probes · b · m), never n².
* :func:`block_of`: the model block a layer name belongs to (SD1/SDXL down/mid/up, text encoders,
  Flux double/single blocks, SD3 joint blocks, else the first path component). Pure string logic.
* :func:`trigger_text`: the node's ``trigger_words`` output, from kohya's ``ss_tag_frequency``.

Pure torch, never imports ComfyUI.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from .butterfly import apply_stages
from .formats import BoftFile, BoftLayer, trigger_words
from .merge import prepare
from .names import TE2_PATTERN, TE_PATTERN, strip_prefix

TRIGGER_LIMIT = 10

# Sections in the order a picture shows them (a model's forward order); others follow by name.
SECTIONS = ("text encoder", "text encoder 2", "in", "down", "mid", "up", "out", "joint", "double", "single")

_BLOCKS = (  # (pattern on the name with '.' turned into '_', section, how the index becomes a level)
    (re.compile(r"^input_blocks_0(_|$)"), "in", None),  # LDM/SGM conv_in
    (re.compile(r"^input_blocks_(\d+)_"), "down", lambda i: (i - 1) // 3),  # 3 blocks per level
    (re.compile(r"^down_blocks_(\d+)_"), "down", int),
    (re.compile(r"^(middle_block|mid_block)_"), "mid", None),
    (re.compile(r"^output_blocks_(\d+)_"), "up", lambda i: i // 3),  # 3 blocks per level
    (re.compile(r"^up_blocks_(\d+)_"), "up", int),
    (re.compile(r"^(double_blocks|transformer_blocks)_(\d+)_"), "double", int),
    (re.compile(r"^(single_blocks|single_transformer_blocks)_(\d+)_"), "single", int),
    (re.compile(r"^joint_blocks_(\d+)_"), "joint", int),
    (re.compile(r"^(conv_in|time_embed|time_embedding|label_emb|add_embedding)"), "in", None),
    (re.compile(r"^(out_|conv_out|conv_norm_out|final_layer|norm_out|proj_out)"), "out", None),
)


def rotation_distance(layer: BoftLayer, probes: int = 32, seed: int = 0) -> float:
    """Estimate ``‖B − I‖_F / sqrt(n)`` for ``layer``'s butterfly at strength 1.

    ``B`` is the product of the prepared rotations (``merge.prepare(layer).rotations``, shape
    (m, nb, b, b), layout ``layer.layout``); the scale (rescale / boft_s) is not part of it. With
    ``X`` of shape (n, probes) and i.i.d. N(0, 1) entries, ``E ‖(B − I) X‖_F² = probes · ‖B − I‖_F²``,
    so the estimate is unbiased in the square; its relative spread shrinks like ``1 / sqrt(probes)``.
    Deterministic for a given ``seed``. Computed in float32: the estimate's own spread is far larger
    than the rounding (and the Cayley solves, not the probes, are most of the cost).
    """
    if probes < 1:
        raise ValueError(f"probes must be at least 1, got {probes}")
    rotations = prepare(layer, 1.0, "lycoris", dtype=torch.float32).rotations
    n = layer.dim
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, probes, generator=gen, dtype=torch.float32)
    diff = apply_stages(x, rotations, layer.layout) - x
    return math.sqrt(float(diff.double().pow(2).sum()) / probes / n)


def block_of(name: str) -> tuple[str, int | None]:
    """(section, level) of a layer name: ``("up", 1)`` for ``lora_unet_up_blocks_1_attentions_0_...``.

    Sections: ``text encoder`` / ``text encoder 2``, ``in``, ``down``, ``mid``, ``up``, ``out``
    (SD1/SD2/SDXL, LDM/SGM ``input_blocks``/``output_blocks`` or diffusers ``down_blocks``/
    ``up_blocks``; an LDM block index maps to its resolution level, 3 blocks per level), ``double``
    / ``single`` (Flux), ``joint`` (SD3), else the first path component of the name.
    """
    stem = strip_prefix(name)
    if TE2_PATTERN.match(stem):
        return "text encoder 2", None
    if TE_PATTERN.match(stem):
        return "text encoder", None
    flat = stem.replace(".", "_")
    for pattern, section, level in _BLOCKS:
        hit = pattern.match(flat)
        if hit:
            digits = [g for g in hit.groups() if g and g.isdigit()]
            return section, (level(int(digits[0])) if level and digits else None)
    first = re.split(r"[._]", stem, maxsplit=1)[0]
    return first or name, None


def section_key(section: str) -> tuple[int, str]:
    """Sort key that puts sections in a model's forward order."""
    return (SECTIONS.index(section), "") if section in SECTIONS else (len(SECTIONS), section)


def layer_stats(boft_file: BoftFile, probes: int = 32, seed: int = 0) -> list[dict]:
    """Per layer, in model order: name, section, level, distance (see :func:`rotation_distance`)."""
    rows = []
    for name, layer in boft_file.layers.items():
        section, level = block_of(name)
        rows.append({"name": name, "section": section, "level": level,
                     "distance": rotation_distance(layer, probes, seed)})
    rows.sort(key=lambda r: (section_key(r["section"]), -1 if r["level"] is None else r["level"],
                             _natural(r["name"])))
    return rows


def group_stats(rows: list[dict]) -> list[dict]:
    """Per section (in order): layer count, mean distance, and its share of the summed distance."""
    total = sum(r["distance"] for r in rows) or 1.0
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r["section"], []).append(r["distance"])
    return [{"section": s, "layers": len(d), "mean": sum(d) / len(d), "share": sum(d) / total}
            for s, d in sorted(groups.items(), key=lambda kv: section_key(kv[0]))]


def summary(boft_file: BoftFile) -> dict:
    """Counts of block sizes, butterfly depths and constraints, and how many layers are rescaled."""
    layers = list(boft_file.layers.values())
    return {
        "block_sizes": _counts(layer.block_size for layer in layers),
        "depths": _counts(layer.m for layer in layers),
        "constraints": _counts(layer.alpha for layer in layers),
        "rescaled": sum(layer.scale is not None for layer in layers),
        "sides": _counts(layer.side for layer in layers),
    }


def trigger_text(metadata: dict[str, str], limit: int = TRIGGER_LIMIT) -> str:
    """The ``limit`` most frequent training tags (``ss_tag_frequency``), joined by ``", "``."""
    return ", ".join(tag for tag, _ in trigger_words(metadata)[:limit])


def _counts(values) -> list[list]:
    """[[value, count], ...] sorted by value: JSON-ready (JSON object keys would become strings)."""
    return [[v, c] for v, c in sorted(Counter(values).items())]


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
