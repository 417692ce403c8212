"""Scaling: adapter time against out_dim (Linear out x 1280) and against the number of layers.

``python bench/scaling.py --help``. Synthetic Linear layers (random float16 weights, LyCORIS
BOFT at lora_dim 16), timed as per_call.py times the set: out_dim 640 to 10240, and 1, 8, 64
layers of 1280x1280. Key ``scaling`` of the JSON result (``out_dim``, ``layers``: summed adapter
ms per contender).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (bench/harness.py)
from harness import Layer, make_adapters, power2factorization  # noqa: E402
from per_call import summarize, time_layers  # noqa: E402  (bench/per_call.py)


def synthetic(comfy, shapes, device, seed) -> list[Layer]:
    layers = []
    for i, shape in enumerate(shapes):
        fac = power2factorization(shape[0], 16)
        layer = Layer(f"synthetic.{i}", tuple(shape), "Linear", *fac)
        gen = torch.Generator(device=device).manual_seed(seed + i)
        layer.weight = torch.randn(shape, generator=gen, device=device).half()
        make_adapters(comfy, layer, device, torch.float16, seed + i)
        layers.append(layer)
    return layers


def scaling(comfy, runs, device, names) -> dict:
    """Adapter time against out_dim (in 1280) and against the number of 1280x1280 layers."""
    clock = harness.Clock(device)
    by_dim = {}
    for out_dim in (640, 1280, 2560, 5120, 10240):
        layers = synthetic(comfy, [(out_dim, 1280)], device, out_dim)
        t = summarize(time_layers(comfy, layers, names, runs, clock), layers)
        by_dim[out_dim] = {n: t["total"][n]["adapter_ms"] for n in names}
    by_count = {}
    for count in (1, 8, 64):
        layers = synthetic(comfy, [(1280, 1280)] * count, device, 7)
        t = summarize(time_layers(comfy, layers, names, runs, clock), layers)
        by_count[count] = {n: t["total"][n]["adapter_ms"] for n in names}
    return {"out_dim": by_dim, "layers": by_count}


def measure(work: harness.Workload, args) -> dict:
    return scaling(work.comfy, args.runs, work.device, work.names)


def main(argv=None) -> dict:
    return harness.run(__doc__, "scaling", measure, argv, needs="host")


if __name__ == "__main__":
    main()
