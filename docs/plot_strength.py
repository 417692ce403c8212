"""Draw docs/strength_modes.png: what each strength mode does to one layer as s goes from -1 to 2.

    python docs/plot_strength.py   (needs matplotlib, which the pack itself does not)
"""

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from boft_core import BoftLayer, merge_weight  # noqa: E402


def main():
    g = torch.Generator().manual_seed(0)
    # A LyCORIS BOFT as it trains on a 320-channel SD layer at lora_dim 16: m = 6 stages of 32 blocks of 10.
    layer = BoftLayer(name="example", kind="lycoris-boft",
                      blocks=torch.randn(6, 32, 10, 10, generator=g, dtype=torch.float64) * 0.02,
                      scale=1 + 0.05 * torch.randn(320, generator=g, dtype=torch.float64))
    w = torch.randn(320, 320, generator=g, dtype=torch.float64) / 320**0.5
    gram = w.t() @ w
    strengths = torch.linspace(-1, 2, 61).tolist()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, style in (("lycoris", "-"), ("linear", "--"), ("orthogonal", ":")):
        change, distortion = [], []
        for s in strengths:
            merged = merge_weight(w, layer, s, mode)
            change.append(((merged - w).norm() / w.norm()).item())
            # how far the layer is from "W rotated and rescaled": norms of directions change
            plain = BoftLayer(name="x", kind=layer.kind, blocks=layer.blocks)  # no rescale
            rotated = merge_weight(w, plain, s, mode)
            distortion.append(((rotated.t() @ rotated - gram).norm() / gram.norm()).item())
        left.plot(strengths, change, style, label=mode, linewidth=2)
        right.plot(strengths, distortion, style, label=mode, linewidth=2)
    left.set(title="size of the change  ‖W'(s) − W‖ / ‖W‖", xlabel="strength s")
    right.set(title="not a rotation  ‖W'ᵀW' − WᵀW‖ / ‖WᵀW‖ (no rescale)", xlabel="strength s")
    for ax in (left, right):
        ax.axvline(0, color="grey", linewidth=0.5)
        ax.axvline(1, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "strength_modes.png")
    fig.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main()
