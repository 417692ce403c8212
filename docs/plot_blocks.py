"""Draw docs/block_weights.svg: what a block weight does to a rotation, and a preset over the blocks.

    python docs/plot_blocks.py   (pure Python + torch: the SVG is written by hand, no plotting library)

Left: one 2 x 2 butterfly block (a rotation by 60°) merged by boft_core at strength s = weight, applied
to a unit vector: in ``orthogonal`` mode the angle scales with the weight and the vector stays on the
unit circle; in ``lycoris`` mode the block is ``w·R + (1−w)·I``, a straight chord that shrinks the vector
between 0 and 1 and stretches it beyond. Right: the LoRA Block Weight preset MIDD over SD1.5's 17 blocks.
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from boft_core import BoftLayer, merge_weight  # noqa: E402
from boft_core.blocks import ORDERS, PRESETS  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "block_weights.svg")
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
COLORS = {"orthogonal": "#4f9be8", "lycoris": "#e8664f"}


def block_rotation(weight: float, mode: str) -> torch.Tensor:
    """B(weight) of a one-block, one-stage LyCORIS BOFT whose rotation at strength 1 is 60°."""
    t = math.tan(math.radians(60) / 2)  # cayley(Q) with Q = [[0, -t], [t, 0]] rotates by 2·atan(t)
    blocks = torch.tensor([[[[0.0, -t / 2], [t / 2, 0.0]]]], dtype=torch.float64)  # Q = A − Aᵀ
    layer = BoftLayer(name="block", kind="lycoris-boft", blocks=blocks)
    return merge_weight(torch.eye(2, dtype=torch.float64), layer, weight, mode)


def circle_panel(cx: float, cy: float, r: float) -> list[str]:
    parts = [f'<path d="M{cx + r},{cy} A{r},{r} 0 0 0 {cx - r},{cy}" fill="none" stroke="#999" '
             'stroke-dasharray="3 3"/>',
             f'<line x1="{cx - r - 10}" y1="{cy}" x2="{cx + r + 10}" y2="{cy}" stroke="#ccc"/>',
             f'<line x1="{cx}" y1="{cy + 10}" x2="{cx}" y2="{cy - r - 10}" stroke="#ccc"/>']
    for mode, color in COLORS.items():
        points = []
        for w in WEIGHTS:
            x, y = (block_rotation(w, mode) @ torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
            px, py = cx + r * x, cy - r * y
            points.append((px, py))
            parts.append(f'<line x1="{cx}" y1="{cy}" x2="{px:.1f}" y2="{py:.1f}" stroke="{color}" '
                         f'stroke-opacity="0.35"/>')
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="{color}"/>')
            if mode == "orthogonal":
                parts.append(f'<text x="{px + 6:.1f}" y="{py - 4:.1f}" font-size="11">w={w:g}</text>')
        path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(points))
        parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    parts.append(f'<text x="{cx - r}" y="{cy + 22}" font-size="11" fill="{COLORS["orthogonal"]}">'
                 "orthogonal: cayley(w·Q): angle × w, stays a rotation</text>")
    parts.append(f'<text x="{cx - r}" y="{cy + 38}" font-size="11" fill="{COLORS["lycoris"]}">'
                 "lycoris: w·R + (1−w)·I: shrinks, then stretches</text>")
    parts.append(f'<text x="{cx - r}" y="14" font-size="12">one 2×2 block (60° at w = 1), block weight w</text>')
    return parts


def preset_panel(x0: float, y0: float, width: float, height: float) -> list[str]:
    order, values = ORDERS["sd1"][17], [float(v) for v in PRESETS["sd1"]["MIDD"].split(",")]
    bar = width / len(order)
    parts = [f'<text x="{x0}" y="{y0 - 8}" font-size="12">block_weights = MIDD (SD1.5, 17 blocks)</text>',
             f'<line x1="{x0}" y1="{y0 + height}" x2="{x0 + width}" y2="{y0 + height}" stroke="#999"/>']
    for i, (block, v) in enumerate(zip(order, values, strict=True)):
        x = x0 + i * bar
        h = v * height
        if v:
            parts.append(f'<rect x="{x + 1:.1f}" y="{y0 + height - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                         'fill="#4f9be8"/>')
        else:
            parts.append(f'<rect x="{x + 1:.1f}" y="{y0 + height - 4:.1f}" width="{bar - 2:.1f}" height="4" '
                         'fill="none" stroke="#8a8a8a"/>')
        parts.append(f'<text x="{x + bar / 2:.1f}" y="{y0 + height + 12}" font-size="8" text-anchor="end" '
                     f'transform="rotate(-60 {x + bar / 2:.1f} {y0 + height + 12})">{block}</text>')
    parts.append(f'<text x="{x0}" y="{y0 + height + 50}" font-size="11">each layer: strength × its block weight; '
                 "0 = untouched</text>")
    return parts


def main():
    body = circle_panel(130, 165, 100) + preset_panel(390, 40, 280, 110)
    svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="690" height="240" viewBox="0 0 690 240" '
           'font-family="sans-serif">', '<rect width="100%" height="100%" fill="white"/>', *body, "</svg>"]
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("\n".join(svg) + "\n")
    print(OUT)


if __name__ == "__main__":
    main()
